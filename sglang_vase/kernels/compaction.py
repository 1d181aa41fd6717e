"""Per-head compaction of a request's slots (SGLANG_NOTES.md, "per-head eviction needs no new kernel").

For each request b, layer l and KV head h:
``buf_l[slots[b, j], h] = old buf_l[slots[b, keep[b, l, h, j]], h]`` for ``j < K``, for K and V.
Sources and targets are the same request's slots, so a target may be another row's source: each
(b, l, h) row must be read entirely before any of it is written. Rows never interact (requests own
disjoint slots, heads and layers are disjoint memory).

One launch covers every layer and request: a persistent grid of programs, each taking rows in turn
through a scratch area of its own, K rows of K and V: load every source of the row into its
scratch, barrier, write the scratch to the targets, barrier. Memory is bounded by the program count
(``scratch_bytes``), not by the batch; the barrier orders the row's reads before its writes within
the program, which no global ordering between programs could give in one launch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from sglang_vase.kernels._dispatch import pow2_at_least, use_triton
from sglang_vase.kernels._layers import layer_offsets, layer_stack

BLOCK_K = 32  # kept rows per tile
NUM_WARPS = 4
# Programs per SM: enough loads in flight to move rows at the device's bandwidth.
PROGRAMS_PER_SM = 2


@triton.jit(do_not_specialize=["rows", "K", "LAYERS", "H_KV", "stride_sb", "stride_pb", "stride_pl", "stride_ph"])
def _compact_kernel(
    k_ptr, v_ptr, koff_ptr, voff_ptr, slot_ptr, keep_ptr, scratch_ptr,
    rows, K, LAYERS, H_KV,
    stride_ks, stride_kh, stride_kd,
    stride_vs, stride_vh, stride_vd,
    stride_sb, stride_sn,
    stride_pb, stride_pl, stride_ph, stride_pk,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    scratch_k = scratch_ptr + pid.to(tl.int64) * 2 * K * D
    scratch_v = scratch_k + K * D
    for r in range(pid, rows, tl.num_programs(0)):  # r = (b * LAYERS + l) * H_KV + h
        b = tl.cast(r // (LAYERS * H_KV), tl.int64)
        layer = (r // H_KV) % LAYERS
        h = r % H_KV
        k_layer = k_ptr + tl.load(koff_ptr + layer) + h * stride_kh
        v_layer = v_ptr + tl.load(voff_ptr + layer) + h * stride_vh
        keep_row = keep_ptr + b * stride_pb + layer * stride_pl + h * stride_ph
        for t in range(0, tl.cdiv(K, BLOCK_K)):
            offs_j = t * BLOCK_K + tl.arange(0, BLOCK_K)
            j_mask = offs_j < K
            mask = j_mask[:, None] & d_mask[None, :]
            idx = tl.load(keep_row + offs_j * stride_pk, mask=j_mask, other=0)
            src = tl.load(slot_ptr + b * stride_sb + idx * stride_sn, mask=j_mask, other=0).to(tl.int64)
            tmp = offs_j[:, None] * D + offs_d[None, :]
            tl.store(scratch_k + tmp, tl.load(k_layer + src[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                                              mask=mask), mask=mask)
            tl.store(scratch_v + tmp, tl.load(v_layer + src[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                                              mask=mask), mask=mask)
        tl.debug_barrier()  # every source of the row is read before any target is written
        for t in range(0, tl.cdiv(K, BLOCK_K)):
            offs_j = t * BLOCK_K + tl.arange(0, BLOCK_K)
            j_mask = offs_j < K
            mask = j_mask[:, None] & d_mask[None, :]
            dst = tl.load(slot_ptr + b * stride_sb + offs_j * stride_sn, mask=j_mask, other=0).to(tl.int64)
            tmp = offs_j[:, None] * D + offs_d[None, :]
            tl.store(k_layer + dst[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                     tl.load(scratch_k + tmp, mask=mask, volatile=True), mask=mask)
            tl.store(v_layer + dst[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                     tl.load(scratch_v + tmp, mask=mask, volatile=True), mask=mask)
        tl.debug_barrier()  # the scratch is written again by the next row


def _check(k_layers, v_layers, slots, keep):
    shape, _, dtype = layer_stack(k_layers)
    if layer_stack(v_layers)[0] != shape or len(k_layers) != len(v_layers) or v_layers[0].dtype != dtype:
        raise ValueError("K and V need as many layers of one shape and dtype")
    if len(shape) != 3:
        raise ValueError(f"layer buffers must be [S, H_kv, D]; got {tuple(shape)}")
    if slots.dim() != 2 or keep.dim() != 4 or keep.shape[:3] != (slots.shape[0], len(k_layers), shape[1]):
        raise ValueError(f"need slots [Bq, N], keep [Bq, L={len(k_layers)}, H_kv={shape[1]}, K]; got "
                         f"{tuple(slots.shape)}, {tuple(keep.shape)}")
    if keep.shape[3] > slots.shape[1]:
        raise ValueError(f"cannot keep {keep.shape[3]} of {slots.shape[1]} candidates")


def num_programs(rows: int, device: torch.device, row_bytes: int, scratch_budget: int | None = None) -> int:
    """Programs of one compaction launch: enough for the device, within ``scratch_budget`` bytes."""
    if device.type != "cuda":
        return 1  # the interpreter runs programs one after another
    programs = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    if scratch_budget is not None:
        programs = min(programs, scratch_budget // max(row_bytes, 1))
    return max(1, min(rows, programs))


def scratch_bytes(programs: int, k: int, head_dim: int, itemsize: int) -> int:
    """Scratch of a launch: K rows of K and V per program."""
    return programs * 2 * k * head_dim * itemsize


def compact_(
    k_layers: Sequence[torch.Tensor],
    v_layers: Sequence[torch.Tensor],
    slots: torch.Tensor,
    keep: torch.Tensor,
    scratch_budget: int | None = None,
    triton_path: bool | None = None,
) -> None:
    """In place, every layer: move each (request, layer, KV head)'s kept candidates to its first K slots.

    k_layers, v_layers: L buffers ``[S, H_kv, D]`` of one shape, dtype and strides (any dtype: bytes
    are moved); slots: int32/int64 ``[Bq, N]``; keep: int64 ``[Bq, L, H_kv, K]`` indices into
    ``0..N-1``. Slots other than ``slots[:, :K]`` are not written. ``scratch_budget`` bounds the
    kernel's scratch in bytes (fewer programs; never fewer than one). ``triton_path``: the route
    (``_dispatch.Route.compaction``); None decides by these tensors.
    """
    _check(k_layers, v_layers, slots, keep)
    if not (use_triton(k_layers[0], v_layers[0], slots, keep) if triton_path is None else triton_path):
        compact_reference_(k_layers, v_layers, slots, keep)
        return
    bq, layers, h_kv, k = keep.shape
    k_buf, v_buf = k_layers[0], v_layers[0]
    d = k_buf.shape[2]
    rows = bq * layers * h_kv
    if rows * k == 0:
        return
    programs = num_programs(rows, k_buf.device, scratch_bytes(1, k, d, k_buf.element_size()), scratch_budget)
    scratch = torch.empty(programs, 2, k, d, dtype=k_buf.dtype, device=k_buf.device)
    _compact_kernel[(programs,)](
        k_buf, v_buf, layer_offsets(k_layers), layer_offsets(v_layers), slots, keep, scratch,
        rows, k, layers, h_kv, *k_buf.stride(), *v_buf.stride(), *slots.stride(), *keep.stride(),
        D=d, BLOCK_D=pow2_at_least(d), BLOCK_K=BLOCK_K,
        num_warps=NUM_WARPS, num_stages=1,
    )


def compact_reference_(
    k_layers: Sequence[torch.Tensor], v_layers: Sequence[torch.Tensor], slots: torch.Tensor, keep: torch.Tensor
) -> None:
    """Torch semantics of ``compact_`` (advanced indexing reads into a fresh tensor: the temporary)."""
    _check(k_layers, v_layers, slots, keep)
    bq, _, h_kv, k = keep.shape
    idx = slots.long()
    dst = idx[:, None, :k].expand(bq, h_kv, k)
    head = torch.arange(h_kv, device=idx.device)[None, :, None]
    for layer, (k_buf, v_buf) in enumerate(zip(k_layers, v_layers)):
        src = idx.gather(1, keep[:, layer].reshape(bq, -1)).view(bq, h_kv, k)
        for buf in (k_buf, v_buf):
            buf[dst, head] = buf[src, head]
