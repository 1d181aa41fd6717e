"""R-KV (the paper's re-implementation): attention minus key redundancy."""

from __future__ import annotations

import torch

from sglang_vase.policies.base import EvictionInputs, check_float
from sglang_vase.policies.snapkv import SnapKV


def key_redundancy(keys: torch.Tensor) -> torch.Tensor:
    """softmax over t of mean_j cos(k_t, k_j), self-similarity zeroed: ``[..., H_kv, N]`` fp32.

    The mean is linear in k_j, so it is computed as (k_t . sum_j k_j - k_t . k_t) / N with unit
    keys: O(N D) time and memory instead of the [N, N] cosine matrix (512 MiB per head at N = 4096
    in fp32 per request and layer).
    """
    k = keys.float()
    k = k / (k.norm(dim=-1, keepdim=True) + 1e-8)
    total = k.sum(dim=-2, keepdim=True)  # [..., H_kv, 1, D]
    mean_cos = ((k * total).sum(-1) - k.square().sum(-1)) / k.shape[-2]
    return torch.softmax(mean_cos, dim=-1)


class RKV(SnapKV):
    """R-KV: top-k of lam * attention - (1 - lam) * redundancy, per KV head.

    Parameters (besides those of ``snapkv``):
        lam: weight of the attention score, in [0, 1]. Default 0.5.
    """

    name = "rkv"
    reads_kv = True  # the key redundancy

    def __init__(self, budget: int, *, lam: float = 0.5, **common):
        super().__init__(budget, **common)
        check_float("lam", lam, minimum=0.0, maximum=1.0)
        self.lam = float(lam)

    def scores(self, x: EvictionInputs) -> torch.Tensor:
        return self.lam * super().scores(x) - (1.0 - self.lam) * key_redundancy(x.keys)
