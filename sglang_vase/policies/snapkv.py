"""SnapKV at decode time: keep the candidates the observation window attends to most."""

from __future__ import annotations

from sglang_vase.policies.base import EvictionInputs, KernelScoring, Policy, check_float, check_int
from sglang_vase.policies.scoring import SMOOTHING_KERNEL


class SnapKV(Policy):
    """SnapKV: top-k of the window's smoothed attention (VASE_SPEC (b)).

    Parameters (besides budget, window, n_sink, sort_kept):
        temperature: divides q.k / sqrt(D) before the softmax; > 0. Default 1.0.
        smoothing_kernel: odd width of the average pool along slot order; 1 disables it. Default 5.
    """

    name = "snapkv"
    needs_queries = True
    reads_kv = False

    def __init__(
        self, budget: int, *, temperature: float = 1.0, smoothing_kernel: int = SMOOTHING_KERNEL, **common
    ):
        super().__init__(budget, **common)
        check_float("temperature", temperature, minimum=0.0, open_minimum=True)
        check_int("smoothing_kernel", smoothing_kernel, minimum=1)
        if smoothing_kernel % 2 == 0:
            # avg_pool1d with padding kernel // 2 would return N + 1 scores for an even kernel.
            raise ValueError(f"smoothing_kernel must be odd, got {smoothing_kernel}")
        self.temperature = float(temperature)
        self.smoothing_kernel = smoothing_kernel

    def scores(self, x: EvictionInputs):
        return x.attention_scores(self.temperature, self.smoothing_kernel)

    def kernel_scoring(self) -> KernelScoring | None:
        return KernelScoring(temperature=self.temperature, smoothing=self.smoothing_kernel, n_sink=self.n_sink)


class SnapKVSample(SnapKV):
    """Ablation: SnapKV's score, but sampled without replacement instead of top-k (no value slots)."""

    name = "snapkv-sample"
    stochastic = True
