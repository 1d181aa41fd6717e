"""State VaSE keeps beside SGLang's: per request (host) and per request row (device).

Per request (``RequestState``, attached to SGLang's ``Req``): its settings, its seed, counters.
Per row of ``req_to_token`` (``DeviceState``, one per scheduler process, allocated with the KV pool
and before CUDA-graph capture):
- ``ring``: post-RoPE queries of the last ``window`` tokens, ``[rows, layers, window, H_q, D]``,
  written at ``position % window``; the attention-scoring policies' observation window.
- ``position_offset``: true position minus physical length, per row. Decode positions are
  ``seq_lens - 1 + offset[row]`` so RoPE stays absolute after evictions; a device tensor, so
  the decode step needs no host data.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch

from sglang_vase.config import VaseParams

logger = logging.getLogger(__name__)


def derive_seed(rid: str, server_seed: int | None) -> int:
    """A request's seed when it names none: stable for its id (and the server's --vase-seed)."""
    digest = hashlib.blake2b(f"{server_seed}:{rid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


@dataclass
class RequestState:
    params: VaseParams
    seed: int
    rid: str
    slot_bound: int = 0  # max(prompt, B) + R, set at admission (the prompt grows after a retraction)
    evictions: int = 0
    evicted_tokens: int = 0
    peak_kv_len: int = 0

    def reset(self) -> None:
        """After a retraction the request is re-prefilled uncompressed: start over."""
        self.evictions = 0
        self.evicted_tokens = 0


def request_state(req) -> RequestState | None:
    """The request's state when eviction is enabled for it, else None."""
    state = getattr(req, "_vase", None)
    return state if state is not None and state.params.enabled else None


class DeviceState:
    def __init__(self, rows: int, num_layers: int, window: int, num_q_heads: int, head_dim: int, dtype, device):
        self.window = window
        self.ring = torch.zeros((rows, num_layers, window, num_q_heads, head_dim), dtype=dtype, device=device)
        self.position_offset = torch.zeros(rows, dtype=torch.int64, device=device)
        logger.info(
            "sglang-vase: query ring %s %s = %.1f MiB (rows=%d, layers=%d, window=%d)",
            tuple(self.ring.shape), dtype, self.ring.numel() * self.ring.element_size() / 2**20,
            rows, num_layers, window,
        )

    def record_decode(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, q: torch.Tensor) -> None:
        """One query per row: ``q`` is ``[bs, H_q, D]``."""
        self.ring[rows, layer, positions % self.window] = q.to(self.ring.dtype)

    def record_extend(
        self, layer: int, rows: torch.Tensor, seq_lens: torch.Tensor, extend_lens: torch.Tensor,
        positions: torch.Tensor, q: torch.Tensor,
    ) -> None:
        """Prefill (or a chunk of it): keep the queries of each request's last ``window`` tokens.

        Tokens outside that tail are written to the padding row 0 instead of being filtered out,
        which keeps every shape fixed and needs no host sync.
        """
        token_rows = torch.repeat_interleave(rows, extend_lens, output_size=q.shape[0])
        token_ends = torch.repeat_interleave(seq_lens, extend_lens, output_size=q.shape[0])
        in_tail = positions >= token_ends - self.window
        target_rows = torch.where(in_tail, token_rows, torch.zeros_like(token_rows))
        self.ring[target_rows, layer, positions % self.window] = q.to(self.ring.dtype)

    def window_queries(self, rows: torch.Tensor, layer: int, last: torch.Tensor, window: int) -> torch.Tensor:
        """Queries of the ``window`` tokens up to true position ``last``: ``[Bq, H_q, window, D]``.

        A request's window may be smaller than the ring's (the server's); order is irrelevant to
        the policies (they average over the window).
        """
        offsets = torch.arange(window, device=rows.device)
        slots = (last[:, None] - offsets[None, :]) % self.window
        return self.ring[rows[:, None], layer, slots].permute(0, 2, 1, 3)


# One model runner per scheduler process (speculative decoding is refused), so one device state.
DEVICE: DeviceState | None = None
