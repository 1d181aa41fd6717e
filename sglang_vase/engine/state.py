"""State VaSE keeps beside SGLang's: per request (host) and per model runner (device).

Per request (``RequestState``, attached to SGLang's ``Req``): its settings, its seed, counters, its
slot bound and its query-ring row.

Per model runner (``DeviceState``, allocated with the KV pool, before CUDA-graph capture):
- ``ring``: the query ring (``engine.ring``);
- ``position_offset``: true position minus physical length, per ``req_to_token`` row. Decode
  positions are ``seq_lens - 1 + offset[row]`` so RoPE stays absolute after evictions; a device
  tensor, so the decode step needs no host data.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from dataclasses import dataclass, field

import torch

from sglang_vase.config import VaseParams
from sglang_vase.engine.geometry import Geometry
from sglang_vase.engine.ring import QueryRing
from sglang_vase.policies.base import Policy

logger = logging.getLogger(__name__)
_arrivals = itertools.count()


def derive_seed(rid: str, server_seed: int | None) -> int:
    """A request's seed when it names none: stable for its id (and the server's --vase-seed)."""
    digest = hashlib.blake2b(f"{server_seed}:{rid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


@dataclass
class RequestState:
    params: VaseParams
    seed: int
    rid: str
    # Tokens its last (re)prefill writes: the prompt, or prompt + output after a retraction.
    prefill_len: int
    # Leading columns never evicted: the prompt with keep_prompt, else 0 (``VaseParams.kept_prompt``).
    kept_prompt: int = 0
    # Since the last (re)prefill: they drive the slot bound and the noise stream.
    evictions: int = 0
    evicted_tokens: int = 0
    # Over the request's life, retractions included: what meta_info["vase"] reports.
    total_evictions: int = 0
    total_evicted_tokens: int = 0
    forced_evictions: int = 0  # of total_evictions: those the pool's shortage forced (pressure mode)
    peak_kv_len: int = 0
    ring_row: int = 0  # its query-ring row; 0 = none
    # Overlap scheduler: an eviction made while the step before it was in flight, as (output tokens
    # the request will have once that step is processed, tokens evicted). If that step finished the
    # request (EOS, stop), the eviction was wasted and ``settle`` takes it back from the counters.
    provisional: tuple[int, int, bool] | None = None  # (output tokens, tokens evicted, forced)
    # The request's own skip_radix_cache_insert, saved when its first eviction sets it (a compacted
    # row must never enter the radix tree) and restored when a retraction starts it over.
    saved_skip_insert: bool | None = None
    arrival: int = field(default_factory=_arrivals.__next__)  # creation order: pressure's tie-break (oldest first)

    @property
    def policy(self) -> Policy:
        """Its policy object: one per setting, shared by the requests that have it."""
        return self.params.build_policy()

    @property
    def geometry(self) -> Geometry:
        """Its budget, window and kept prompt: where its evictions fall."""
        return Geometry(self.params.budget, self.params.window, self.kept_prompt)

    @property
    def on_pressure(self) -> bool:
        """Whether it is evicted only when the pool's shortage forces it (pressure mode), growing
        again after each forced eviction: the static schedule after a forced eviction kept worse
        tokens in the schedules' fidelity replay, at equal throughput and pool use (README)."""
        return self.params.mode == "pressure"

    def due(self, n: int) -> bool:
        """Whether physical length ``n`` is an eviction trigger. A request is only evicted after a
        decode step, never at the length its (re)prefill left it with."""
        if (n == self.prefill_len and not self.evictions) or self.on_pressure:
            return False
        return self.geometry.triggers(n)

    def reclaimable(self, n: int) -> int:
        """Slots an eviction at physical length ``n`` would free (0 where it cannot evict: before a
        decode step after its (re)prefill, or at or below q + B)."""
        if n == self.prefill_len and not self.evictions:
            return 0
        return max(0, n - self.geometry.evicted_length)

    def slot_bound(self) -> int:
        """Most KV slots it can hold from now on (``Geometry.slot_bound``)."""
        return self.geometry.slot_bound(self.prefill_len, evicted=self.evictions > 0)

    def reaches_trigger(self, remaining_new_tokens: int) -> bool:
        """Whether sampling ``remaining_new_tokens`` more tokens after the (re)prefill can evict: at
        a trigger, or in pressure mode at any length past q + B a decode step leaves (the step that
        samples the last token finishes the request instead)."""
        if self.params.mode == "pressure":
            return self.prefill_len + remaining_new_tokens - 2 >= self._earliest_forced()
        return self.geometry.evictions_in(self.prefill_len, remaining_new_tokens) > 0

    def first_window_start(self, remaining_new_tokens: int) -> int | None:
        """The first column of the query window that the first eviction after this (re)prefill scores
        with, when it reaches back into the prefill (static: P > B with P % R != 0; pressure: the
        earliest forced eviction, one decode step past max(P, q + B)): those positions' queries come
        from the prefill, so a prefill that skips them (a radix-cache hit) must not. None when the
        policy scores without queries, the request never reaches its trigger, or the window lies in
        decoded positions only."""
        if not self.policy.needs_queries or not self.reaches_trigger(remaining_new_tokens):
            return None
        first = self._earliest_forced() if self.params.mode == "pressure" else self.geometry.next_trigger(self.prefill_len)
        start = first - self.params.window
        return start if start < self.prefill_len else None

    def _earliest_forced(self) -> int:
        """The shortest physical length a forced eviction can happen at: after a decode step, past q + B."""
        return max(self.prefill_len, self.geometry.evicted_length) + 1

    def record(self, evicted_tokens: int, forced: bool = False) -> None:
        """Count one eviction of ``evicted_tokens`` tokens (``forced`` by the pool's shortage)."""
        self.evictions += 1
        self.evicted_tokens += evicted_tokens
        self.total_evictions += 1
        self.total_evicted_tokens += evicted_tokens
        self.forced_evictions += forced

    def settle(self, output_len: int, finished: bool) -> bool:
        """Resolve a provisional eviction once the in-flight step is processed; True when it was
        wasted (the request finished at that step) and is taken back from the totals."""
        if self.provisional is None:
            return False
        expected_output, tokens, forced = self.provisional
        if finished and output_len <= expected_output:
            self.evictions -= 1
            self.evicted_tokens -= tokens
            self.total_evictions -= 1
            self.total_evicted_tokens -= tokens
            self.forced_evictions -= forced
            self.provisional = None
            return True
        if output_len >= expected_output:
            self.provisional = None
        return False

    def restart(self, prefill_len: int, kept_prompt: int) -> None:
        """After a retraction the request is re-prefilled uncompressed: its eviction sequence
        starts over (the totals keep counting)."""
        self.prefill_len = prefill_len
        self.kept_prompt = kept_prompt
        self.evictions = 0
        self.evicted_tokens = 0
        self.provisional = None


