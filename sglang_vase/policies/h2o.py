"""H2O (heavy hitters), restricted to the attention of the observation window."""

from __future__ import annotations

import torch

from sglang_vase.policies.base import EvictionInputs, Policy
from sglang_vase.policies.scoring import group_mean, window_attention


class H2O(Policy):
    """H2O: top-k of the attention accumulated (summed) over the window queries, GQA group mean.

    No smoothing, temperature 1. Parameters: budget, window, n_sink, sort_kept.
    """

    name = "h2o"
    needs_queries = True

    def scores(self, x: EvictionInputs) -> torch.Tensor:
        return group_mean(window_attention(x.keys, x.queries).sum(dim=-2), x.keys.shape[-3])
