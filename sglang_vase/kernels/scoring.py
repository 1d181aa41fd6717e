"""Candidate scoring straight from SGLang's KV buffers (VASE_SPEC.md, "One eviction" (a) and (b)).

Semantics: ``score_candidates_reference`` = gather K/V through the slot ids and the window queries
through their indices, then ``sglang_vase.policies.scoring.attention_scores`` / ``value_range``.

Every layer of a batch is scored by the same three launches, whatever the layer count: SGLang keeps
one K and one V buffer per layer, and the kernels reach layer ``l`` through its element offset from
layer 0's buffer (``_layers.layer_offsets``). The window queries are read where they are, through
(row, position) indices into their source (the engine's query ring), so nothing of size
``[layers, W, H_q, D]`` is gathered per request.

The Triton path never materialises the [W, N] attention matrix. Softmax over N needs each window
query's max and sum-exp over all candidates before any probability is known, so it runs in passes:

1. ``_stats_kernel``, grid (request x query head, split, layer): online softmax over the candidate
   tiles of one split of N, writing a partial (max, sum-exp) per window query. Splitting N keeps the
   GPU busy when few (request, layer, head) rows are scored.
2. ``_probs_kernel``, grid (request x KV head, tile, layer): merges the partials, recomputes the
   probabilities of its tile for every query head of the GQA group, and writes their mean over the
   window and the group. It also writes the value range of the tile, so V is read exactly once.
3. ``_smooth_kernel``: the average pool along slot order. Pooling is linear, so pooling the group mean
   equals the reference's mean of pooled per-head scores; it needs neighbours from adjacent tiles,
   hence its own small pass.

Lengths, counts and the strides that follow them are marked ``do_not_specialize``: each new value
would otherwise compile a new kernel (Triton specialises integers divisible by 16 or equal to 1) and
stall the scheduler for seconds mid-serving. What stays compiled in (the GQA group, head dim, dtypes,
block sizes, the ring's depth) is fixed for a server, and ``warm_up`` compiles it at startup.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from sglang_vase.kernels._dispatch import interpreting, pow2_at_least, use_triton
from sglang_vase.kernels._layers import layer_offsets, layer_stack
from sglang_vase.policies import scoring as ref

SMOOTH_BLOCK = 256
NUM_WARPS = 8  # at 4 warps the fp32 path spills registers (ptxas, sm_90); the bf16 path fits either way
# Pass-1 programs per SM to aim for; the partials per head are capped because pass 2 loads them all
# for each query head of its tile (a fixed block, so the split count never compiles a new kernel).
PROGRAMS_PER_SM = 4
MAX_SPLITS = 16


@triton.jit
def _qk(q, k, F32: tl.constexpr):
    """[BLOCK_W, D] x [BLOCK_N, D]^T with fp32 accumulation; fp32 inputs stay exact (no TF32)."""
    if F32:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    return s


@triton.jit
def _load_queries(q_ptr, qrow_ptr, qpos_ptr, b, layer, hq, W,
                  stride_qr, stride_ql, stride_qp, stride_qh, stride_qd, stride_rb, stride_pb, stride_pw,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr):
    """The W window queries of request ``b``, layer ``layer``, query head ``hq``: ``[BLOCK_W, BLOCK_D]``."""
    offs_w = tl.arange(0, BLOCK_W)
    offs_d = tl.arange(0, BLOCK_D)
    w_mask = offs_w < W
    qrow = tl.load(qrow_ptr + b * stride_rb).to(tl.int64)
    qpos = tl.load(qpos_ptr + b * stride_pb + offs_w * stride_pw, mask=w_mask, other=0).to(tl.int64)
    base = q_ptr + qrow * stride_qr + layer.to(tl.int64) * stride_ql + hq * stride_qh
    return tl.load(base + qpos[:, None] * stride_qp + offs_d[None, :] * stride_qd,
                   mask=w_mask[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit(do_not_specialize=["N", "W", "LAYERS", "H_Q", "tiles_per_split", "stride_sb", "stride_pb"])
def _stats_kernel(
    k_ptr, koff_ptr, slot_ptr, q_ptr, qrow_ptr, qpos_ptr, m_ptr, l_ptr,
    N, W, LAYERS, H_Q, tiles_per_split, qk_scale,
    stride_ks, stride_kh, stride_kd,
    stride_sb, stride_sn,
    stride_qr, stride_ql, stride_qp, stride_qh, stride_qd,
    stride_rb, stride_pb, stride_pw,
    GROUP: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, F32: tl.constexpr,
):
    row = tl.program_id(0)  # b * H_Q + query head
    split = tl.program_id(1)
    layer = tl.program_id(2)
    b = (row // H_Q).to(tl.int64)
    hq = row % H_Q
    hkv = hq // GROUP
    k_layer = k_ptr + tl.load(koff_ptr + layer)

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = _load_queries(q_ptr, qrow_ptr, qpos_ptr, b, layer, hq, W, stride_qr, stride_ql, stride_qp, stride_qh,
                      stride_qd, stride_rb, stride_pb, stride_pw, D, BLOCK_D, BLOCK_W)

    m_i = tl.full([BLOCK_W], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_W], tl.float32)
    start = split * tiles_per_split * BLOCK_N
    # The host sizes splits so that every split starts inside N: m_i is finite after the first tile.
    n_tiles = tl.minimum(tiles_per_split, tl.cdiv(N - start, BLOCK_N))
    for t in range(0, n_tiles):
        offs_n = start + t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        slot = tl.load(slot_ptr + b * stride_sb + offs_n * stride_sn, mask=n_mask, other=0).to(tl.int64)
        k = tl.load(
            k_layer + slot[:, None] * stride_ks + hkv * stride_kh + offs_d[None, :] * stride_kd,
            mask=n_mask[:, None] & d_mask[None, :], other=0.0,
        )
        s = _qk(q, k, F32) * qk_scale  # log2 domain
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new

    offs_w = tl.arange(0, BLOCK_W)
    out = (((b * LAYERS + layer) * H_Q + hq) * tl.num_programs(1) + split) * BLOCK_W + offs_w
    tl.store(m_ptr + out, m_i)
    tl.store(l_ptr + out, l_i)


@triton.jit(do_not_specialize=["N", "W", "LAYERS", "H_KV", "n_splits", "n_sink", "stride_sb", "stride_pb"])
def _probs_kernel(
    k_ptr, v_ptr, koff_ptr, voff_ptr, slot_ptr, q_ptr, qrow_ptr, qpos_ptr, m_ptr, l_ptr, score_ptr, vrange_ptr,
    N, W, LAYERS, H_KV, n_splits, n_sink, qk_scale, inv_count,
    stride_ks, stride_kh, stride_kd,
    stride_vs, stride_vh, stride_vd,
    stride_sb, stride_sn,
    stride_qr, stride_ql, stride_qp, stride_qh, stride_qd,
    stride_rb, stride_pb, stride_pw,
    GROUP: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    F32: tl.constexpr,
):
    row = tl.program_id(0)  # b * H_KV + KV head
    layer = tl.program_id(2)
    b = (row // H_KV).to(tl.int64)
    hkv = row % H_KV
    out_row = (b * LAYERS + layer) * H_KV + hkv
    k_layer = k_ptr + tl.load(koff_ptr + layer)
    v_layer = v_ptr + tl.load(voff_ptr + layer)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    nd_mask = n_mask[:, None] & d_mask[None, :]

    slot = tl.load(slot_ptr + b * stride_sb + offs_n * stride_sn, mask=n_mask, other=0).to(tl.int64)
    v = tl.load(v_layer + slot[:, None] * stride_vs + hkv * stride_vh + offs_d[None, :] * stride_vd,
                mask=nd_mask, other=0.0).to(tl.float32)
    vrange = (tl.max(tl.where(d_mask[None, :], v, float("-inf")), axis=1)
              - tl.min(tl.where(d_mask[None, :], v, float("inf")), axis=1))
    # Sinks have a small range; forcing +inf keeps them among the largest (VASE_SPEC.md (a)).
    vrange = tl.where(offs_n < n_sink, float("inf"), vrange)
    tl.store(vrange_ptr + out_row * N + offs_n, vrange, mask=n_mask)

    k = tl.load(k_layer + slot[:, None] * stride_ks + hkv * stride_kh + offs_d[None, :] * stride_kd,
                mask=nd_mask, other=0.0)
    offs_w = tl.arange(0, BLOCK_W)
    w_mask = offs_w < W
    offs_s = tl.arange(0, BLOCK_S)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for g in range(GROUP):
        hq = hkv * GROUP + g
        # Merge the pass-1 partials of this query head: max M, sum-exp L relative to M.
        part = (((b * LAYERS + layer) * H_KV * GROUP + hq) * n_splits + offs_s[:, None]) * BLOCK_W + offs_w[None, :]
        s_mask = (offs_s < n_splits)[:, None]
        m_part = tl.load(m_ptr + part, mask=s_mask, other=float("-inf"))
        l_part = tl.load(l_ptr + part, mask=s_mask, other=0.0)
        m = tl.max(m_part, axis=0)
        inv_l = 1.0 / tl.sum(l_part * tl.exp2(m_part - m[None, :]), axis=0)

        q = _load_queries(q_ptr, qrow_ptr, qpos_ptr, b, layer, hq, W, stride_qr, stride_ql, stride_qp, stride_qh,
                          stride_qd, stride_rb, stride_pb, stride_pw, D, BLOCK_D, BLOCK_W)
        s = _qk(q, k, F32) * qk_scale
        p = tl.exp2(s - m[:, None]) * inv_l[:, None]
        acc += tl.sum(tl.where(w_mask[:, None], p, 0.0), axis=0)
    tl.store(score_ptr + out_row * N + offs_n, acc * inv_count, mask=n_mask)


@triton.jit(do_not_specialize=["N"])
def _smooth_kernel(x_ptr, y_ptr, N, KERNEL: tl.constexpr, BLOCK: tl.constexpr):
    """avg_pool1d(kernel, stride 1, padding kernel // 2), zero padding counted, along each row."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in tl.static_range(KERNEL):
        idx = offs + (i - KERNEL // 2)
        acc += tl.load(x_ptr + row * N + idx, mask=(idx >= 0) & (idx < N), other=0.0)
    tl.store(y_ptr + row * N + offs, acc / KERNEL, mask=offs < N)


def max_splits(n: int, rows: int, device: torch.device) -> int:
    """The most splits ``score_candidates`` gives N candidates in a call of at least ``rows``
    (request, layer, query head) rows: what bounds its partial statistics (the evictor's plan)."""
    return _num_splits(rows, triton.cdiv(n, 32), device)  # 32: the smaller tile, the most tiles


def _num_splits(n_rows: int, n_tiles: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter runs programs one after another: fewer is faster
    target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, MAX_SPLITS, triton.cdiv(target, n_rows)))


def _check(k_layers, v_layers, slots, queries, query_rows, query_positions, smoothing):
    layer_stack(k_layers), layer_stack(v_layers)  # raises unless the layers share shape, dtype and strides
    if len(k_layers) != len(v_layers) or k_layers[0].shape != v_layers[0].shape:
        raise ValueError(f"need as many K as V layers of one shape; got {len(k_layers)} x "
                         f"{tuple(k_layers[0].shape)} and {len(v_layers)} x {tuple(v_layers[0].shape)}")
    if slots.dim() != 2 or queries.dim() != 5 or queries.shape[1] != len(k_layers):
        raise ValueError(f"need slots [Bq, N] and queries [rows, layers={len(k_layers)}, positions, H_q, D]; got "
                         f"{tuple(slots.shape)}, {tuple(queries.shape)}")
    if query_rows.shape != slots.shape[:1] or query_positions.dim() != 2 or query_positions.shape[0] != slots.shape[0]:
        raise ValueError(f"need query_rows [Bq] and query_positions [Bq, W] for Bq = {slots.shape[0]}; got "
                         f"{tuple(query_rows.shape)}, {tuple(query_positions.shape)}")
    h_kv, d = k_layers[0].shape[1], k_layers[0].shape[2]
    if queries.shape[4] != d or queries.shape[3] % h_kv:
        raise ValueError(f"queries {tuple(queries.shape)} do not match KV heads {h_kv} of dim {d}")
    if smoothing > 1 and smoothing % 2 == 0:
        raise ValueError("smoothing must be odd (avg_pool1d with padding k//2 keeps the length only then)")


def score_candidates(
    k_layers: Sequence[torch.Tensor],
    v_layers: Sequence[torch.Tensor],
    slots: torch.Tensor,
    queries: torch.Tensor,
    query_rows: torch.Tensor,
    query_positions: torch.Tensor,
    *,
    temperature: float = 1.0,
    n_sink: int = 4,
    smoothing: int = ref.SMOOTHING_KERNEL,
    num_splits: int | None = None,
    triton_path: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention score and value range of each request's candidates, for every layer at once.

    k_layers, v_layers: L buffers ``[S, H_kv, D]`` (bf16/fp16/fp32/fp8), one per layer, of one shape,
    dtype and strides (SGLang's per-layer pool buffers); slots: int32/int64 ``[Bq, N]`` slot ids of
    the candidates; queries: ``[rows, L, P, H_q, D]`` post-RoPE queries (the query ring, any strides),
    of which request b's window is ``queries[query_rows[b], :, query_positions[b, w]]`` for
    ``w < W`` (int64 ``[Bq]`` and ``[Bq, W]``, W <= P).
    Returns fp32 ``(attn, vrange)``, each ``[Bq, L, H_kv, N]``, equal to ``score_candidates_reference``.
    ``num_splits`` overrides how many parts pass 1 cuts N into (tests force the merge path with it).
    ``triton_path``: the route (``_dispatch.Route.scoring``); None decides by these tensors.
    """
    _check(k_layers, v_layers, slots, queries, query_rows, query_positions, smoothing)
    if not (use_triton(k_layers[0], v_layers[0], slots, queries) if triton_path is None else triton_path):
        return score_candidates_reference(k_layers, v_layers, slots, queries, query_rows, query_positions,
                                          temperature=temperature, n_sink=n_sink, smoothing=smoothing)

    bq, n = slots.shape
    layers, w = len(k_layers), query_positions.shape[1]
    h_q, d = queries.shape[3], queries.shape[4]
    k_buf, v_buf = k_layers[0], v_layers[0]
    h_kv = k_buf.shape[1]
    group = h_q // h_kv
    dev = k_buf.device
    attn = torch.empty(bq, layers, h_kv, n, dtype=torch.float32, device=dev)
    vrange = torch.empty_like(attn)
    if attn.numel() == 0:
        return attn, vrange

    # 16-bit inputs of one dtype go to the tensor cores as they are (products are exact in the fp32
    # accumulator); anything else is computed in fp32. The interpreter (triton 3.8) multiplies bf16
    # as raw uint16 bits, so there bf16 takes the fp32 route too: same values, bf16 x bf16 is exact.
    f32 = not (queries.dtype == k_buf.dtype and k_buf.dtype in (torch.bfloat16, torch.float16))
    f32 = f32 or (interpreting() and k_buf.dtype == torch.bfloat16)
    block_n = 32 if f32 else 64  # fp32 tiles are twice the registers: halve them
    n_tiles = triton.cdiv(n, block_n)
    splits = num_splits or _num_splits(bq * h_q * layers, n_tiles, dev)
    tiles_per_split = triton.cdiv(n_tiles, min(splits, n_tiles))
    splits = triton.cdiv(n_tiles, tiles_per_split)  # no empty split (see _stats_kernel)
    if splits > MAX_SPLITS:
        raise ValueError(f"num_splits {splits} exceeds {MAX_SPLITS}")
    qk_scale = math.log2(math.e) / (math.sqrt(d) * temperature)
    block_w = pow2_at_least(queries.shape[2])  # the source's depth: one kernel for every window up to it
    common = dict(GROUP=group, D=d, BLOCK_D=pow2_at_least(d), BLOCK_W=block_w, BLOCK_N=block_n,
                  F32=f32, num_warps=NUM_WARPS)
    koff, voff = layer_offsets(k_layers), layer_offsets(v_layers)
    qargs = (*queries.stride(), query_rows.stride(0), *query_positions.stride())

    m_part = torch.empty(bq * layers * h_q, splits, block_w, dtype=torch.float32, device=dev)
    l_part = torch.empty_like(m_part)
    _stats_kernel[(bq * h_q, splits, layers)](
        k_buf, koff, slots, queries, query_rows, query_positions, m_part, l_part,
        n, w, layers, h_q, tiles_per_split, qk_scale,
        *k_buf.stride(), *slots.stride(), *qargs,
        **common,
    )
    raw = torch.empty_like(attn) if smoothing > 1 else attn
    _probs_kernel[(bq * h_kv, n_tiles, layers)](
        k_buf, v_buf, koff, voff, slots, queries, query_rows, query_positions, m_part, l_part, raw, vrange,
        n, w, layers, h_kv, splits, n_sink, qk_scale, 1.0 / (w * group),
        *k_buf.stride(), *v_buf.stride(), *slots.stride(), *qargs,
        BLOCK_S=pow2_at_least(MAX_SPLITS, floor=2), **common,
    )
    if smoothing > 1:
        grid = (bq * layers * h_kv, triton.cdiv(n, SMOOTH_BLOCK))
        _smooth_kernel[grid](raw, attn, n, KERNEL=smoothing, BLOCK=SMOOTH_BLOCK)
    return attn, vrange


def gather_queries(queries: torch.Tensor, query_rows: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """The window queries ``[Bq, L, H_q, W, D]`` that ``score_candidates`` reads in place."""
    # Advanced indices on dims 0 and 2 with a slice between them go first: [Bq, W, L, H_q, D].
    return queries[query_rows[:, None], :, query_positions].permute(0, 2, 3, 1, 4)


def gather_candidates(layers: Sequence[torch.Tensor], slots: torch.Tensor) -> torch.Tensor:
    """K or V of the candidates, ``[Bq, L, H_kv, N, D]``."""
    idx = slots.long()
    return torch.stack([buf[idx] for buf in layers], dim=1).transpose(2, 3)


def score_candidates_reference(
    k_layers: Sequence[torch.Tensor],
    v_layers: Sequence[torch.Tensor],
    slots: torch.Tensor,
    queries: torch.Tensor,
    query_rows: torch.Tensor,
    query_positions: torch.Tensor,
    *,
    temperature: float = 1.0,
    n_sink: int = 4,
    smoothing: int = ref.SMOOTHING_KERNEL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch semantics of ``score_candidates``: gather, then the policies' reference scoring."""
    _check(k_layers, v_layers, slots, queries, query_rows, query_positions, smoothing)
    q = gather_queries(queries, query_rows, query_positions)
    return (ref.attention_scores(gather_candidates(k_layers, slots), q, temperature, smoothing),
            ref.value_range(gather_candidates(v_layers, slots), n_sink))
