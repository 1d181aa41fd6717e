"""The eviction step every path shares: the SGLang engine and the transformers replay.

Both ask ``Geometry.triggers`` after each decode step and call ``select_keep`` for each layer, so that
a request evicts exactly the same tokens in either (same trigger, same seeds, same per-head keep sets).
"""

from __future__ import annotations

import torch

from sglang_vase.policies.base import Policy, Precomputed

# The policy's noise stream for (eviction e, layer l) is e * _LAYER_STRIDE + l: distinct for every
# layer of every eviction, while per-request-fixed noise (CurDKV's projection) ignores it.
_LAYER_STRIDE = 1024


def select_keep(
    policy: Policy,
    keys: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor | None,
    seeds: torch.Tensor,
    evictions: torch.Tensor,
    layer: int | range,
    check: bool = False,
    precomputed: Precomputed | None = None,
    head_offset: int = 0,
    fused_noise: bool = False,
) -> torch.Tensor:
    """Keep sets of one layer, or of a range of layers at once, for a batch of requests.

    One layer (``layer`` an int): keys, values ``[B, H_kv, N, D]`` candidates (physical slots 0..N-1,
    N = n - window); queries ``[B, H_q, window, D]`` post-RoPE window queries (any order), or None.
    A range of layers: the same with a layer dimension after the batch, ``[B, len(layer), ...]``;
    every layer draws exactly the noise it draws alone.
    seeds, evictions: int64 ``[B]``: request seed and how many evictions it has had before this one.
    precomputed: scores the engine's Triton kernel already computed (``Policy.kernel_scoring``).
    head_offset: global index of the first KV head given (a tensor-parallel rank's or a chunk's).
    fused_noise: draw the noise with its Triton twin (``kernels.noise``; the same numbers).
    Returns int64 ``[B, H_kv, budget - window]`` (``[B, len(layer), H_kv, budget - window]``).
    """
    last = layer if isinstance(layer, int) else layer.stop - 1
    if last >= _LAYER_STRIDE:
        raise ValueError(f"layer index {last} exceeds {_LAYER_STRIDE}")
    step = evictions.to(torch.int64) * _LAYER_STRIDE
    if isinstance(layer, int):
        step = step + layer
    else:
        seeds = seeds[:, None].expand(-1, len(layer))
        step = step[:, None] + torch.arange(layer.start, layer.stop, device=step.device)
    return policy.select_batched(keys, values, queries, seeds, step, check=check, precomputed=precomputed,
                                 head_offset=head_offset, fused_noise=fused_noise)