def request_state(req) -> RequestState | None:
    """The request's state when eviction is enabled for it, else None."""
    state = getattr(req, "_vase", None)
    return state if state is not None and state.params.enabled else None


def needs_ring_row(req) -> bool:
    """Whether an SGLang ``Req`` must get a query-ring row: it holds none, its policy scores with
    the window's queries and its remaining output can reach the trigger (n > B, n % R == 0)."""
    st = request_state(req)
    if st is None or st.ring_row or not st.policy.needs_queries:
        return False
    max_new = req.sampling_params.max_new_tokens
    return st.reaches_trigger((1 << 30 if max_new is None else max_new) - len(req.output_ids))


class DeviceState:
    """What eviction keeps on the device per model runner (one per scheduler process and rank): the
    query ring and the position offsets. The model runner holds it and hands it to the SGLang
    objects that reach it (``attach``), so no module global carries it."""

    def __init__(
        self, rows: int, ring_rows: int, num_layers: int, window: int, num_q_heads: int, head_dim: int,
        dtype, device, head_offset: int = 0,
    ):
        self.head_offset = head_offset  # global index of this rank's first KV head (tensor parallelism)
        self.ring = QueryRing(rows, ring_rows, num_layers, window, num_q_heads, head_dim, dtype, device)
        self.position_offset = torch.zeros(rows, dtype=torch.int64, device=device)


_ATTR = "_vase_device"


def attach(device: DeviceState, *owners) -> None:
    """Hang the device state on the SGLang objects whose methods the patches hook (the model runner,
    its ``req_to_token`` pool, its attention layers)."""
    for owner in owners:
        setattr(owner, _ATTR, device)


def device_of(owner) -> DeviceState | None:
    """The device state ``attach`` hung on ``owner``; None before the pool exists, or for a draft
    model's runner (speculative decoding is refused)."""
    return getattr(owner, _ATTR, None)
