"""``Scheduler.get_next_batch_to_run`` (sglang 0.5.23): evict, as the first phase of a scheduling step.

An adapter over ``engine.step``: SGLang's running requests, radix tree and allocator go in as its
``Running`` and ``Slots``; what comes out (lowered lengths, released tree columns, failures) is
written back into SGLang's batch and requests.

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

from sglang.srt.managers.schedule_batch import FINISH_ABORT
from sglang.srt.mem_cache.allocation import alloc_token_slots

from sglang_vase import metrics
from sglang_vase.admission_sglang import take_deficit
from sglang_vase.engine.evictor import agree_over
from sglang_vase.engine.state import device_of, request_state
from sglang_vase.engine.pressure import reclaimable, relieve
from sglang_vase.engine.step import KVPool, due, evict_requests

TARGET = "sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run"
HOOK_TYPE = "BEFORE"

logger = logging.getLogger(__name__)


def hook(self, *args, **kwargs):
    batch = kwargs.get("running_batch", args[0] if args else None)
    if batch is None or batch.is_empty():
        return None
    in_flight = _in_flight(self)
    finishing = set(self._reqs_finishing_inflight(batch))
    running = [_Running(req, self.tree_cache, req in in_flight) for req in batch.reqs
               if request_state(req) is not None and req.kv.holds_kv and not req.finished()
               and req.to_finish is None and not req.is_retracted and req not in finishing]
    requests = due(running)
    slots = _Slots(self)
    need = _decode_need(batch, kwargs.get("last_batch", args[1] if len(args) > 1 else None))
    admission_target = take_deficit(self.tree_cache)
    # The request admission stopped at still waits, and evicting can let it in (never evict for
    # one that would not fit anyway).
    if self.waiting_queue and admission_target <= slots.available() + reclaimable(running):
        need = max(need, admission_target)
    pressed = any(r.state.on_pressure for r in running) and slots.available() < need
    if not requests and not pressed:
        if metrics.enabled():
            metrics.record_kv_used(_held_slots(self, batch))
        return None
    if self.enable_overlap:
        # Forward N wrote the newest token's KV and query and reads the rows this rewrites.
        self.device_module.current_stream().wait_stream(self.forward_stream)
    pool = self.token_to_kv_pool_allocator.get_kvcache()
    layers = range(pool.start_layer, pool.start_layer + pool.layer_num)
    kv = KVPool(self.req_to_token_pool.req_to_token, [pool.get_key_buffer(l) for l in layers],
                [pool.get_value_buffer(l) for l in layers])
    # Tensor parallelism: a failure on one rank only must abort the request on every rank.
    agree = agree_over(self.tp_cpu_group) if self.tp_size > 1 else None
    device = device_of(self.req_to_token_pool)
    result = evict_requests(requests, kv, device, slots, agree)
    if metrics.enabled() and result.evicted:
        metrics.record_evictions(len(result.evicted), result.freed)
    # Pressure mode: the requests keeping their full cache give back what the next decode step or
    # the stuck admission lacks (all ranks see the same lengths and free counts: the same victims).
    failed = {id(r) for r, _ in result.failed}
    forced = relieve([r for r in running if id(r) not in failed], need, kv, device, slots, agree)
    if metrics.enabled() and forced.evicted:
        metrics.record_evictions(len(forced.evicted), forced.freed, forced=True)
    result = result.merge(forced)
    if result.freed:
        # SGLang retries admission only when the batch shrinks; freed slots are room for more.
        batch.batch_is_full = False
    for r in result.deferred:
        logger.warning("sglang-vase: request %s evicts at its next trigger: no free KV slots for its copy of "
                       "shared prefix tokens", r.state.rid)
    for r, error in result.failed:
        _abort(r, error)
    if result.evicted:
        _lower_lengths(self, batch, result.evicted)
    if metrics.enabled():
        metrics.record_kv_used(_held_slots(self, batch))
    return None


def _decode_need(batch, last_batch) -> int:
    """Slots the next decode step allocates: one per request of the running batch and of the
    prefill batch that joins it this step (page size 1; a chunked request is not done prefilling)."""
    joining = 0
    if last_batch is not None and last_batch.forward_mode.is_extend():
        joining = sum(r is not last_batch.chunked_req for r in last_batch.reqs)
    return len(batch.reqs) + joining


class _Running:
    """An SGLang ``Req`` as ``engine.step.Running``."""

    def __init__(self, req, tree, in_flight: bool):
        self.req, self.tree, self.state = req, tree, request_state(req)
        self.row, self.length, self.protected = req.kv.req_pool_idx, req.kv.kv_committed_len, req.kv.cache_protected_len
        self.output_after_in_flight = len(req.output_ids) + 1 if in_flight else None

    def release_tree(self) -> bool:
        if self.req.lock is None:
            return False
        self.tree.unlock(self.req.lock)
        self.req.lock = None
        return True

    def restore_tree(self) -> None:
        self.req.lock = self.tree.lock(self.req.last_node)


class _Slots:
    """SGLang's token-to-KV allocator with the radix tree behind it, as ``engine.step.Slots``."""

    def __init__(self, scheduler):
        self.tree, self.allocator = scheduler.tree_cache, scheduler.token_to_kv_pool_allocator

    def available(self) -> int:
        return self.allocator.available_size() + self.tree.evictable_size()

    def alloc(self, count: int):
        return alloc_token_slots(self.tree, count)

    def free(self, slots) -> None:
        self.allocator.free(slots)


def _in_flight(scheduler) -> set:
    """Requests of the step still in flight (overlap loop), whose result is not processed yet."""
    queue = getattr(scheduler, "result_queue", None)
    return set(queue[0][0].reqs) if queue else set()


def _abort(r: _Running, error: BaseException) -> None:
    """End a request whose eviction failed through SGLang's own finish path, which frees its slots."""
    if r.protected > r.state.kept_prompt:  # its tree lock may be gone: its row must not enter the tree
        _skip_tree_insert(r.req)
    logger.error("sglang-vase: eviction of request %s failed; aborting it", r.req.rid, exc_info=error)
    r.req.to_finish = FINISH_ABORT(
        f"sglang-vase: KV eviction failed for this request ({type(error).__name__}: {error}); "
        f"it was aborted, the server and other requests are unaffected",
        status_code=HTTPStatus.INTERNAL_SERVER_ERROR,
    )


def _lower_lengths(self, batch, evicted: list[_Running]) -> None:
    """SGLang's lengths and tree fields after the compaction (out of place: other holders keep
    their copy of the tensors)."""
    index = {id(req): i for i, req in enumerate(batch.reqs)}
    seq_lens, seq_lens_cpu = batch.seq_lens.clone(), batch.seq_lens_cpu.clone()
    orig = batch.orig_seq_lens.clone() if batch.orig_seq_lens is not None else None
    for r in evicted:
        req, i = r.req, index[id(r.req)]
        kv = req.kv
        kv.kv_committed_len = kv.kv_allocated_len = r.length
        seq_lens[i] = seq_lens_cpu[i] = r.length
        if orig is not None:
            orig[i] = r.length
        if r.protected < kv.cache_protected_len:
            kv.cache_protected_len = r.protected
            if req.lock is None:
                req.last_node = self.tree_cache.root_node_handle(req.extra_key)
        _skip_tree_insert(req)
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
