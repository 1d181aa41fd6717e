"""One eviction round for the requests that reached their trigger, batched across requests.

For each request with physical length n, of which the first q columns are pinned (the prompt with
keep_prompt, else q = 0), K = B - R (VASE_SPEC, "One eviction"; SGLANG_NOTES, "the key design
fact"):

    row      = req_to_token[r, :n]
    cand     = row[q : n-R]                  the n - R - q candidates; row[n-R : n] is the recency tail
    keep     = [L, H_kv, K] per-head indices into cand
    targets  = K slots the request owns      (see below)
    per layer: K_l[targets, h] = K_l[cand[keep[l, h]], h]   (V likewise; through a temporary)
    new row  = row[:q] ++ targets ++ tail    the recency tail moves by index only
    free       its own candidate slots that are not targets
    length   = q + B;  position offset += n - (q + B)      RoPE positions stay absolute

With the radix cache, columns below ``protected`` (p) are slots of the radix tree, shared with other
requests: they are read, never written or freed here. The targets are the request's own candidate
slots (columns max(p, q)..n-R-1) topped up with fresh slots, and a tail column below p is copied to a
fresh slot too (copy-on-evict). Without shared columns among the candidates (the radix cache off,
keep_prompt, every eviction after the first) the targets are simply ``cand[:K]``. Fresh slots come from
the caller (``claim``), after selection and before compaction; a request that gets none is skipped
this round (``RoundResult.deferred``) and evicts at its next trigger.

Requests that share (settings, n - q) are evicted together: in steady state every request of one
budget evicts at n - q = B + R, so a round is one batch. A batch runs in phases so that a failure
hurts only the request it belongs to:
1. select: the keep sets of every layer, reading the pool only. If it raises for a batch, each
   member is retried alone and only the members that still fail are reported.
2. claim: the caller hands out fresh slots (and releases the tree slots the members stop reading).
3. apply: compaction, row rewrite, offsets. If it raises, the batch's members are reported (their
   KV may be half compacted; their rows and lengths are untouched, so their slots free normally;
   the caller frees their fresh slots).
The caller aborts the reported requests; every other request evicts as usual.

Compaction gathers every source of a batch before it writes any target (``kernels.compact_``), so a
fresh slot may be one the tree just freed while it was still a source of this batch.

Transient memory is bounded by ``workspace_bytes``: requests are split into batches, and a single
request's KV heads into chunks (heads are independent and draw their noise by global head index,
so any split keeps exactly the same tokens). ``transient_bytes`` states the bound.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch

from sglang_vase.engine.selection import select_keep
from sglang_vase.engine.state import DeviceState, RequestState
from sglang_vase.kernels import compact_, score_candidates
from sglang_vase.kernels._dispatch import use_triton
from sglang_vase.policies.base import Policy

# Debugging and tests: save every eviction's keep sets here (one file per request and eviction),
# so a reference can replay exactly what the engine kept. Costs a device-to-host copy per layer.
TRACE_DIR_ENV = "SGLANG_VASE_TRACE_DIR"
# Tests: "select:<text>" or "apply:<text>" (comma-separated) makes that phase raise for requests
# whose id contains <text> (as SGLANG_TEST_RETRACT forces retractions), to show that the failure
# stays theirs.
FAULT_ENV = "SGLANG_VASE_TEST_FAIL_EVICTION"
# Default bound on an eviction round's transient memory (``--vase-workspace-mb``).
DEFAULT_WORKSPACE_BYTES = 256 << 20


@dataclass
class Eviction:
    """A request due for eviction: its req_to_token row, physical length, state, and the columns
    below ``protected`` that belong to the radix tree."""

    row: int
    length: int
    state: RequestState
    protected: int = 0
    fresh: torch.Tensor | None = None  # the slots ``claim`` handed it, ``fresh_needed`` of them

    @property
    def pinned(self) -> int:
        return self.state.pinned

    def _geometry(self) -> tuple[int, int, int]:
        """(first own candidate, own candidates kept as targets, shared tail columns)."""
        q, n, p = self.state.pinned, self.length, self.protected
        window, keep = self.state.params.window, self.state.params.budget - self.state.params.window
        own_start = max(p, q) - q
        own = max(0, n - window - q - own_start)
        return own_start, min(keep, own), max(0, p - (n - window))

    @property
    def fresh_needed(self) -> int:
        """Slots it needs beyond its own: targets its own candidates cannot provide, and copies of
        the shared columns in its recency tail."""
        _, kept_own, shared_tail = self._geometry()
        return self.state.params.budget - self.state.params.window - kept_own + shared_tail

    @property
    def protected_after(self) -> int:
        """Tree columns it still reads after this eviction: only pinned ones."""
        return min(self.protected, self.state.pinned)


@dataclass
class RoundResult:
    freed: list[torch.Tensor] = field(default_factory=list)  # slot ids to give back to the allocator
    evicted: list[Eviction] = field(default_factory=list)  # compacted: lower their lengths to q + B
    failed: list[tuple[Eviction, BaseException]] = field(default_factory=list)  # abort these
    deferred: list[Eviction] = field(default_factory=list)  # no fresh slots this round: untouched

    def freed_slots(self) -> torch.Tensor | None:
        return torch.cat(self.freed) if self.freed else None


# claim(members) gives each member needing them ``fresh_needed`` slots (``Eviction.fresh``) and returns
# the members it could not serve.
Claim = Callable[[list[Eviction]], list[Eviction]]


def evict(
    due: list[Eviction],
    req_to_token: torch.Tensor,
    k_buffers: list[torch.Tensor],
    v_buffers: list[torch.Tensor],
    device: DeviceState,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    claim: Claim | None = None,
) -> RoundResult:
    """Compact every due request's KV, rewrite its row, and update its state."""
    groups: dict[tuple, list[Eviction]] = defaultdict(list)
    for e in due:
        groups[(e.state.params, e.length - e.pinned)].append(e)
    result = RoundResult()
    for (params, g), members in groups.items():
        shape = _Shape.of(params.build_policy(), g, k_buffers[0], device, len(k_buffers))
        per_request, heads = shape.plan(workspace_bytes)
        for i in range(0, len(members), per_request):
            _evict_batch(members[i : i + per_request], shape, heads, req_to_token, k_buffers, v_buffers,
                         device, claim, result)
    return result


