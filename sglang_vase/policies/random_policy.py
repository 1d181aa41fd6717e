"""Random eviction: a uniform random subset."""

from __future__ import annotations

import torch

from sglang_vase.policies.base import EvictionInputs, Policy


class RandomPolicy(Policy):
    """Random: keep a uniformly random subset per KV head. Needs no queries.

    Parameters: budget, window, n_sink, sort_kept (n_sink unused: sinks are not protected).
    """

    name = "random"
    stochastic = True

    def scores(self, x: EvictionInputs) -> torch.Tensor:
        return torch.ones(x.keys.shape[:-1], device=x.keys.device)
