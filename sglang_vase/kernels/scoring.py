"""Candidate scoring straight from SGLang's KV buffers (VASE_SPEC.md, "One eviction" (a) and (b)).

Semantics: ``score_candidates_reference`` = gather K/V through the slot ids, then
``sglang_vase.policies.scoring.attention_scores`` / ``value_range``.

The Triton path never materialises the [W, N] attention matrix. Softmax over N needs each window
query's max and sum-exp over all candidates before any probability is known, so it runs in passes:

1. ``_stats_kernel``, grid (request x query head, split): online softmax over the candidate tiles of
   one split of N, writing a partial (max, sum-exp) per window query. Splitting N keeps the GPU busy
   when a single request is evicted (Bq * H_q alone is ~32 programs).
2. ``_probs_kernel``, grid (request x KV head, tile): merges the partials, recomputes the probabilities
   of its tile for every query head of the GQA group, and writes their mean over the window and the
   group. It also writes the value range of the tile, so V is read exactly once.
3. ``_smooth_kernel``: the average pool along slot order. Pooling is linear, so pooling the group mean
   equals the reference's mean of pooled per-head scores; it needs neighbours from adjacent tiles,
   hence its own small pass.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sglang_vase.kernels._dispatch import interpreting, pow2_at_least, use_triton
from sglang_vase.policies import scoring as ref

SMOOTH_BLOCK = 256
NUM_WARPS = 8  # at 4 warps the fp32 path spills registers (ptxas, sm_90); the bf16 path fits either way
# Pass-1 programs per SM to aim for; the partials per head are capped because pass 2 loads them all
# for each query head of its tile.
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
def _stats_kernel(
    k_ptr, slot_ptr, q_ptr, m_ptr, l_ptr,
    N, W, tiles_per_split, qk_scale,
    stride_ks, stride_kh, stride_kd,
    stride_sb, stride_sn,
    stride_qb, stride_qw, stride_qh, stride_qd,
    H_Q: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, F32: tl.constexpr,
):
    row = tl.program_id(0)  # b * H_Q + query head
    split = tl.program_id(1)
    b = (row // H_Q).to(tl.int64)  # ring-buffer views can have request strides past 2**31
    hq = row % H_Q
    hkv = hq // GROUP

    offs_w = tl.arange(0, BLOCK_W)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(
        q_ptr + b * stride_qb + hq * stride_qh + offs_w[:, None] * stride_qw + offs_d[None, :] * stride_qd,
        mask=(offs_w < W)[:, None] & d_mask[None, :], other=0.0,
    )

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
            k_ptr + slot[:, None] * stride_ks + hkv * stride_kh + offs_d[None, :] * stride_kd,
            mask=n_mask[:, None] & d_mask[None, :], other=0.0,
        )
        s = _qk(q, k, F32) * qk_scale  # log2 domain
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new

    out = (row * tl.num_programs(1) + split) * BLOCK_W + offs_w
    tl.store(m_ptr + out, m_i)
    tl.store(l_ptr + out, l_i)


@triton.jit
def _probs_kernel(
    k_ptr, v_ptr, slot_ptr, q_ptr, m_ptr, l_ptr, score_ptr, vrange_ptr,
    N, W, n_splits, n_sink, qk_scale, inv_count,
    stride_ks, stride_kh, stride_kd,
    stride_vs, stride_vh, stride_vd,
    stride_sb, stride_sn,
    stride_qb, stride_qw, stride_qh, stride_qd,
    H_KV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    F32: tl.constexpr,
):
    row = tl.program_id(0)  # b * H_KV + KV head
    b = (row // H_KV).to(tl.int64)
    hkv = row % H_KV
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    nd_mask = n_mask[:, None] & d_mask[None, :]

    slot = tl.load(slot_ptr + b * stride_sb + offs_n * stride_sn, mask=n_mask, other=0).to(tl.int64)
    v = tl.load(v_ptr + slot[:, None] * stride_vs + hkv * stride_vh + offs_d[None, :] * stride_vd,
                mask=nd_mask, other=0.0).to(tl.float32)
    vrange = (tl.max(tl.where(d_mask[None, :], v, float("-inf")), axis=1)
              - tl.min(tl.where(d_mask[None, :], v, float("inf")), axis=1))
    # Sinks have a small range; forcing +inf keeps them among the largest (VASE_SPEC.md (a)).
    vrange = tl.where(offs_n < n_sink, float("inf"), vrange)
    tl.store(vrange_ptr + row * N + offs_n, vrange, mask=n_mask)

    k = tl.load(k_ptr + slot[:, None] * stride_ks + hkv * stride_kh + offs_d[None, :] * stride_kd,
                mask=nd_mask, other=0.0)
    offs_w = tl.arange(0, BLOCK_W)
    w_mask = offs_w < W
    offs_s = tl.arange(0, BLOCK_S)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for g in range(GROUP):
        hq = hkv * GROUP + g
        # Merge the pass-1 partials of this query head: max M, sum-exp L relative to M.
        part = ((b * H_KV * GROUP + hq) * n_splits + offs_s[:, None]) * BLOCK_W + offs_w[None, :]
        s_mask = (offs_s < n_splits)[:, None]
        m_part = tl.load(m_ptr + part, mask=s_mask, other=float("-inf"))
        l_part = tl.load(l_ptr + part, mask=s_mask, other=0.0)
        m = tl.max(m_part, axis=0)
        inv_l = 1.0 / tl.sum(l_part * tl.exp2(m_part - m[None, :]), axis=0)

        q = tl.load(
            q_ptr + b * stride_qb + hq * stride_qh + offs_w[:, None] * stride_qw + offs_d[None, :] * stride_qd,
            mask=w_mask[:, None] & d_mask[None, :], other=0.0,
        )
        s = _qk(q, k, F32) * qk_scale
        p = tl.exp2(s - m[:, None]) * inv_l[:, None]
        acc += tl.sum(tl.where(w_mask[:, None], p, 0.0), axis=0)
    tl.store(score_ptr + row * N + offs_n, acc * inv_count, mask=n_mask)


@triton.jit
def _smooth_kernel(x_ptr, y_ptr, N, KERNEL: tl.constexpr, BLOCK: tl.constexpr):
    """avg_pool1d(kernel, stride 1, padding kernel // 2), zero padding counted, along each row."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in tl.static_range(KERNEL):
        idx = offs + (i - KERNEL // 2)
        acc += tl.load(x_ptr + row * N + idx, mask=(idx >= 0) & (idx < N), other=0.0)
    tl.store(y_ptr + row * N + offs, acc / KERNEL, mask=offs < N)


def _num_splits(n_rows: int, n_tiles: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter runs programs one after another: fewer is faster
    target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, MAX_SPLITS, triton.cdiv(target, n_rows)))


def _check(k_buf, v_buf, slots, queries, smoothing):
    if k_buf.dim() != 3 or k_buf.shape != v_buf.shape:
        raise ValueError(f"k_buf/v_buf must both be [S, H_kv, D]; got {tuple(k_buf.shape)}, {tuple(v_buf.shape)}")
    if slots.dim() != 2 or queries.dim() != 4 or queries.shape[0] != slots.shape[0]:
        raise ValueError(
            f"need slots [Bq, N], queries [Bq, W, H_q, D]; got {tuple(slots.shape)}, {tuple(queries.shape)}"
        )
    h_kv, d = k_buf.shape[1], k_buf.shape[2]
    if queries.shape[3] != d or queries.shape[2] % h_kv:
        raise ValueError(f"queries {tuple(queries.shape)} do not match KV heads {h_kv} of dim {d}")
    if smoothing > 1 and smoothing % 2 == 0:
        raise ValueError("smoothing must be odd (avg_pool1d with padding k//2 keeps the length only then)")


def score_candidates(
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    slots: torch.Tensor,
    queries: torch.Tensor,
    *,
    temperature: float = 1.0,
    n_sink: int = 4,
    smoothing: int = ref.SMOOTHING_KERNEL,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention score and value range of each request's candidates, for one layer.

    k_buf, v_buf: ``[S, H_kv, D]`` (bf16/fp16/fp32); slots: int32/int64 ``[Bq, N]`` slot ids of the
    candidates; queries: ``[Bq, W, H_q, D]`` post-RoPE window queries (any strides).
    Returns fp32 ``(attn, vrange)``, each ``[Bq, H_kv, N]``, equal to ``score_candidates_reference``.
    ``num_splits`` overrides how many parts pass 1 cuts N into (tests force the merge path with it).
    """
    _check(k_buf, v_buf, slots, queries, smoothing)
    if not use_triton(k_buf, v_buf, slots, queries):
        return score_candidates_reference(
            k_buf, v_buf, slots, queries, temperature=temperature, n_sink=n_sink, smoothing=smoothing
        )

    bq, n = slots.shape
    _, w, h_q, d = queries.shape
    h_kv = k_buf.shape[1]
    group = h_q // h_kv
    dev = k_buf.device
    attn = torch.empty(bq, h_kv, n, dtype=torch.float32, device=dev)
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
    splits = num_splits or _num_splits(bq * h_q, n_tiles, dev)
    tiles_per_split = triton.cdiv(n_tiles, min(splits, n_tiles))
    splits = triton.cdiv(n_tiles, tiles_per_split)  # no empty split (see _stats_kernel)
    qk_scale = math.log2(math.e) / (math.sqrt(d) * temperature)
    block_w = pow2_at_least(w)
    common = dict(GROUP=group, D=d, BLOCK_D=pow2_at_least(d), BLOCK_W=block_w, BLOCK_N=block_n, F32=f32,
                  num_warps=NUM_WARPS)

    m_part = torch.empty(bq * h_q, splits, block_w, dtype=torch.float32, device=dev)
    l_part = torch.empty_like(m_part)
    _stats_kernel[(bq * h_q, splits)](
        k_buf, slots, queries, m_part, l_part,
        n, w, tiles_per_split, qk_scale,
        *k_buf.stride(), *slots.stride(), *queries.stride(),
        H_Q=h_q, **common,
    )
    raw = torch.empty_like(attn) if smoothing > 1 else attn
    _probs_kernel[(bq * h_kv, n_tiles)](
        k_buf, v_buf, slots, queries, m_part, l_part, raw, vrange,
        n, w, splits, n_sink, qk_scale, 1.0 / (w * group),
        *k_buf.stride(), *v_buf.stride(), *slots.stride(), *queries.stride(),
        H_KV=h_kv, BLOCK_S=pow2_at_least(splits, floor=2), **common,
    )
    if smoothing > 1:
        grid = (bq * h_kv, triton.cdiv(n, SMOOTH_BLOCK))
        _smooth_kernel[grid](raw, attn, n, KERNEL=smoothing, BLOCK=SMOOTH_BLOCK)
    return attn, vrange


def score_candidates_reference(
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    slots: torch.Tensor,
    queries: torch.Tensor,
    *,
    temperature: float = 1.0,
    n_sink: int = 4,
    smoothing: int = ref.SMOOTHING_KERNEL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch semantics of ``score_candidates``: gather, then the policies' reference scoring."""
    _check(k_buf, v_buf, slots, queries, smoothing)
    idx = slots.long()
    keys = k_buf[idx].transpose(1, 2)  # [Bq, N, H_kv, D] -> [Bq, H_kv, N, D]
    values = v_buf[idx].transpose(1, 2)
    q = queries.transpose(1, 2)  # [Bq, H_q, W, D]
    return ref.attention_scores(keys, q, temperature, smoothing), ref.value_range(values, n_sink)
