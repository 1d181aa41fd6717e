"""``SchedulerBatchResultProcessor.process_batch_result_decode`` (sglang 0.5.23): evict.

After a decode step's tokens are appended and finished requests released, every request whose
physical length reached its trigger (n > B, n % R == 0) is compacted down to B slots; the freed
slots go back to the allocator at once, so the next scheduling round can admit requests into them.
``batch`` is the running batch, which the next decode step continues from.

A request whose eviction fails is aborted (HTTP 500 with the reason) at its next step, through
SGLang's own finish path, which frees its slots; the scheduler and every other request go on.
"""

import logging
from http import HTTPStatus

from sglang.srt.managers.schedule_batch import FINISH_ABORT

from sglang_vase import metrics
from sglang_vase.engine import state
from sglang_vase.engine.evictor import Eviction, evict
from sglang_vase.engine.selection import should_evict
from sglang_vase.engine.state import request_state

TARGET = (
    "sglang.srt.managers.scheduler_components.batch_result_processor."
    "SchedulerBatchResultProcessor.process_batch_result_decode"
)
HOOK_TYPE = "AFTER"

logger = logging.getLogger(__name__)


def hook(result, self, batch, *args, **kwargs):
    due, index = [], {}
    for i, req in enumerate(batch.reqs):
        st = request_state(req)
        if st is None or not req.kv.holds_kv or req.finished() or req.to_finish is not None:
            continue
        n = req.kv.kv_committed_len
        st.peak_kv_len = max(st.peak_kv_len, n)
        if should_evict(n, st.params.budget, st.params.window):
            due.append(Eviction(row=req.kv.req_pool_idx, length=n, state=st))
            index[id(st)] = i
    if not due:
        if metrics.enabled():
            metrics.record_kv_used(_held_slots(batch))
        return None

    pool = self.token_to_kv_pool_allocator.get_kvcache()
    layers = range(pool.start_layer, pool.start_layer + pool.layer_num)
    round_ = evict(
        due,
        self.req_to_token_pool.req_to_token,
        [pool.get_key_buffer(l) for l in layers],
        [pool.get_value_buffer(l) for l in layers],
        state.DEVICE,
        workspace_bytes=due[0].state.params.workspace_mb << 20,
    )
    freed = round_.freed_slots()
    if freed is not None:
        self.token_to_kv_pool_allocator.free(freed)
        # SGLang retries admission only when the batch shrinks; freed slots are room for more.
        batch.batch_is_full = False
    for e, error in round_.failed:
        req = batch.reqs[index[id(e.state)]]
        logger.error("sglang-vase: eviction of request %s failed; aborting it", req.rid, exc_info=error)
        req.to_finish = FINISH_ABORT(
            f"sglang-vase: KV eviction failed for this request ({type(error).__name__}: {error}); "
            f"it was aborted, the server and other requests are unaffected",
            status_code=HTTPStatus.INTERNAL_SERVER_ERROR,
        )

    # Lower SGLang's lengths to the physical ones (out of place: other holders keep their copy).
    if round_.evicted:
        seq_lens, seq_lens_cpu = batch.seq_lens.clone(), batch.seq_lens_cpu.clone()
        orig = batch.orig_seq_lens.clone() if batch.orig_seq_lens is not None else None
        for e in round_.evicted:
            i, budget = index[id(e.state)], e.state.params.budget
            kv = batch.reqs[i].kv
            kv.kv_committed_len = kv.kv_allocated_len = budget
            seq_lens[i] = seq_lens_cpu[i] = budget
            if orig is not None:
                orig[i] = budget
        batch.seq_lens, batch.seq_lens_cpu, batch.seq_lens_sum = seq_lens, seq_lens_cpu, None
        if orig is not None:
            batch.orig_seq_lens = orig
    if metrics.enabled():
        metrics.record_evictions(len(round_.evicted), int(freed.numel()) if freed is not None else 0)
        metrics.record_kv_used(_held_slots(batch))
    return None


def _held_slots(batch) -> int:
    return sum(r.kv.kv_allocated_len for r in batch.reqs if r.kv.holds_kv)
