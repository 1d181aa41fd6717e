"""Eviction under memory pressure (``mode: pressure``): a request keeps its full cache until the KV
pool cannot hold what the step needs; then the requests whose eviction frees the most are evicted,
each to q + B with its own policy, seed and budget, and only as many as it takes. A request evicted
grows again and is evicted again only when the pool runs short again (never on the static schedule's
triggers).

Why this can replace retraction: admission reserves for an evicting request its static slot bound
(``Geometry.slot_bound``: max(prompt, B) + R), so the bounds of the running requests fit the pool. A
request in pressure mode holds more than its bound only while slots are free, and an eviction at any
length past q + B brings it back to q + B: whatever the step needs beyond the free slots, the requests
over their bounds can give back.
"""

from __future__ import annotations

from typing import Iterable

from sglang_vase.engine.evictor import Agree
from sglang_vase.engine.state import DeviceState
from sglang_vase.engine.step import KVPool, Running, Slots, StepResult, evict_requests


def _evictable(running: Iterable[Running]) -> list[Running]:
    """Requests in pressure mode an eviction now would free slots of (with their ring row if they
    score with queries)."""
    return [r for r in running if r.state.on_pressure and r.state.reclaimable(r.length) > 0
            and (r.state.ring_row or not r.state.policy.needs_queries)]


def reclaimable(running: Iterable[Running]) -> int:
    """Slots evicting every request in pressure mode now would free (by their lengths)."""
    return sum(r.state.reclaimable(r.length) for r in _evictable(running))


def victims(running: Iterable[Running], shortfall: int) -> list[Running]:
    """The requests in pressure mode to evict so that ``shortfall`` more slots come free: those
    whose eviction frees the most first (ties: the oldest), only as many as it takes (every one
    that can free slots when together they free less)."""
    ready = sorted(_evictable(running), key=lambda r: (-r.state.reclaimable(r.length), r.state.arrival))
    chosen, freed = [], 0
    for r in ready:
        if freed >= shortfall:
            break
        chosen.append(r)
        freed += r.state.reclaimable(r.length)
    return chosen


def relieve(running: list[Running], need: int, kv: KVPool, device: DeviceState, slots: Slots,
            agree: Agree | None = None) -> StepResult:
    """Evict requests in pressure mode until ``slots`` can give ``need`` slots, or none is left
    that can free any. Rounds repeat while slots are short: an eviction that copies shared tree
    columns frees less than its length says."""
    result = StepResult()
    tried: set[int] = set()
    while (shortfall := need - slots.available()) > 0:
        chosen = [r for r in victims(running, shortfall) if id(r) not in tried]
        if not chosen:
            break
        tried.update(id(r) for r in chosen)
        result = result.merge(evict_requests(chosen, kv, device, slots, agree, forced=True))
    return result
