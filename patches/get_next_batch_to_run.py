"""``Scheduler.get_next_batch_to_run`` (sglang 0.5.23): evict, as the first phase of a scheduling step.

Every request of the running batch whose physical length n reached its trigger is compacted down to
q + B slots before SGLang does anything else this step: before admission (so the freed slots admit
requests in this same step), before ``check_decode_mem`` and retraction, and before
``prepare_for_decode`` allocates the next slot (at column q + B). The trigger is decided from the
lengths the host knows, so one code path serves both of SGLang's loops:

- normal loop: step N was processed before step N + 1 is prepared; n is its physical length.
- overlap loop (SGLang's default): step N + 1 is prepared while step N is in flight. n already
  counts step N's token (allocated when N was prepared), whose KV and query forward N writes. On
  CUDA the eviction is enqueued on the schedule stream after it waits for the forward stream (a
  device-side wait, no host sync), and forward N + 1 waits for the schedule stream, so the order is
  forward N, eviction, forward N + 1. Requests whose in-flight step samples their last token
  (SGLang's ``_reqs_finishing_inflight``) are skipped, as SGLang drops them from the batch; one that
  turns out to stop at step N (EOS, stop string) only wastes its compaction, and
  ``RequestState.settle`` takes the eviction back from its counters when step N is processed.

Lengths are lowered out of place: the in-flight batch and the queued copy of step N keep theirs.
Freed slots go back to the allocator at once; their next users run later on the same stream.

With the radix cache, columns below ``cache_protected_len`` are tree slots: they are read, copied
where kept (``engine.evictor``), never written or freed. In the paper's mode the request then reads
no tree slot: its tree lock is released before its fresh slots are allocated (so the tree may hand
back the prefix only it held), and it owns its whole row from then on. A compacted row never enters
the tree (``skip_radix_cache_insert``). A request whose eviction fails is aborted (HTTP 500 with the
reason) through SGLang's own finish path, which frees its slots; the scheduler and every other
request go on. With tensor parallelism the ranks agree on failed and deferred requests (a MAX
all-reduce of host integers on the TP group's CPU group, after selection and after compaction)
before anything is aborted or lowered, so every rank keeps running the same batch.
"""

import logging
from http import HTTPStatus

import torch
from sglang.srt.managers.schedule_batch import FINISH_ABORT
from sglang.srt.mem_cache.allocation import alloc_token_slots

from sglang_vase import metrics
from sglang_vase.engine import state
from sglang_vase.engine.evictor import Eviction, agree_over, evict
from sglang_vase.engine.state import request_state

TARGET = "sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run"
HOOK_TYPE = "BEFORE"

logger = logging.getLogger(__name__)


def hook(self, *args, **kwargs):
    batch = kwargs.get("running_batch", args[0] if args else None)
    if batch is None or batch.is_empty():
        return None
    in_flight = _in_flight(self)
    finishing = set(self._reqs_finishing_inflight(batch))
    due, reqs = [], {}
    for req in batch.reqs:
        st = request_state(req)
        if (st is None or not req.kv.holds_kv or req.finished() or req.to_finish is not None or req.is_retracted
                or req in finishing):
            continue
        n = req.kv.kv_committed_len
        st.peak_kv_len = max(st.peak_kv_len, n)
        if st.due(n):
            e = Eviction(row=req.kv.req_pool_idx, length=n, state=st, protected=req.kv.cache_protected_len)
            due.append(e)
            reqs[id(e)] = req
    if due:
        _evict(self, batch, due, reqs, in_flight)
    elif metrics.enabled():
        metrics.record_kv_used(_held_slots(self, batch))
    return None


def _in_flight(scheduler) -> set:
    """Requests of the step still in flight (overlap loop), whose result is not processed yet."""
    queue = getattr(scheduler, "result_queue", None)
    return set(queue[0][0].reqs) if queue else set()


