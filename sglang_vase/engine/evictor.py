"""One eviction round for the requests that reached their trigger, batched across requests and layers.

For each request with physical length n, of which the first q columns are the kept prompt (the prompt with
keep_prompt, else q = 0), K = B - R (VASE_SPEC, "One eviction"; SGLANG_NOTES, "the key design
fact"):

    row      = req_to_token[r, :n]
    cand     = row[q : n-R]                  the n - R - q candidates; row[n-R : n] is the recency tail
    keep     = [L, H_kv, K] per-head indices into cand
    targets  = K slots the request owns      (see below)
    per layer: K_l[targets, h] = K_l[cand[keep[l, h]], h]   (V likewise; every source read first)
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

Requests that share their settings (the seed aside: each member draws its own noise) and n - q are
evicted together: in steady state every request of one budget evicts at n - q = B + R, so a round is
one batch. A batch covers every layer at once: one scoring pass (three Triton launches), one
selection over ``[Bq, L, H_kv, N]``, one compaction launch, so its kernel launches do not grow with
the layer count (``benchmarks/bench_kernels.py --rounds`` counts them). It runs in phases so that a
failure hurts only the request it belongs to:
1. select: the keep sets of every layer, reading the pool only. If it raises for a batch, each
   member is retried alone and only the members that still fail are reported; the others then go
   through the next phases one at a time, so that a failure there stays with its request too.
2. claim: the caller hands out fresh slots (and releases the tree slots the members stop reading).
3. apply: compaction and row rewrite. If it raises, the batch's members are reported (their KV may
   be half compacted; their rows and lengths are untouched, so their slots free normally; the
   caller frees their fresh slots).
4. commit: offsets and counters of the members that evicted.
The caller aborts the reported requests; every other request evicts as usual.

Tensor parallelism: every rank runs the same round on its own KV heads, and the ranks must keep
running the same batches. A failure on one rank only (an out-of-memory, say) would abort a request
there alone, so ``agree`` (a MAX all-reduce over the TP group's CPU group, on host integers: no
device sync) makes them agree after phase 1 (a member that failed anywhere is failed everywhere,
before any rank claims or writes for it) and after phase 3 (a member evicted on one rank but failed
or deferred on another is failed everywhere: where it was compacted its row is restored, so every
rank frees the same slots when it is aborted). Every rank calls ``agree`` the same number of times,
whatever happened locally: once after phase 1, once per claim-and-apply group after phase 3.

Transient memory is bounded by ``workspace_bytes``: requests are split into batches, and a single
request's layers (and, if need be, KV heads) into selection chunks (heads are independent and draw
their noise by global head index, layers by their index: any split keeps exactly the same tokens).
``_Shape.transient_bytes`` states the bound.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch

from sglang_vase.config import DEFAULT_WORKSPACE_MB, VaseParams
from sglang_vase.engine import hooks
from sglang_vase.engine.selection import select_keep
from sglang_vase.engine.state import DeviceState, RequestState
from sglang_vase.kernels import compact_, score_candidates
from sglang_vase.kernels.compaction import scratch_bytes
from sglang_vase.kernels.scoring import gather_candidates, gather_queries, max_splits
from sglang_vase.kernels._dispatch import Route, as_bytes, pow2_at_least
from sglang_vase.policies.base import KernelScoring, Policy, Precomputed

logger = logging.getLogger(__name__)

# The compaction kernel's scratch takes at most this share of the workspace.
SCRATCH_SHARE = 4

_OK, _DEFERRED, _FAILED = 0, 1, 2


@dataclass
class Eviction:
    """A request due for eviction: its req_to_token row, physical length, state, and the columns
    below ``protected`` that belong to the radix tree."""

    row: int
    length: int
    state: RequestState
    protected: int = 0
    fresh: torch.Tensor | None = None  # the slots ``claim`` handed it, ``fresh_needed`` of them
    forced: bool = False  # by the pool's shortage (pressure mode), not by its trigger

    @property
    def kept_prompt(self) -> int:
        return self.state.kept_prompt

    def _columns(self) -> tuple[int, int, int]:
        """(first own candidate, own candidates kept as targets, shared tail columns)."""
        q, n, p = self.state.kept_prompt, self.length, self.protected
        window, keep = self.state.params.window, self.state.geometry.n_keep
        own_start = max(p, q) - q
        own = max(0, n - window - q - own_start)
        return own_start, min(keep, own), max(0, p - (n - window))

    @property
    def fresh_needed(self) -> int:
        """Slots it needs beyond its own: targets its own candidates cannot provide, and copies of
        the shared columns in its recency tail."""
        _, kept_own, shared_tail = self._columns()
        return self.state.geometry.n_keep - kept_own + shared_tail

    @property
    def protected_after(self) -> int:
        """Tree columns it still reads after this eviction: only the kept prompt's."""
        return min(self.protected, self.state.kept_prompt)


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
# agree(codes) -> the element-wise maximum of ``codes`` (int64, CPU) over the tensor-parallel ranks.
Agree = Callable[[torch.Tensor], torch.Tensor]


