"""Eviction under memory pressure (sglang_vase.engine.pressure), on the engine alone: which requests
a shortage evicts, and that a forced eviction at any length keeps what an eviction at that length
keeps in the static mode (same policy, seed and eviction index). On a server: tests/test_admission.py."""

from __future__ import annotations

import pytest
import torch

from sglang_vase.config import VaseParams
from sglang_vase.engine import step
from sglang_vase.engine.pressure import reclaimable, relieve, victims
from sglang_vase.engine.state import DeviceState, RequestState
from step_harness import FreeList, Request

LAYERS, H_KV, H_Q, D, SLOTS, ROWS = 2, 2, 4, 16, 600, 6
BUDGET, WINDOW = 32, 8
PRESSURE = VaseParams(policy="vase", budget=BUDGET, window=WINDOW, mode="pressure")
STATIC = VaseParams(policy="vase", budget=BUDGET, window=WINDOW)


def _state(params=PRESSURE, prefill=20, seed=1, rid="r", ring_row=1) -> RequestState:
    return RequestState(params, seed=seed, rid=rid, prefill_len=prefill, ring_row=ring_row)


def test_victims_free_the_most_first_and_only_as_many_as_needed():
    a = Request(_state(rid="a"), row=1, length=90)   # frees 58
    b = Request(_state(rid="b"), row=2, length=70)   # frees 38
    c = Request(_state(rid="c"), row=3, length=70)   # frees 38, younger than b
    assert [r.state.rid for r in victims([c, b, a], 10)] == ["a"]
    assert [r.state.rid for r in victims([c, b, a], 59)] == ["a", "b"]
    assert [r.state.rid for r in victims([c, b, a], 10**6)] == ["a", "b", "c"]  # all there is
    assert victims([c, b, a], 0) == []
    # Not candidates: the static mode, one at or below q + B, one just prefilled (no decode step
    # yet), one without a query-ring row.
    others = [Request(_state(STATIC, rid="s"), 4, 90), Request(_state(rid="q"), 1, BUDGET),
              Request(_state(prefill=80, rid="p"), 2, 80), Request(_state(rid="n", ring_row=0), 3, 90)]
    assert victims(others, 100) == []
    assert reclaimable([a, b, c] + others) == 58 + 38 + 38
    # A request evicted before that has grown again is one (it frees what it grew).
    evicted = _state(rid="e")
    evicted.record(10, forced=True)
    assert [r.state.rid for r in victims(others + [Request(evicted, 5, 50)], 1)] == ["e"]


def test_pressure_mode_is_evicted_only_when_forced_and_grows_again():
    st = _state()
    assert not any(st.due(n) for n in range(21, 400))  # no trigger fires before a forced eviction
    assert st.reclaimable(20) == 0 and st.reclaimable(21) == 0 and st.reclaimable(33) == 1
    st.record(400 - BUDGET, forced=True)
    assert (st.evictions, st.forced_evictions, st.total_evictions) == (1, 1, 1)
    assert not any(st.due(n) for n in range(BUDGET, 400))  # nor after one: it grows again
    assert st.reclaimable(BUDGET) == 0 and st.reclaimable(BUDGET + 9) == 9
    # A provisional forced eviction taken back (its request finished at the step in flight).
    st.provisional = (5, 10, True)
    assert st.settle(5, finished=True) and (st.evictions, st.forced_evictions) == (0, 0)


@pytest.mark.parametrize("prefill, remaining, evicts, window_start", [
    (20, 20, True, None),    # earliest forced eviction at 33: its window 25..32 is all decoded
    (50, 20, True, 43),      # earliest at 51: its window reaches 7 tokens into the prefill
    (50, 2, False, None),    # the only decode step samples the last token: never evicted
    (30, 5, True, 25),       # earliest at 33 <= 30 + 5 - 2
    (30, 4, False, None),
])
def test_pressure_mode_ring_and_prefix_needs(prefill, remaining, evicts, window_start):
    st = _state(prefill=prefill)
    assert st.reaches_trigger(remaining) == evicts
    assert st.first_window_start(remaining) == window_start


class _Pool:
    """A KV pool of random data, requests' rows filled from its free list, ring queries random."""

    def __init__(self, seed: int, lengths: list[int], params: VaseParams):
        g = torch.Generator().manual_seed(seed)
        self.k = [torch.randn(SLOTS, H_KV, D, generator=g) for _ in range(LAYERS)]
        self.v = [torch.randn(SLOTS, H_KV, D, generator=g) * (1 + 5 * (torch.rand(SLOTS, H_KV, 1, generator=g) > 0.95))
                  for _ in range(LAYERS)]
        self.req_to_token = torch.zeros(ROWS, 512, dtype=torch.int32)
        free = (torch.randperm(SLOTS - 1, generator=g) + 1).tolist()
        self.device = DeviceState(ROWS, ROWS, LAYERS, WINDOW, H_Q, D, torch.float32, "cpu")
        self.device.ring.buffer.copy_(torch.randn(self.device.ring.buffer.shape, generator=g))
        self.requests = []
        for i, n in enumerate(lengths):
            row = i + 1
            self.req_to_token[row, :n] = torch.tensor(free[:n], dtype=torch.int32)
            free = free[n:]
            st = RequestState(params, seed=100 + i, rid=f"r{i}", prefill_len=20, ring_row=self.device.ring.bind(row))
            self.requests.append(Request(st, row=row, length=n))
        self.slots = FreeList(free)
        self.kv = step.KVPool(self.req_to_token, self.k, self.v)

    def kept(self, r: Request) -> list[torch.Tensor]:
        ids = self.req_to_token[r.row, : r.length].long()
        return [torch.stack([self.k[l][ids], self.v[l][ids]]) for l in range(LAYERS)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_forced_eviction_keeps_what_a_static_eviction_at_that_length_keeps(seed):
    lengths = [75, 61, 44]
    pressed = _Pool(seed, lengths, PRESSURE)
    free = pressed.slots.available()
    result = relieve(pressed.requests, free + 20, pressed.kv, pressed.device, pressed.slots)
    longest = pressed.requests[0]
    assert [r.state.rid for r in result.evicted] == ["r0"] and not result.failed
    assert result.freed == 75 - BUDGET and pressed.slots.available() == free + 75 - BUDGET
    assert longest.length == BUDGET and longest.state.forced_evictions == 1
    assert [r.length for r in pressed.requests[1:]] == lengths[1:]  # untouched: enough was freed

    # The same request in the static mode, evicted at the same length on an identical pool.
    static = _Pool(seed, lengths, STATIC)
    reference = step.evict_requests([static.requests[0]], static.kv, static.device, static.slots)
    assert [r.state.rid for r in reference.evicted] == ["r0"] and static.requests[0].state.forced_evictions == 0
    for got, want in zip(pressed.kept(longest), static.kept(static.requests[0])):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(pressed.device.position_offset, static.device.position_offset)


def test_a_shortage_no_eviction_can_cover_evicts_every_candidate():
    pool = _Pool(3, [75, 61, 44], PRESSURE)
    free = pool.slots.available()
    result = relieve(pool.requests, free + 10**6, pool.kv, pool.device, pool.slots)
    assert sorted(r.state.rid for r in result.evicted) == ["r0", "r1", "r2"]
    assert result.freed == (75 - BUDGET) + (61 - BUDGET) + (44 - BUDGET)
    assert all(r.length == BUDGET for r in pool.requests)
    # Nothing left to free: a second call evicts nothing (each is at q + B until it grows again).
    assert relieve(pool.requests, free + 10**6, pool.kv, pool.device, pool.slots).evicted == []
