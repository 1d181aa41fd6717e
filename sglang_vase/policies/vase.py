"""VaSE-AttnV, its value-slot ablations, and value slots only for outliers (VASE_SPEC "One eviction")."""

from __future__ import annotations

import dataclasses
import math

import torch

from sglang_vase.policies.base import EvictionInputs, KernelScoring, check_float, check_int
from sglang_vase.policies.snapkv import SnapKV


class VaSE(SnapKV):
    """VaSE-AttnV: pin the n_large largest value ranges (sinks forced in), sample the rest by attention.

    Kept order: [pinned by value range desc, sampled] unless sort_kept.

    Parameters (besides budget, window, n_sink, sort_kept, temperature, smoothing_kernel):
        n_large: value slots, 0..budget-window; None = budget // 4. Sinks are only guaranteed
            when n_large >= n_sink.
    """

    name = "vase"
    stochastic = True

    def __init__(self, budget: int, *, n_large: int | None = None, **common):
        super().__init__(budget, **common)
        self.n_large = self.default_n_large() if n_large is None else n_large
        check_int("n_large", self.n_large, minimum=0, maximum=self.n_keep)

    def default_n_large(self) -> int:
        return self.budget // 4

    @property
    def n_pinned(self) -> int:
        return self.n_large

    def pin_scores(self, x: EvictionInputs) -> torch.Tensor:
        return x.value_range(self.n_sink)


# Noise stream of the random slots (0 is the selection's Gumbel noise, 1 CurDKV's projection).
_RANDOM_SLOT_STREAM = 2
# vase-adaptive's outlier threshold, in multiples of the median value range (see VaSEAdaptive).
DEFAULT_TAU = 4.0


class VaSEAdaptive(VaSE):
    """VaSE with value slots for outliers only: pin the sinks and the tokens whose value range exceeds
    tau x the median range of the head's candidates, at most n_large; sample the rest by attention.

    Per (layer, KV head) and eviction. The median is over the non-sink candidates. On a model whose
    ranges are mild nothing but the sinks passes, and the policy is snapkv-sample with the sinks
    kept; on one with abnormal ranges (VaSE's Qwen3 finding) it pins them as VaSE does, and never
    spends slots on tokens that are merely the largest of ordinary ones. Kept order: [pinned by
    range desc, sampled] unless sort_kept.

    Parameters (besides those of ``vase``):
        n_large: most pinned tokens, sinks included; None = budget // 4.
        tau: the outlier threshold, > 1, in multiples of the median range. Default 4.0: above every
            head of SmolLM2 (max/median <= 4.2) and 8x below the outlier model's newlines (32.5x);
            tau 2..8 moved KL by about two seed-std at most on both (README, Fidelity).
    """

    name = "vase-adaptive"

    def __init__(self, budget: int, *, tau: float = DEFAULT_TAU, **params):
        super().__init__(budget, **params)
        check_float("tau", tau, minimum=1.0, open_minimum=True)
        self.tau = float(tau)

    @property
    def n_pinned_min(self) -> int:
        return 0  # how many pass the test differs per head: unused pins go to the sampled rest

    def pin_scores(self, x: EvictionInputs) -> torch.Tensor:
        vrange = x.value_range(self.n_sink)  # sinks +inf
        sink = torch.arange(vrange.shape[-1], device=vrange.device) < self.n_sink
        median = torch.nanmedian(vrange.masked_fill(sink, math.nan), dim=-1, keepdim=True).values
        pinned = sink | (vrange > self.tau * median)
        return vrange.masked_fill(~pinned, -math.inf)


class VaSERandomSlots(VaSE):
    """Ablation: n_large random slots (sinks forced in) instead of the largest value ranges; the rest
    sampled by attention as VaSE does. A new draw at every eviction, per head."""

    name = "vase-random-slots"

    def pin_scores(self, x: EvictionInputs) -> torch.Tensor:
        shape = tuple(x.keys.shape[-3:-1])  # (H_kv, N)
        draw = x.noise("hashed_uniform", _RANDOM_SLOT_STREAM, shape, per_head=True)
        return draw.masked_fill(torch.arange(shape[-1], device=draw.device) < self.n_sink, math.inf)


class VaSETopK(VaSE):
    """Ablation: VaSE's value slots, then deterministic top-k of attention instead of sampling."""

    name = "vase-topk"
    stochastic = False


class EvictLargeV(VaSE):
    """Negative control: never keep the n_large largest value ranges; sample the rest like VaSE.

    The range is the plain one (sinks not forced). Every eviction must find enough other tokens,
    N >= budget - window + n_large. The engine evicts at N >= budget (it triggers at n > B with
    n % R == 0, so n >= B + R), hence n_large <= window is required: every eviction then fits. The
    default n_large = window evicts, at N == budget, exactly the window's worth of largest-range
    tokens and keeps all the others, like the paper's "evict large" pilot.

    Parameters: as ``vase``, except n_large: 0..window, None = window.
    """

    name = "evict-large-v"
    n_pinned = 0

    def __init__(self, budget: int, **params):
        super().__init__(budget, **params)
        if self.n_large > self.window:
            raise ValueError(
                f"n_large ({self.n_large}) must be at most window ({self.window}) for evict-large-v: an "
                f"eviction at N = budget candidates must keep budget - window of the N - n_large others"
            )

    def default_n_large(self) -> int:
        return self.window

    def validate(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        queries: torch.Tensor | None,
        check_finite: bool = True,
    ) -> None:
        super().validate(keys, values, queries, check_finite)
        if keys.shape[-2] < self.n_keep + self.n_large:
            raise ValueError(
                f"n_large ({self.n_large}) leaves too few candidates: N ({keys.shape[-2]}) must be at "
                f"least budget - window + n_large ({self.n_keep + self.n_large})"
            )

    def scores(self, x: EvictionInputs) -> torch.Tensor:
        large = torch.topk(x.value_range(n_sink=0), self.n_large, dim=-1).indices
        return super().scores(x).scatter(-1, large, -math.inf)

    def kernel_scoring(self) -> KernelScoring | None:
        return dataclasses.replace(super().kernel_scoring(), n_sink=0)  # the plain range: sinks are not forced
