"""R-KV (the paper's re-implementation): attention minus key redundancy."""

from __future__ import annotations

import torch

from sglang_vase.policies.base import EvictionInputs, check_float
from sglang_vase.policies.snapkv import SnapKV


def key_redundancy(keys: torch.Tensor) -> torch.Tensor:
    """softmax over t of mean_j cos(k_t, k_j), self-similarity zeroed: ``[..., H_kv, N]`` fp32."""
    k = keys.float()
    k = k / (k.norm(dim=-1, keepdim=True) + 1e-8)
    self_pairs = torch.eye(k.shape[-2], dtype=torch.bool, device=k.device)
    cos = (k @ k.transpose(-1, -2)).masked_fill(self_pairs, 0.0)
    return torch.softmax(cos.mean(dim=-1), dim=-1)


class RKV(SnapKV):
    """R-KV: top-k of lam * attention - (1 - lam) * redundancy, per KV head.

    Parameters (besides those of ``snapkv``):
        lam: weight of the attention score, in [0, 1]. Default 0.5.
    """

    name = "rkv"

    def __init__(self, budget: int, *, lam: float = 0.5, **common):
        super().__init__(budget, **common)
        check_float("lam", lam, minimum=0.0, maximum=1.0)
        self.lam = float(lam)

    def scores(self, x: EvictionInputs) -> torch.Tensor:
        return self.lam * super().scores(x) - (1.0 - self.lam) * key_redundancy(x.keys)
