"""One eviction round for the requests that reached their trigger, batched across requests.

For each request with physical length n (VASE_SPEC, "One eviction"; SGLANG_NOTES, "the key design
fact"):

    row      = req_to_token[r, :n]
    keep     = [L, H_kv, K] per-head indices into the n - R candidates
    per layer: K_l[row[0:K], h] = K_l[row[keep[l, h]], h]   (V likewise; through a temporary)
    new row  = row[0:K] ++ row[n-R:n]        the recency buffer moves by index only
    free       row[K:n-R]                    n - B slots back to the allocator
    length   = B;  position offset += n - B  RoPE positions stay absolute

Requests that share (settings, n) are evicted together: in steady state every request of one
budget evicts at n = B + R, so a round is one batch. A batch runs in two phases so that a failure
hurts only the request it belongs to:
1. select: the keep sets of every layer, reading the pool only. If it raises for a batch, each
   member is retried alone and only the members that still fail are reported.
2. apply: compaction, row rewrite, offsets. If it raises, the batch's members are reported (their
   KV may be half compacted; their rows and lengths are untouched, so their slots free normally).
The caller aborts the reported requests; every other request evicts as usual.

Transient memory is bounded by ``workspace_bytes``: requests are split into batches, and a single
request's KV heads into chunks (heads are independent and draw their noise by global head index,
so any split keeps exactly the same tokens). ``transient_bytes`` states the bound.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

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
    """A request due for eviction: its req_to_token row, ring row, physical length and state."""

    row: int
    length: int
    state: RequestState


@dataclass
class RoundResult:
    freed: list[torch.Tensor] = field(default_factory=list)  # slot ids to give back to the allocator
    evicted: list[Eviction] = field(default_factory=list)  # compacted: lower their lengths to B
    failed: list[tuple[Eviction, BaseException]] = field(default_factory=list)  # abort these

    def freed_slots(self) -> torch.Tensor | None:
        return torch.cat(self.freed) if self.freed else None


def evict(
    due: list[Eviction],
    req_to_token: torch.Tensor,
    k_buffers: list[torch.Tensor],
    v_buffers: list[torch.Tensor],
    device: DeviceState,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> RoundResult:
    """Compact every due request's KV in place, rewrite its row, and update its state."""
    groups: dict[tuple, list[Eviction]] = defaultdict(list)
    for e in due:
        groups[(e.state.params, e.length)].append(e)
    result = RoundResult()
    for (params, n), members in groups.items():
        shape = _Shape.of(params.build_policy(), n, k_buffers[0], device, len(k_buffers))
        per_request, heads = shape.plan(workspace_bytes)
        for i in range(0, len(members), per_request):
            _evict_batch(members[i : i + per_request], shape, heads, req_to_token, k_buffers, v_buffers,
                         device, result)
    return result


