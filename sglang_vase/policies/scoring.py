"""Reference scoring primitives shared by every policy (VASE_SPEC.md, "One eviction").

These functions *define* the semantics the Triton kernels (sglang_vase.kernels) must reproduce.
All of them accept arbitrary leading batch dimensions ``...`` (requests, layers) so that the
engine's batched form and the single-request form run the same code.

Shapes: keys/values ``[..., H_kv, N, D]`` (candidates: the newest ``window`` tokens excluded),
queries ``[..., H_q, W, D]`` post-RoPE, with query head ``h`` belonging to KV head ``h // (H_q // H_kv)``
(the grouping used by HF transformers and SGLang).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SMOOTHING_KERNEL = 5


def value_range(values: torch.Tensor, n_sink: int) -> torch.Tensor:
    """max_d V - min_d V in fp32, with the first ``n_sink`` tokens forced to +inf.

    Sinks have a *small* range, so without the forcing they would be evicted first.
    Returns ``[..., H_kv, N]``.
    """
    v = values.float()
    vmag = v.amax(dim=-1) - v.amin(dim=-1)
    if n_sink > 0:
        vmag[..., :n_sink] = math.inf
    return vmag


def smooth(scores: torch.Tensor, smoothing: int = SMOOTHING_KERNEL) -> torch.Tensor:
    """avg_pool1d of width ``smoothing`` along slot order, stride 1, padding smoothing // 2, zero
    padding counted (torch default)."""
    if smoothing <= 1:
        return scores
    lead = scores.shape[:-1]
    flat = scores.reshape(-1, 1, scores.shape[-1])
    out = F.avg_pool1d(flat, kernel_size=smoothing, stride=1, padding=smoothing // 2)
    return out.reshape(*lead, scores.shape[-1])


def window_attention(keys: torch.Tensor, queries: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Softmax over the candidates of the window queries, fp32: ``[..., H_q, W, N]``."""
    h_kv, d = keys.shape[-3], keys.shape[-1]
    h_q = queries.shape[-3]
    group = h_q // h_kv
    k = keys.float().repeat_interleave(group, dim=-3)  # [..., H_q, N, D]
    logits = queries.float() @ k.transpose(-1, -2) / (math.sqrt(d) * temperature)
    return torch.softmax(logits, dim=-1)


def group_mean(per_query_head: torch.Tensor, h_kv: int) -> torch.Tensor:
    """Mean over each KV head's GQA group: ``[..., H_q, N] -> [..., H_kv, N]``."""
    h_q, n = per_query_head.shape[-2], per_query_head.shape[-1]
    return per_query_head.reshape(*per_query_head.shape[:-2], h_kv, h_q // h_kv, n).mean(dim=-2)


def attention_scores(
    keys: torch.Tensor,
    queries: torch.Tensor,
    temperature: float = 1.0,
    smoothing: int = SMOOTHING_KERNEL,
) -> torch.Tensor:
    """SnapKV-style score of VASE_SPEC (b): ``[..., H_kv, N]`` fp32.

    For each query head: softmax over candidates of q.k / (sqrt(D) * temperature), mean over the W
    window queries, average-pool smoothing; then mean over the GQA group.
    """
    probs = window_attention(keys, queries, temperature).mean(dim=-2)  # [..., H_q, N]
    return group_mean(smooth(probs, smoothing), keys.shape[-3])