def _evict(self, batch, due, reqs, in_flight) -> None:
    if self.enable_overlap:
        # Forward N wrote the newest token's KV and query and reads the rows this rewrites.
        self.device_module.current_stream().wait_stream(self.forward_stream)
    pool = self.token_to_kv_pool_allocator.get_kvcache()
    layers = range(pool.start_layer, pool.start_layer + pool.layer_num)
    round_ = evict(
        due,
        self.req_to_token_pool.req_to_token,
        [pool.get_key_buffer(l) for l in layers],
        [pool.get_value_buffer(l) for l in layers],
        state.DEVICE,
        workspace_bytes=due[0].state.params.workspace_mb << 20,
        claim=lambda members: _claim(self, members, reqs),
        # Tensor parallelism: a failure on one rank only must abort the request on every rank.
        agree=agree_over(self.tp_cpu_group) if self.tp_size > 1 else None,
    )
    allocator = self.token_to_kv_pool_allocator
    freed = round_.freed_slots()
    if freed is not None:
        allocator.free(freed)
        # SGLang retries admission only when the batch shrinks; freed slots are room for more.
        batch.batch_is_full = False
    for e in round_.deferred:
        logger.warning("sglang-vase: request %s evicts at its next trigger: no %d free KV slots for its "
                       "copy of shared prefix tokens", e.state.rid, e.fresh_needed)
    for e, error in round_.failed:
        req = reqs[id(e)]
        if e.fresh is not None:  # claimed but never written into its row
            allocator.free(e.fresh)
        if e.protected_after < e.protected:  # its tree lock may be gone: its row must not enter the tree
            _skip_tree_insert(req)
        logger.error("sglang-vase: eviction of request %s failed; aborting it", req.rid, exc_info=error)
        req.to_finish = FINISH_ABORT(
            f"sglang-vase: KV eviction failed for this request ({type(error).__name__}: {error}); "
            f"it was aborted, the server and other requests are unaffected",
            status_code=HTTPStatus.INTERNAL_SERVER_ERROR,
        )
    if round_.evicted:
        _lower_lengths(self, batch, round_.evicted, reqs, in_flight)
    if metrics.enabled():
        metrics.record_evictions(len(round_.evicted), int(freed.numel()) if freed is not None else 0)
        metrics.record_kv_used(_held_slots(self, batch))


def _claim(self, members, reqs) -> list:
    """Fresh slots for the copies of shared tree columns; releases the tree lock of a request that
    stops reading tree columns first, so the tree can evict the prefix only it held. Returns the
    members it could not serve, their locks restored."""
    tree, allocator = self.tree_cache, self.token_to_kv_pool_allocator
    unserved = []
    for e in members:
        req = reqs[id(e)]
        released = e.protected_after < e.protected and req.lock is not None
        if released:
            tree.unlock(req.lock)
            req.lock = None
        need = e.fresh_needed
        if need and allocator.available_size() + tree.evictable_size() < need:
            if released:  # nothing was evicted since the unlock: the node is still there
                req.lock = tree.lock(req.last_node)
            unserved.append(e)
            continue
        if need:
            e.fresh = alloc_token_slots(tree, need).to(torch.int64)
    return unserved


def _lower_lengths(self, batch, evicted, reqs, in_flight) -> None:
    """SGLang's lengths and tree fields after the compaction (out of place: other holders keep
    their copy of the tensors)."""
    index = {id(r): i for i, r in enumerate(batch.reqs)}
    seq_lens, seq_lens_cpu = batch.seq_lens.clone(), batch.seq_lens_cpu.clone()
    orig = batch.orig_seq_lens.clone() if batch.orig_seq_lens is not None else None
    for e in evicted:
        req = reqs[id(e)]
        i, length = index[id(req)], e.state.geometry.evicted_length
        kv = req.kv
        kv.kv_committed_len = kv.kv_allocated_len = length
        seq_lens[i] = seq_lens_cpu[i] = length
        if orig is not None:
            orig[i] = length
        if e.protected_after < e.protected:
            kv.cache_protected_len = e.protected_after
            if req.lock is None:
                req.last_node = self.tree_cache.root_node_handle(req.extra_key)
        _skip_tree_insert(req)
        if req in in_flight:
            e.state.provisional = (len(req.output_ids) + 1, e.length - e.state.geometry.evicted_length)
    batch.seq_lens, batch.seq_lens_cpu, batch.seq_lens_sum = seq_lens, seq_lens_cpu, None
    if orig is not None:
        batch.orig_seq_lens = orig


def _skip_tree_insert(req) -> None:
    """A compacted row must never be inserted into the radix tree (keyed by token ids, it would
    serve other requests KV of other tokens); retraction restores the flag."""
    st = request_state(req)
    if st.saved_skip_insert is None:
        st.saved_skip_insert = req.skip_radix_cache_insert
    req.skip_radix_cache_insert = True


def _held_slots(self, batch) -> int:
    """Slots running requests hold: their own ones, and the tree slots they lock (once)."""
    own = sum(r.kv.kv_allocated_len - r.kv.cache_protected_len for r in batch.reqs if r.kv.holds_kv)
    return own + self.tree_cache.protected_size()