@dataclass(frozen=True)
class _Shape:
    """What one group's eviction touches, for planning its transient memory."""

    policy: Policy
    n: int
    layers: int
    h_kv: int
    group: int
    head_dim: int
    itemsize: int
    kernel: bool  # attention and value range come from the Triton kernel straight from the pool

    @classmethod
    def of(cls, policy: Policy, n: int, k_buf: torch.Tensor, device: DeviceState, layers: int) -> "_Shape":
        h_kv, d = k_buf.shape[1], k_buf.shape[2]
        kernel = policy.needs_queries and policy.kernel_scoring() is not None and use_triton(k_buf)
        return cls(policy, n, layers, h_kv, device.ring.shape[3] // h_kv, d, k_buf.element_size(), kernel)

    def per_head_bytes(self) -> tuple[int, int]:
        """(bytes of one layer's selection, bytes held across layers) per request and KV head."""
        n, k, w, g, d = self.n - self.policy.window, self.policy.n_keep, self.policy.window, self.group, self.head_dim
        scores = 8 * n * 4  # scores, pin scores, noise, keys and their scatter/where copies (fp32)
        queries = g * w * d * (self.itemsize + 4) if self.policy.needs_queries else 0
        if self.kernel and not self.policy.reads_kv:
            select = scores + queries
        else:  # gathered K/V, fp32 copies, GQA-repeated keys, logits and softmax over [g, W, N]
            select = scores + queries + 2 * n * d * (self.itemsize + 4) + g * n * d * 4 + 2 * g * w * n * 4
        held = self.layers * k * 8 + 2 * k * d * self.itemsize  # keep sets, compaction temporary
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


def _evict_batch(members, shape, heads, req_to_token, k_buffers, v_buffers, device, result) -> None:
    try:
        batch = _Batch(members, shape, req_to_token, device)
        keeps = batch.select(k_buffers, v_buffers, heads)
    except Exception as e:  # noqa: BLE001 -- reported to the caller, which aborts the request
        if len(members) > 1:
            for m in members:  # find the member(s) it belongs to; the others evict alone
                _evict_batch([m], shape, heads, req_to_token, k_buffers, v_buffers, device, result)
        else:
            result.failed.append((members[0], e))
        return
    try:
        result.freed.append(batch.apply(keeps, k_buffers, v_buffers))
    except Exception as e:  # noqa: BLE001
        result.failed.extend((m, e) for m in members)
        return
    result.evicted.extend(members)


class _Batch:
    """Requests of one (settings, length) evicted together."""

    def __init__(self, members: list[Eviction], shape: _Shape, req_to_token: torch.Tensor, device: DeviceState):
        self.members, self.shape, self.req_to_token, self.device = members, shape, req_to_token, device
        dev = req_to_token.device
        host = torch.tensor([[e.row, e.state.ring_row, e.state.seed, e.state.evictions] for e in members],
                            dtype=torch.int64)
        # One copy for all per-request scalars; pinned, so it does not wait for the device.
        host = host.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else host.to(dev)
        self.rows, self.ring_rows, self.seeds, self.evictions = host.unbind(1)
        n, r = shape.n, shape.policy.window
        self.slots = req_to_token[self.rows, :n].long()  # [Bq, n]
        self.cand = self.slots[:, : n - r]
        last = n - 1 + device.position_offset[self.rows]  # true position of each newest token
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
        n, b, r = self.shape.n, self.shape.policy.budget, self.shape.policy.window
        k = b - r
        for k_buf, v_buf, keep in zip(k_buffers, v_buffers, keeps):
            compact_(_storage(k_buf), _storage(v_buf), self.cand, keep)
        if os.environ.get(TRACE_DIR_ENV):
            _save_trace(self.members, n, torch.stack(keeps, dim=1).cpu())
        # Recency buffer: slots n-R..n-1 move to columns K..B-1 by index.
        self.req_to_token[self.rows, k:b] = self.slots[:, n - r : n].to(self.req_to_token.dtype)
        self.device.position_offset[self.rows] += n - b
        for e in self.members:
            e.state.evictions += 1
            e.state.evicted_tokens += n - b
            e.state.total_evictions += 1
            e.state.total_evicted_tokens += n - b
        return self.slots[:, k : n - r].reshape(-1)


def _storage(buf: torch.Tensor) -> torch.Tensor:
    """The buffer as same-size integers: compaction moves bytes, whatever the KV dtype (fp8 too)."""
    return buf.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[buf.element_size()])


def _inject_fault(stage: str, members: list[Eviction]) -> None:
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        where, _, needle = spec.partition(":")
        for e in members:
            if where == stage and needle and needle in e.state.rid:
                raise RuntimeError(f"injected {stage} failure ({FAULT_ENV}) for request {e.state.rid}")


def _save_trace(members: list[Eviction], n: int, keep: torch.Tensor) -> None:
    """keep: ``[Bq, L, H_kv, K]``."""
    folder = os.environ[TRACE_DIR_ENV]
    for j, e in enumerate(members):
        torch.save(
            {"rid": e.state.rid, "eviction": e.state.evictions, "length": n, "keep": keep[j].clone()},
            os.path.join(folder, f"{e.state.rid}-{e.state.evictions}.pt"),
        )
