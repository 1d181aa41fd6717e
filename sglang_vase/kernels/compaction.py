"""Per-head compaction of a request's slots (SGLANG_NOTES.md, "per-head eviction needs no new kernel").

For each request b and KV head h: ``buf[slots[b, j], h] = old buf[slots[b, keep[b, h, j]], h]`` for
``j < K``, for K and V of one layer. Sources and targets are the same request's slots, so a target
may be another row's source: everything is gathered into a temporary first and scattered after. Two
kernel launches give the global ordering a single launch could not (programs of one launch are
unordered). Requests own disjoint slots and heads are independent, so only (b, h) rows interact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_vase.kernels._dispatch import pow2_at_least, use_triton

BLOCK_K = 32  # kept rows per program


@triton.jit
def _gather_kernel(
    k_ptr, v_ptr, slot_ptr, keep_ptr, tk_ptr, tv_ptr,
    K,
    stride_ks, stride_kh, stride_kd,
    stride_vs, stride_vh, stride_vd,
    stride_sb, stride_sn,
    stride_pb, stride_ph, stride_pk,
    H_KV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)  # b * H_KV + h
    b = (row // H_KV).to(tl.int64)
    h = row % H_KV
    offs_j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    j_mask = offs_j < K
    offs_d = tl.arange(0, BLOCK_D)
    mask = j_mask[:, None] & (offs_d < D)[None, :]

    idx = tl.load(keep_ptr + b * stride_pb + h * stride_ph + offs_j * stride_pk, mask=j_mask, other=0)
    src = tl.load(slot_ptr + b * stride_sb + idx * stride_sn, mask=j_mask, other=0).to(tl.int64)
    tmp = (row.to(tl.int64) * K + offs_j)[:, None] * D + offs_d[None, :]
    kx = tl.load(k_ptr + src[:, None] * stride_ks + h * stride_kh + offs_d[None, :] * stride_kd, mask=mask)
    tl.store(tk_ptr + tmp, kx, mask=mask)
    vx = tl.load(v_ptr + src[:, None] * stride_vs + h * stride_vh + offs_d[None, :] * stride_vd, mask=mask)
    tl.store(tv_ptr + tmp, vx, mask=mask)


@triton.jit
def _scatter_kernel(
    k_ptr, v_ptr, slot_ptr, tk_ptr, tv_ptr,
    K,
    stride_ks, stride_kh, stride_kd,
    stride_vs, stride_vh, stride_vd,
    stride_sb, stride_sn,
    H_KV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // H_KV).to(tl.int64)
    h = row % H_KV
    offs_j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    j_mask = offs_j < K
    offs_d = tl.arange(0, BLOCK_D)
    mask = j_mask[:, None] & (offs_d < D)[None, :]

    dst = tl.load(slot_ptr + b * stride_sb + offs_j * stride_sn, mask=j_mask, other=0).to(tl.int64)
    tmp = (row.to(tl.int64) * K + offs_j)[:, None] * D + offs_d[None, :]
    kx = tl.load(tk_ptr + tmp, mask=mask)
    tl.store(k_ptr + dst[:, None] * stride_ks + h * stride_kh + offs_d[None, :] * stride_kd, kx, mask=mask)
    vx = tl.load(tv_ptr + tmp, mask=mask)
    tl.store(v_ptr + dst[:, None] * stride_vs + h * stride_vh + offs_d[None, :] * stride_vd, vx, mask=mask)


def _check(k_buf, v_buf, slots, keep):
    if k_buf.dim() != 3 or k_buf.shape != v_buf.shape or k_buf.dtype != v_buf.dtype:
        raise ValueError(
            f"k_buf/v_buf must both be [S, H_kv, D] of one dtype; got {tuple(k_buf.shape)}, {tuple(v_buf.shape)}"
        )
    if slots.dim() != 2 or keep.dim() != 3 or keep.shape[:2] != (slots.shape[0], k_buf.shape[1]):
        raise ValueError(f"need slots [Bq, N], keep [Bq, H_kv, K]; got {tuple(slots.shape)}, {tuple(keep.shape)}")
    if keep.shape[2] > slots.shape[1]:
        raise ValueError(f"cannot keep {keep.shape[2]} of {slots.shape[1]} candidates")


def compact_(k_buf: torch.Tensor, v_buf: torch.Tensor, slots: torch.Tensor, keep: torch.Tensor) -> None:
    """In place, one layer: move each (request, KV head)'s kept candidates to its first K slots.

    k_buf, v_buf: ``[S, H_kv, D]``; slots: int32/int64 ``[Bq, N]``; keep: int64 ``[Bq, H_kv, K]``
    indices into ``0..N-1``. Slots other than ``slots[:, :K]`` are not written.
    """
    _check(k_buf, v_buf, slots, keep)
    if not use_triton(k_buf, v_buf, slots, keep):
        compact_reference_(k_buf, v_buf, slots, keep)
        return
    bq, h_kv, k = keep.shape
    d = k_buf.shape[2]
    if bq * h_kv * k == 0:
        return
    tk = torch.empty(bq * h_kv * k, d, dtype=k_buf.dtype, device=k_buf.device)
    tv = torch.empty_like(tk)
    grid = (bq * h_kv, triton.cdiv(k, BLOCK_K))
    meta = dict(H_KV=h_kv, D=d, BLOCK_D=pow2_at_least(d), BLOCK_K=BLOCK_K)
    strides = (*k_buf.stride(), *v_buf.stride(), *slots.stride())
    _gather_kernel[grid](k_buf, v_buf, slots, keep, tk, tv, k, *strides, *keep.stride(), **meta)
    _scatter_kernel[grid](k_buf, v_buf, slots, tk, tv, k, *strides, **meta)


def compact_reference_(k_buf: torch.Tensor, v_buf: torch.Tensor, slots: torch.Tensor, keep: torch.Tensor) -> None:
    """Torch semantics of ``compact_`` (advanced indexing reads into a fresh tensor: the temporary)."""
    _check(k_buf, v_buf, slots, keep)
    bq, h_kv, k = keep.shape
    idx = slots.long()
    src = idx.gather(1, keep.reshape(bq, -1)).view(bq, h_kv, k)
    dst = idx[:, None, :k].expand(bq, h_kv, k)
    head = torch.arange(h_kv, device=k_buf.device)[None, :, None]
    for buf in (k_buf, v_buf):
        buf[dst, head] = buf[src, head]
