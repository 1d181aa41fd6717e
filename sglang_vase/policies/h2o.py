"""H2O (heavy hitters), restricted to the attention of the observation window."""

from __future__ import annotations

import torch

from sglang_vase.policies.base import EvictionInputs, KernelScoring, Policy


class H2O(Policy):
    """H2O: top-k of the attention accumulated (summed) over the window queries, GQA group mean.

    No smoothing, temperature 1. The sum is W times SnapKV's window mean without smoothing, so it
    comes from the same primitive (and from the engine's Triton scoring kernel on CUDA).
    Parameters: budget, window, n_sink, sort_kept.
    """

    name = "h2o"
    needs_queries = True
    reads_kv = False

    def scores(self, x: EvictionInputs) -> torch.Tensor:
        return x.queries.shape[-2] * x.attention_scores(1.0, 1)

    def kernel_scoring(self) -> KernelScoring | None:
        return KernelScoring(temperature=1.0, smoothing=1, n_sink=self.n_sink)