@dataclass(frozen=True)
class _Shape:
    """What one group's eviction touches, for planning its transient memory."""

    policy: Policy
    g: int  # evictable length n - q: the candidates and the recency tail
    layers: int
    h_kv: int
    group: int
    head_dim: int
    itemsize: int
    kernel: bool  # attention and value range come from the Triton kernel straight from the pool

    @classmethod
    def of(cls, policy: Policy, g: int, k_buf: torch.Tensor, device: DeviceState, layers: int) -> "_Shape":
        h_kv, d = k_buf.shape[1], k_buf.shape[2]
        kernel = policy.needs_queries and policy.kernel_scoring() is not None and use_triton(k_buf)
        return cls(policy, g, layers, h_kv, device.ring.shape[3] // h_kv, d, k_buf.element_size(), kernel)

    def per_head_bytes(self) -> tuple[int, int]:
        """(bytes of one layer's selection, bytes held across layers) per request and KV head."""
        n, k, w, g, d = self.g - self.policy.window, self.policy.n_keep, self.policy.window, self.group, self.head_dim
        scores = 8 * n * 4  # scores, pin scores, noise, keys and their scatter/where copies (fp32)
        queries = g * w * d * (self.itemsize + 4) if self.policy.needs_queries else 0
        if self.kernel and not self.policy.reads_kv:
            select = scores + queries
        else:  # gathered K/V, fp32 copies, GQA-repeated keys, logits and softmax over [g, W, N]
            select = scores + queries + 2 * n * d * (self.itemsize + 4) + g * n * d * 4 + 2 * g * w * n * 4
        # keep sets; the compaction temporary (K kept + up to R copied tail columns)
        held = self.layers * k * 8 + 2 * (k + w) * d * self.itemsize
        return select, held

    def transient_bytes(self, requests: int, heads: int) -> int:
        select, held = self.per_head_bytes()
        return requests * (heads * select + self.h_kv * held)

    def plan(self, workspace_bytes: int) -> tuple[int, int]:
        """(requests per batch, KV heads per selection chunk) within ``workspace_bytes`` (at least 1, 1)."""
        select, held = self.per_head_bytes()
        per_request = self.h_kv * (select + held)
        if per_request <= workspace_bytes:
            return max(1, workspace_bytes // per_request), self.h_kv
        return 1, max(1, min(self.h_kv, (workspace_bytes - self.h_kv * held) // select))


def _evict_batch(members, shape, heads, req_to_token, k_buffers, v_buffers, device, claim, result) -> None:
    try:
        batch = _Batch(members, shape, req_to_token, device)
        keeps = batch.select(k_buffers, v_buffers, heads)
    except Exception as e:  # noqa: BLE001 -- reported to the caller, which aborts the request
        if len(members) > 1:
            for m in members:  # find the member(s) it belongs to; the others evict alone
                _evict_batch([m], shape, heads, req_to_token, k_buffers, v_buffers, device, claim, result)
        else:
            result.failed.append((members[0], e))
        return
    if claim is not None and any(m.fresh_needed or m.protected_after < m.protected for m in members):
        unserved = claim(members)
        if unserved:
            result.deferred.extend(unserved)
            kept = [i for i, m in enumerate(members) if m not in unserved]
            if not kept:
                return
            index = torch.tensor(kept, device=keeps[0].device)
            members = [members[i] for i in kept]
            keeps = [k.index_select(0, index) for k in keeps]
            batch = _Batch(members, shape, req_to_token, device)
    try:
        result.freed.append(batch.apply(keeps, k_buffers, v_buffers))
    except Exception as e:  # noqa: BLE001
        result.failed.extend((m, e) for m in members)
        return
    result.evicted.extend(members)


class _Batch:
    """Requests of one (settings, n - q) evicted together."""

    def __init__(self, members: list[Eviction], shape: _Shape, req_to_token: torch.Tensor, device: DeviceState):
        self.members, self.shape, self.req_to_token, self.device = members, shape, req_to_token, device
        dev = req_to_token.device
        host = torch.tensor([[e.row, e.state.ring_row, e.state.seed, e.state.evictions, e.pinned, e.length]
                             for e in members], dtype=torch.int64)
        # One copy for all per-request scalars; pinned, so it does not wait for the device.
        host = host.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else host.to(dev)
        self.rows, self.ring_rows, self.seeds, self.evictions, self.starts, self.lengths = host.unbind(1)
        g, r = shape.g, shape.policy.window
        columns = self.starts[:, None] + torch.arange(g, device=dev)
        self.slots = req_to_token[self.rows[:, None], columns].long()  # [Bq, g]: columns q..n-1
        self.cand = self.slots[:, : g - r]
        last = self.lengths - 1 + device.position_offset[self.rows]  # true position of each newest token
        self.query_slots = device.window_slots(last, r) if shape.policy.needs_queries else None

    def select(self, k_buffers, v_buffers, heads: int) -> list[torch.Tensor]:
        """Keep sets ``[Bq, H_kv, K]`` of every layer; reads the pool only."""
        _inject_fault("select", self.members)
        policy, shape = self.shape.policy, self.shape
        keeps = []
        for layer, (k_buf, v_buf) in enumerate(zip(k_buffers, v_buffers)):
            parts = []
            for h0 in range(0, shape.h_kv, heads):
                h1 = min(h0 + heads, shape.h_kv)
                parts.append(self._select_heads(policy, layer, k_buf[:, h0:h1], v_buf[:, h0:h1], h0))
            keeps.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
        return keeps

    def _select_heads(self, policy, layer, k_buf, v_buf, h0) -> torch.Tensor:
        g = self.shape.group
        queries = None
        if policy.needs_queries:
            queries = self.device.window_queries(self.ring_rows, layer, self.query_slots,
                                                 heads=slice(h0 * g, (h0 + k_buf.shape[1]) * g))
        precomputed = None
        if self.shape.kernel:
            spec = policy.kernel_scoring()
            attn, vrange = score_candidates(k_buf, v_buf, self.cand, queries.transpose(1, 2), **spec)
            precomputed = {("attention", spec["temperature"], spec["smoothing"]): attn,
                           ("value_range", spec["n_sink"]): vrange}
        if self.shape.kernel and not policy.reads_kv:
            # The policy reads only the precomputed scores: stand-ins of the candidates' shape.
            keys = values = k_buf.new_zeros(()).expand(self.cand.shape[0], k_buf.shape[1], *self.cand.shape[1:],
                                                       k_buf.shape[2])
        else:
            keys = k_buf[self.cand].permute(0, 2, 1, 3)  # [Bq, H, N, D]
            values = v_buf[self.cand].permute(0, 2, 1, 3)
        return select_keep(policy, keys, values, queries, self.seeds, self.evictions, layer,
                           precomputed=precomputed, head_offset=self.device.head_offset + h0)

    def apply(self, keeps: list[torch.Tensor], k_buffers, v_buffers) -> torch.Tensor:
        """Compact every layer, rewrite the rows, move the offsets; returns the freed slot ids."""
        _inject_fault("apply", self.members)
        g, b, r = self.shape.g, self.shape.policy.budget, self.shape.policy.window
        k = b - r
        if all(m.protected <= m.pinned for m in self.members):
            # Every candidate is the request's own: keep in the first K candidate slots.
            for k_buf, v_buf, keep in zip(k_buffers, v_buffers, keeps):
                compact_(_storage(k_buf), _storage(v_buf), self.cand, keep)
            new_row = torch.cat([self.cand[:, :k], self.slots[:, g - r :]], dim=1)
            freed = self.cand[:, k:].reshape(-1)
        else:
            targets, sources, new_row, freed = self._copy_on_evict_layout(k)
            width = targets.shape[1]
            slots = torch.cat([targets, self.slots], dim=1)
            for k_buf, v_buf, keep in zip(k_buffers, v_buffers, keeps):
                full_keep = torch.cat([keep + width, sources[:, None, :].expand(-1, keep.shape[1], -1)], dim=2)
                compact_(_storage(k_buf), _storage(v_buf), slots, full_keep)
        if os.environ.get(TRACE_DIR_ENV):
            _save_trace(self.members, self.shape.g, torch.stack(keeps, dim=1).cpu())
        columns = self.starts[:, None] + torch.arange(b, device=self.rows.device)
        self.req_to_token[self.rows[:, None], columns] = new_row.to(self.req_to_token.dtype)
        self.device.position_offset[self.rows] += self.lengths - self.starts - b
        for e in self.members:
            e.state.record(e.length - e.pinned - b)
        return freed

    def _copy_on_evict_layout(self, k: int):
        """Targets and extra sources of a batch in which some request reads shared tree columns.

        Returns ``targets [Bq, K + T]`` (its K targets, then T tail-copy targets), ``sources [Bq, T]``
        (indices into ``[targets, slots]`` of what the copy targets receive), the new rows ``[Bq, B]``
        and the freed slots. T is the batch's largest count of shared tail columns; a request with
        fewer pads with a copy of its newest (own) tail slot onto itself.
        """
        g, r = self.shape.g, self.shape.policy.window
        copies = max(m._geometry()[2] for m in self.members)
        width = k + copies
        targets, sources, rows, freed = [], [], [], []
        for i, m in enumerate(self.members):
            own_start, kept_own, shared_tail = m._geometry()
            own = self.cand[i, own_start:]
            fresh = m.fresh.to(own) if m.fresh is not None else own[:0]
            if fresh.numel() != m.fresh_needed:
                raise RuntimeError(f"request {m.state.rid} needs {m.fresh_needed} fresh slots, got {fresh.numel()}")
            tail = self.slots[i, g - r :]
            tail_targets = torch.cat([fresh[k - kept_own :], tail[shared_tail:]])
            pad = copies - shared_tail
            targets.append(torch.cat([own[:kept_own], fresh[: k - kept_own], tail_targets[:shared_tail],
                                      tail[r - 1 :].expand(pad)]))
            sources.append(torch.cat([torch.arange(shared_tail, device=own.device) + width + g - r,
                                      torch.full((pad,), width + g - 1, device=own.device)]))
            rows.append(torch.cat([own[:kept_own], fresh[: k - kept_own], tail_targets]))
            freed.append(own[kept_own:])
        return torch.stack(targets), torch.stack(sources), torch.stack(rows), torch.cat(freed)


def _storage(buf: torch.Tensor) -> torch.Tensor:
    """The buffer as same-size integers: compaction moves bytes, whatever the KV dtype (fp8 too)."""
    return buf.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[buf.element_size()])


def _inject_fault(stage: str, members: list[Eviction]) -> None:
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        where, _, needle = spec.partition(":")
        for e in members:
            if where == stage and needle and needle in e.state.rid:
                raise RuntimeError(f"injected {stage} failure ({FAULT_ENV}) for request {e.state.rid}")


def _trace_path(state: RequestState, eviction: int) -> str:
    return os.path.join(os.environ[TRACE_DIR_ENV], f"{state.rid}-{eviction}.pt")


def _save_trace(members: list[Eviction], g: int, keep: torch.Tensor) -> None:
    """keep: ``[Bq, L, H_kv, K]``."""
    for j, e in enumerate(members):
        torch.save({"rid": e.state.rid, "eviction": e.state.evictions, "length": e.length, "evictable": g,
                    "keep": keep[j].clone()}, _trace_path(e.state, e.state.evictions))


def discard_trace(state: RequestState) -> None:
    """Drop the trace of an eviction taken back (``RequestState.settle``): its index is reused."""
    if os.environ.get(TRACE_DIR_ENV):
        path = _trace_path(state, state.evictions)
        if os.path.exists(path):
            os.remove(path)
