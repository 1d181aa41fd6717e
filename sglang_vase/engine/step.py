"""The eviction phase of one scheduling step, independent of SGLang.

``due`` finds the running requests whose physical length reached their trigger, ``evict_requests``
evicts them in one round (``engine.evictor``): slots for copies of shared tree columns are claimed from
``Slots``, the slots the round frees go back to it, and every evicted request's length drops to
q + B. The scheduler adapter (``patches/get_next_batch_to_run.py``) wraps SGLang's requests, tree and
allocator in the two protocols below and applies the result to SGLang's batch (lengths, aborts);
tests drive the same function over a free list.

With the radix cache a request's first ``protected`` columns are tree slots. In the paper's mode its
eviction ends its reads of them: its tree lock is released before its fresh slots are allocated (so
the tree can hand back the prefix only it held) and restored if no slots can be had (nothing was
evicted from the tree meanwhile); such a request is deferred to its next trigger.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol

import torch

from sglang_vase.engine.evictor import Agree, Eviction, evict
from sglang_vase.engine.state import DeviceState, RequestState


class Slots(Protocol):
    """The KV slot allocator with the radix tree behind it."""

    def available(self) -> int:
        """Slots an allocation can get: free ones and those the tree can evict."""

    def alloc(self, count: int) -> torch.Tensor:
        """``count`` slot ids (the tree evicts to make room if it must)."""

    def free(self, slots: torch.Tensor) -> None: ...


class Running(Protocol):
    """A running request as the eviction phase sees it."""

    state: RequestState
    row: int  # its req_to_token row
    length: int  # physical KV length: the slots its row holds
    protected: int  # leading columns that are radix-tree slots
    # Output tokens it will have once the step in flight is processed (overlap scheduler); None
    # when no step of it is in flight.
    output_after_in_flight: int | None

    def release_tree(self) -> bool:
        """Drop its tree lock; False when it held none."""

    def restore_tree(self) -> None:
        """Take back the tree lock ``release_tree`` dropped."""


@dataclass(frozen=True)
class KVPool:
    req_to_token: torch.Tensor  # [rows, max length] int32 slot ids
    k_buffers: list[torch.Tensor]  # per layer [slots, H_kv, D]
    v_buffers: list[torch.Tensor]


@dataclass
class StepResult:
    evicted: list[Running] = field(default_factory=list)  # compacted; ``length`` lowered to q + B
    failed: list[tuple[Running, BaseException]] = field(default_factory=list)  # to abort
    deferred: list[Running] = field(default_factory=list)  # no fresh slots: evicts at its next trigger
    freed: int = 0  # slots given back to ``Slots``

    def merge(self, other: "StepResult") -> "StepResult":
        return StepResult(self.evicted + other.evicted, self.failed + other.failed, self.deferred + other.deferred,
                          self.freed + other.freed)


def due(running: Iterable[Running]) -> list[Running]:
    """The requests whose physical length is a trigger (each one's peak length noted)."""
    out = []
    for r in running:
        r.state.peak_kv_len = max(r.state.peak_kv_len, r.length)
        if r.state.due(r.length):
            out.append(r)
    return out


def evict_requests(requests: list[Running], kv: KVPool, device: DeviceState, slots: Slots,
                   agree: Agree | None = None, forced: bool = False) -> StepResult:
    """Evict ``requests`` (those ``due`` or ``under_pressure`` returned) in one round (see the
    module docstring); ``forced``: by the pool's shortage, not by their triggers."""
    if not requests:
        return StepResult()
    of = {}
    evictions = []
    for r in requests:
        e = Eviction(row=r.row, length=r.length, state=r.state, protected=r.protected, forced=forced)
        of[id(e)] = r
        evictions.append(e)
    round_ = evict(evictions, kv.req_to_token, kv.k_buffers, kv.v_buffers, device,
                   workspace_bytes=requests[0].state.params.workspace_mb << 20,
                   claim=lambda members: claim_fresh(members, [of[id(e)] for e in members], slots),
                   agree=agree)
    result = StepResult(deferred=[of[id(e)] for e in round_.deferred])
    freed = round_.freed_slots()
    if freed is not None:
        slots.free(freed)
        result.freed = int(freed.numel())
    for e, error in round_.failed:
        if e.fresh is not None:  # claimed but never written into its row
            slots.free(e.fresh)
        result.failed.append((of[id(e)], error))
    for e in round_.evicted:
        r = of[id(e)]
        new_length = e.state.geometry.evicted_length
        if r.output_after_in_flight is not None:
            e.state.provisional = (r.output_after_in_flight, r.length - new_length, forced)
        r.length = new_length
        r.protected = e.protected_after
        result.evicted.append(r)
    return result


def claim_fresh(members: list[Eviction], requests: list[Running], slots: Slots) -> list[Eviction]:
    """Fresh slots for each member's copies of shared tree columns (``Eviction.fresh``); a member
    that stops reading tree columns releases its tree lock first. Returns the members it could not
    serve, their locks restored."""
    unserved = []
    for e, r in zip(members, requests):
        released = e.protected_after < e.protected and r.release_tree()
        need = e.fresh_needed
        if need and slots.available() < need:
            if released:  # nothing was evicted since the release: the tree still holds the prefix
                r.restore_tree()
            unserved.append(e)
            continue
        if need:
            e.fresh = slots.alloc(need).to(torch.int64)
    return unserved
