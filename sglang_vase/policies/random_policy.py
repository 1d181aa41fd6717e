"""Random eviction: a uniform random subset, with or without the attention sinks."""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from sglang_vase.policies.base import EvictionInputs, Policy


class RandomPolicy(Policy):
    """Random: keep the n_sink first tokens and a uniformly random subset of the others, per KV head.

    Every sink-aware baseline keeps the sinks; without them random eviction measures the loss of
    the sinks more than that of a random subset (``random-nosink``). Needs no queries.
    Parameters: budget, window, n_sink, sort_kept.
    """

    name = "random"
    stochastic = True
    reads_kv = False  # only the candidates' count
    keeps_sinks: ClassVar[bool] = True

    def scores(self, x: EvictionInputs) -> torch.Tensor:
        score = torch.ones(x.keys.shape[:-1], device=x.keys.device)
        if self.keeps_sinks:
            score[..., : self.n_sink] = math.inf  # an infinite sampling key: always drawn
        return score


class RandomNoSink(RandomPolicy):
    """Control: a uniformly random subset per KV head, sinks not protected (n_sink unused).

    Parameters: budget, window, n_sink, sort_kept.
    """

    name = "random-nosink"
    keeps_sinks = False