def agree_over(group) -> Agree:
    """``Agree`` over a torch.distributed process group (SGLang's TP group's CPU group: gloo)."""

    def agree(codes: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(codes, op=torch.distributed.ReduceOp.MAX, group=group)
        return codes

    return agree


class RankDisagreement(RuntimeError):
    """The other tensor-parallel ranks could not evict this request; it is aborted on every rank."""


def evict(
    due: list[Eviction],
    req_to_token: torch.Tensor,
    k_buffers: list[torch.Tensor],
    v_buffers: list[torch.Tensor],
    device: DeviceState,
    workspace_bytes: int = DEFAULT_WORKSPACE_MB << 20,
    claim: Claim | None = None,
    agree: Agree | None = None,
) -> RoundResult:
    """Compact every due request's KV, rewrite its row, and update its state."""
    groups: dict[tuple, list[Eviction]] = defaultdict(list)
    for e in due:
        # One policy object per setting (``VaseParams.build_policy`` caches them); seeds stay per member.
        groups[(e.state.policy, e.length - e.kept_prompt)].append(e)
    result = RoundResult()
    for (policy, evictable), members in groups.items():
        shape = _Shape.of(policy, evictable, k_buffers[0], device, len(k_buffers))
        plan = shape.plan(workspace_bytes)
        for i in range(0, len(members), plan.requests):
            _evict_batch(members[i : i + plan.requests], shape, plan, req_to_token, k_buffers, v_buffers, device,
                         claim, agree, result)
    for _, error in result.failed:
        _detach_traceback(error)
    return result


def _detach_traceback(error: BaseException | None) -> None:
    """Replace a reported error's traceback (and those of the errors it was raised from) by its text,
    kept as a note that the log prints. Its frames hold the batch's tensors, ``agree`` (the TP group)
    and, through their callers, the result that holds the error: a cycle that only the garbage
    collector frees, holding the workspace meanwhile, and at exit a process group past its
    destruction (gloo then aborts the process)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if error.__traceback__ is not None:
            error.add_note("Traceback (most recent call last):\n" + "".join(traceback.format_tb(error.__traceback__)))
            error.__traceback__ = None
        error = error.__cause__ or error.__context__


def requests_per_batch(params: VaseParams, k_buf: torch.Tensor, device: DeviceState, layers: int) -> int:
    """How many requests of ``params`` one batch evicts at their steady-state trigger (n - q = B + R)
    within the workspace: each batch costs a fixed number of kernel launches (what the startup log
    tells a user who weighs ``--vase-workspace-mb``)."""
    shape = _Shape.of(params.build_policy(), params.budget + params.window, k_buf, device, layers)
    return shape.plan(params.workspace_mb << 20).requests


@dataclass(frozen=True)
class _Plan:
    requests: int  # per batch
    layers: int  # per selection chunk
    heads: int  # per selection chunk (fewer than all only with one layer per chunk)
    scratch_bytes: int  # the compaction kernel's scratch bound (0 on the torch path)


@dataclass(frozen=True)
class _Shape:
    """What one group's eviction touches, for planning its transient memory."""

    policy: Policy
    evictable: int  # evictable length n - q: the candidates and the recency tail
    layers: int
    h_kv: int
    group: int
    head_dim: int
    itemsize: int
    scoring: KernelScoring | None  # attention and value range come from ``score_candidates``
    route: Route  # Triton or torch, for scoring and for compaction and noise
    ring_depth: int  # the query ring's depth (the server's window): the scoring kernel's query block
    device: torch.device

    @classmethod
    def of(cls, policy: Policy, evictable: int, k_buf: torch.Tensor, device: DeviceState, layers: int) -> "_Shape":
        h_kv, d = k_buf.shape[1], k_buf.shape[2]
        return cls(policy, evictable, layers, h_kv, device.ring.q_heads // h_kv, d, k_buf.element_size(),
                   policy.kernel_scoring(), Route.of(k_buf), device.ring.window, k_buf.device)

    def per_head_bytes(self, chunk_layers: int, chunk_heads: int) -> tuple[int, int, int]:
        """(one layer's selection, one layer's keep set held to the end, one layer's torch
        compaction temporary) per request and KV head, when a selection chunk holds at least
        ``chunk_layers`` layers and ``chunk_heads`` KV heads of each of its requests."""
        n, k, w = self.evictable - self.policy.window, self.policy.n_keep, self.policy.window
        group, d = self.group, self.head_dim
        # The selection's temporaries: pin scores, noise, keys, top-k values and indices, the keep set.
        # Measured with the torch profiler over [1, 40, 8, 4096] scores: 12 (snapkv), 32 (vase) and 54
        # (vase-adaptive, its median) bytes per candidate; 56 bounds them all.
        select = 56 * n
        if self.scoring is not None:
            # attention (and its unsmoothed copy) and value range, held while the chunk selects
            select += 3 * n * 4
            if self.route.scoring:  # pass 1's partial softmax statistics (fewer splits the more rows)
                splits = max_splits(n, chunk_layers * chunk_heads * group, self.device)
                select += group * splits * pow2_at_least(self.ring_depth) * 8
            else:  # the reference gathers K, V and the queries, and forms the [W, N] softmax
                select += 2 * n * d * (self.itemsize + 4) + group * n * d * 4 + group * w * d * (self.itemsize + 4)
                select += 2 * group * w * n * 4
        if self.policy.reads_kv:  # gathered K/V and their fp32 copies, GQA-repeated keys
            select += 2 * n * d * (self.itemsize + 4) + group * n * d * 4 + group * w * d * (self.itemsize + 4)
        keep = 3 * (k + w) * 8  # the keep set, and on the copy-on-evict path two shifted copies
        temp = 0 if self.route.compaction else 2 * (k + w) * d * self.itemsize
        return select, keep, temp

    def scratch_bytes(self, workspace_bytes: int) -> int:
        """The compaction kernel's scratch: at most ``1 / SCRATCH_SHARE`` of the workspace, at least
        one program's."""
        if not self.route.compaction:
            return 0
        row = scratch_bytes(1, self.policy.n_keep + self.policy.window, self.head_dim, self.itemsize)
        return max(row, workspace_bytes // SCRATCH_SHARE // row * row)

    def transient_bytes(self, plan: _Plan) -> int:
        """Transient memory of one batch under ``plan``."""
        select, keep, temp = self.per_head_bytes(plan.layers, plan.heads)
        return (plan.requests * (plan.layers * plan.heads * select + self.layers * self.h_kv * keep + self.h_kv * temp)
                + plan.scratch_bytes)

    def plan(self, workspace_bytes: int) -> _Plan:
        """Requests per batch and the selection chunk within ``workspace_bytes`` (at least 1, 1, 1)."""
        select, keep, temp = self.per_head_bytes(self.layers, self.h_kv)
        scratch = self.scratch_bytes(workspace_bytes)
        room = workspace_bytes - scratch
        held = self.layers * self.h_kv * keep + self.h_kv * temp
        per_request = self.layers * self.h_kv * select + held
        if per_request <= room:
            return _Plan(room // per_request, self.layers, self.h_kv, scratch)
        select = self.per_head_bytes(1, self.h_kv)[0]  # chunks of whole layers: at least one
        layers = (room - held) // (self.h_kv * select)
        if layers >= 1:
            return _Plan(1, min(self.layers, layers), self.h_kv, scratch)
        select = self.per_head_bytes(1, 1)[0]
        return _Plan(1, 1, max(1, min(self.h_kv, (room - held) // select)), scratch)


def _evict_batch(members, shape, plan, req_to_token, k_buffers, v_buffers, device, claim, agree, result) -> None:
    # 1. select, each member alone if the batch fails
    batch, keeps, errors = None, None, {}
    try:
        batch = _Batch(members, shape, req_to_token, device)
        keeps = batch.select(k_buffers, v_buffers, plan)
    except Exception as e:  # noqa: BLE001 -- reported to the caller, which aborts the request
        batch = None
        if len(members) == 1:
            errors[0] = e
        else:
            alone = []
            for i, m in enumerate(members):
                try:
                    alone.append(_Batch([m], shape, req_to_token, device).select(k_buffers, v_buffers, plan))
                except Exception as e1:  # noqa: BLE001
                    errors[i] = e1
                    alone.append(None)
            keeps = alone
    failed_anywhere = _agree(agree, [_FAILED if i in errors else _OK for i in range(len(members))])
    survivors = [i for i in range(len(members)) if failed_anywhere[i][0] == _OK]
    for i in range(len(members)):
        if failed_anywhere[i][0] != _OK:
            result.failed.append((members[i], errors.get(i) or RankDisagreement(
                "eviction failed for this request on another tensor-parallel rank")))
    # Members that read radix-tree columns claim fresh slots after their tree lock is released, so a
    # member's fresh slots may be tree slots another member of the batch still reads: they go one at
    # a time, each compacted before the next one claims (every rank decides alike: host state).
    # After a failure (on any rank) the others go one at a time too, so that a failure in the next
    # phases stays with its request.
    alone = [i for i in survivors if members[i].protected > members[i].kept_prompt]
    together = [i for i in survivors if i not in alone]
    if len(survivors) < len(members):
        alone, together = survivors, []
    if together:
        reuse = batch if len(together) == len(members) else None
        _claim_and_apply([members[i] for i in together], _rows(keeps, together), shape, plan, req_to_token,
                         k_buffers, v_buffers, device, claim, agree, result, reuse)
    for i in alone:
        _claim_and_apply([members[i]], _rows(keeps, [i]), shape, plan, req_to_token, k_buffers, v_buffers,
                         device, claim, agree, result)


def _claim_and_apply(members, keeps, shape, plan, req_to_token, k_buffers, v_buffers, device, claim, agree,
                     result, batch: "_Batch | None" = None) -> None:
    # 2. claim
    status, error = [_OK] * len(members), None
    if claim is not None and any(m.fresh_needed or m.protected_after < m.protected for m in members):
        try:
            unserved = claim(members)
            status = [_DEFERRED if m in unserved else _OK for m in members]
        except Exception as e:  # noqa: BLE001 -- every member fails; the caller frees what was handed out
            error, status = e, [_FAILED] * len(members)
    served = [i for i, s in enumerate(status) if s == _OK]

    # 3. apply
    freed = None
    if served:
        try:
            if batch is None or len(served) < len(members):
                batch = _Batch([members[i] for i in served], shape, req_to_token, device)
            freed = batch.apply(_rows(keeps, served), k_buffers, v_buffers, plan.scratch_bytes)
        except Exception as e:  # noqa: BLE001
            error = e
            for i in served:
                status[i] = _FAILED

    # 4. agree, then commit the members evicted on every rank
    outcome = _agree(agree, status)
    committed = [j for j, i in enumerate(served) if status[i] == _OK and outcome[i][0] == _OK]
    for i, m in enumerate(members):
        high, low = outcome[i]
        if high == low == _DEFERRED:
            result.deferred.append(m)
        elif high != _OK or low != _OK:
            if status[i] == _OK:  # compacted here, failed or deferred on another rank: put its row back
                batch.restore(served.index(i))
                logger.error("sglang-vase: request %s evicted on this rank but not on another one; aborting it on "
                             "every rank", m.state.rid)
            result.failed.append((m, error if status[i] == _FAILED and error is not None else RankDisagreement(
                "eviction failed or was deferred for this request on another tensor-parallel rank")))
    if committed:
        batch.commit(committed)
        result.freed.extend(freed[j] for j in committed)
        result.evicted.extend(batch.members[j] for j in committed)


def _agree(agree: Agree | None, codes: list[int]) -> list[tuple[int, int]]:
    """(highest, lowest) of each member's code over the tensor-parallel ranks (this rank's alone
    without tensor parallelism). One small CPU all-reduce, whatever the codes."""
    if agree is None:
        return [(c, c) for c in codes]
    both = agree(torch.tensor([[c, -c] for c in codes], dtype=torch.int64))
    return [(int(high), -int(neg_low)) for high, neg_low in both.tolist()]


def _rows(keeps, index: list[int]) -> torch.Tensor:
    """The keep sets of members ``index``: ``keeps`` is one ``[Bq, L, H, K]`` tensor or a list of
    ``[1, L, H, K]`` (members selected alone). Host-side indexing: views and one stack, no
    host-to-device copy of the index."""
    if isinstance(keeps, torch.Tensor):
        if index == list(range(keeps.shape[0])):
            return keeps
        return keeps[index[0] : index[0] + 1] if len(index) == 1 else torch.stack([keeps[i] for i in index])
    return keeps[index[0]] if len(index) == 1 else torch.cat([keeps[i] for i in index])


class _Batch:
    """Requests of one (settings, n - q) evicted together."""

    def __init__(self, members: list[Eviction], shape: _Shape, req_to_token: torch.Tensor, device: DeviceState):
        self.members, self.shape, self.req_to_token, self.device = members, shape, req_to_token, device
        dev = req_to_token.device
        host = _to_device(torch.tensor([[e.row, e.state.ring_row, e.state.seed, e.state.evictions, e.kept_prompt,
                                         e.length] for e in members], dtype=torch.int64), dev)
        self.rows, self.ring_rows, self.seeds, self.evictions, self.starts, self.lengths = host.unbind(1)
        g, r = shape.evictable, shape.policy.window
        columns = self.starts[:, None] + torch.arange(g, device=dev)
        self.slots = req_to_token[self.rows[:, None], columns].long()  # [Bq, g]: columns q..n-1
        self.cand = self.slots[:, : g - r]
        last = self.lengths - 1 + device.position_offset[self.rows]  # true position of each newest token
        # Ring slots of each request's window (the ring is indexed by true position % its depth).
        self.window_slots = device.ring.window_slots(last, r) if shape.policy.needs_queries else None

    def select(self, k_buffers, v_buffers, plan: _Plan) -> torch.Tensor:
        """Keep sets ``[Bq, L, H_kv, K]`` of every layer; reads the pool only."""
        if hooks.HOOKS.faults:
            hooks.HOOKS.fail("select", [e.state.rid for e in self.members])
        chunks = []
        for l0 in range(0, self.shape.layers, plan.layers):
            layers = range(l0, min(l0 + plan.layers, self.shape.layers))
            heads = [self._select(k_buffers[layers.start : layers.stop], v_buffers[layers.start : layers.stop],
                                  layers, h0, min(h0 + plan.heads, self.shape.h_kv))
                     for h0 in range(0, self.shape.h_kv, plan.heads)]
            chunks.append(torch.cat(heads, dim=2) if len(heads) > 1 else heads[0])
        return torch.cat(chunks, dim=1) if len(chunks) > 1 else chunks[0]

    def _select(self, k_layers, v_layers, layers: range, h0: int, h1: int) -> torch.Tensor:
        """Keep sets ``[Bq, len(layers), h1 - h0, K]``."""
        policy, shape = self.shape.policy, self.shape
        k_layers = [b[:, h0:h1] for b in k_layers]
        v_layers = [b[:, h0:h1] for b in v_layers]
        bq, n, d = self.cand.shape[0], self.cand.shape[1], shape.head_dim
        lead = (bq, len(layers), h1 - h0)
        ring = self.device.ring.view(layers, slice(h0 * shape.group, h1 * shape.group))
        precomputed = None
        if (spec := shape.scoring) is not None:
            attn, vrange = score_candidates(k_layers, v_layers, self.cand, ring, self.ring_rows, self.window_slots,
                                            temperature=spec.temperature, n_sink=spec.n_sink,
                                            smoothing=spec.smoothing, triton_path=shape.route.scoring)
            precomputed = Precomputed(spec, attn, vrange)
        if policy.reads_kv:
            keys, values = gather_candidates(k_layers, self.cand), gather_candidates(v_layers, self.cand)
        else:  # the policy reads only the precomputed scores and the shapes: zero-size stand-ins
            keys = values = k_layers[0].new_zeros(()).expand(*lead, n, d)
        queries = None
        if policy.needs_queries:
            if policy.reads_kv or shape.scoring is None:
                queries = gather_queries(ring, self.ring_rows, self.window_slots)
            else:
                queries = ring.new_zeros(()).expand(bq, len(layers), (h1 - h0) * shape.group, policy.window, d)
        return select_keep(policy, keys, values, queries, self.seeds, self.evictions, layers,
                           precomputed=precomputed, head_offset=self.device.head_offset + h0,
                           fused_noise=shape.route.compaction)

    def apply(self, keeps: torch.Tensor, k_buffers, v_buffers, scratch_budget: int) -> list[torch.Tensor]:
        """Compact every layer and rewrite the rows; returns each member's freed slot ids."""
        if hooks.HOOKS.faults:
            hooks.HOOKS.fail("apply", [e.state.rid for e in self.members])
        g, b, r = self.shape.evictable, self.shape.policy.budget, self.shape.policy.window
        k = b - r
        k_storage, v_storage = [as_bytes(t) for t in k_buffers], [as_bytes(t) for t in v_buffers]
        if all(m.protected <= m.kept_prompt for m in self.members):
            # Every candidate is the request's own: keep in the first K candidate slots.
            compact_(k_storage, v_storage, self.cand, keeps, scratch_budget, self.shape.route.compaction)
            new_row = torch.cat([self.cand[:, :k], self.slots[:, g - r :]], dim=1)
            freed = list(self.cand[:, k:].unbind(0))
        else:
            targets, sources, new_row, freed = self._copy_on_evict_layout(k)
            width = targets.shape[1]
            slots = torch.cat([targets, self.slots], dim=1)
            full_keep = torch.cat([keeps + width, sources[:, None, None, :].expand(*keeps.shape[:3], -1)], dim=3)
            compact_(k_storage, v_storage, slots, full_keep, scratch_budget, self.shape.route.compaction)
        if hooks.HOOKS.trace_dir:
            keep = keeps.cpu()  # [Bq, L, H_kv, K]
            hooks.HOOKS.save_trace([{"rid": e.state.rid, "eviction": e.state.evictions, "length": e.length,
                                     "evictable": self.shape.evictable, "keep": keep[j].clone()}
                                    for j, e in enumerate(self.members)])
        columns = self.starts[:, None] + torch.arange(b, device=self.rows.device)
        self.req_to_token[self.rows[:, None], columns] = new_row.to(self.req_to_token.dtype)
        return freed

    def restore(self, i: int) -> None:
        """Put member ``i``'s row back as it was before ``apply`` (its KV stays compacted: it is
        being aborted, and its slots must free as on a rank that never compacted it)."""
        e = self.members[i]
        columns = slice(e.kept_prompt, e.kept_prompt + self.shape.evictable)
        self.req_to_token[e.row, columns] = self.slots[i].to(self.req_to_token.dtype)

    def commit(self, index: list[int]) -> None:
        """Offsets and counters of members ``index`` after their row was rewritten."""
        b = self.shape.policy.budget
        if len(index) == len(self.members):
            self.device.position_offset[self.rows] += self.lengths - self.starts - b
        else:
            for i in index:
                self.device.position_offset[self.rows[i]] += self.lengths[i] - self.starts[i] - b
        for i in index:
            e = self.members[i]
            e.state.record(e.length - e.kept_prompt - b, forced=e.forced)

    def _copy_on_evict_layout(self, k: int):
        """Targets and extra sources of a batch in which some request reads shared tree columns.

        Returns ``targets [Bq, K + T]`` (its K targets, then T tail-copy targets), ``sources [Bq, T]``
        (indices into ``[targets, slots]`` of what the copy targets receive), the new rows ``[Bq, B]``
        and each member's freed slots. T is the batch's largest count of shared tail columns; a
        request with fewer pads with a copy of its newest (own) tail slot onto itself.
        """
        g, r = self.shape.evictable, self.shape.policy.window
        copies = max(m._columns()[2] for m in self.members)
        width = k + copies
        targets, sources, rows, freed = [], [], [], []
        for i, m in enumerate(self.members):
            own_start, kept_own, shared_tail = m._columns()
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
        return torch.stack(targets), torch.stack(sources), torch.stack(rows), freed


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch's only host-to-device copy (its per-request scalars): from pinned memory and
    non-blocking on CUDA, so that it does not wait for the forward in flight (a pageable copy
    would)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def warm_up(k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor], device: DeviceState,
            server: VaseParams) -> float:
    """Compile the Triton kernels at this server's shapes before it serves: one round of a dummy
    request whose every column is slot 0 (SGLang's padding slot, which absorbs dummy writes),
    through the engine's own code path (same dtypes, head counts, ring and strides), with a scratch
    req_to_token row. Lengths, counts and batch-dependent strides are never compiled in
    (``do_not_specialize``), so no later round compiles. Returns the seconds it took."""
    start = time.perf_counter()
    # vase runs every kernel: scoring, noise, compaction
    params = VaseParams(policy="vase", budget=server.budget, window=server.window, workspace_mb=server.workspace_mb)
    length = params.budget + params.window
    table = torch.zeros(1, length, dtype=torch.int32, device=k_buffers[0].device)
    state = RequestState(params, seed=0, rid="sglang-vase-warm-up", prefill_len=length - 1)
    offset = device.position_offset[0].clone()
    result = evict([Eviction(row=0, length=length, state=state)], table, k_buffers, v_buffers, device,
                   workspace_bytes=params.workspace_mb << 20)
    device.position_offset[0] = offset
    if result.failed:
        raise RuntimeError("sglang-vase: the kernel warm-up failed") from result.failed[0][1]
    if k_buffers[0].is_cuda:
        torch.cuda.synchronize(k_buffers[0].device)
    return time.perf_counter() - start
