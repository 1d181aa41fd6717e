"""StreamingLLM: attention sinks plus the most recent tokens."""

from __future__ import annotations

import math

import torch

from sglang_vase.policies.base import EvictionInputs, Policy


class StreamingLLM(Policy):
    """StreamingLLM: keep the n_sink first and the most recent candidates. Needs no queries.

    Position is read from the slot index, so the kept tokens are always stored in slot order
    (``positional``): slot order then stays position order across evictions.
    Parameters: budget, window, n_sink, sort_kept (no effect: the order is always by position).
    """

    name = "streamingllm"
    positional = True
    reads_kv = False  # only the candidates' count

    def scores(self, x: EvictionInputs) -> torch.Tensor:
        n = x.keys.shape[-2]
        position = torch.arange(n, device=x.keys.device, dtype=torch.float32)
        position[: self.n_sink] = math.inf
        return position.expand(x.keys.shape[:-1])
