"""``SchedulerBatchResultProcessor.process_batch_result_decode`` (sglang 0.5.23): evict.

After a decode step's tokens are appended and finished requests released, every request whose
physical length reached its trigger (n > B, n % R == 0) is compacted down to B slots; the freed
slots go back to the allocator at once, so the next scheduling round can admit requests into them.
``batch`` is the running batch, which the next decode step continues from.
"""

import torch

from sglang_vase.engine import state
from sglang_vase.engine.evictor import Eviction, evict
from sglang_vase.engine.selection import should_evict
from sglang_vase.engine.state import request_state
from sglang_vase import metrics

TARGET = (
    "sglang.srt.managers.scheduler_components.batch_result_processor."
    "SchedulerBatchResultProcessor.process_batch_result_decode"
)
HOOK_TYPE = "AFTER"


def hook(result, self, batch, *args, **kwargs):
    due, index = [], []
    for i, req in enumerate(batch.reqs):
        st = request_state(req)
        if st is None or not req.kv.holds_kv or req.finished():
            continue
        n = req.kv.kv_committed_len
        st.peak_kv_len = max(st.peak_kv_len, n)
        if should_evict(n, st.params.budget, st.params.window):
            due.append(Eviction(row=req.kv.req_pool_idx, length=n, state=st))
            index.append(i)
    if not due:
        if metrics.enabled():
            metrics.record_kv_used(_held_slots(batch))
        return None

    pool = self.token_to_kv_pool_allocator.get_kvcache()
    layers = range(pool.start_layer, pool.start_layer + pool.layer_num)
    freed = evict(
        due,
        self.req_to_token_pool.req_to_token,
        [pool.get_key_buffer(l) for l in layers],
        [pool.get_value_buffer(l) for l in layers],
        state.DEVICE,
    )
    self.token_to_kv_pool_allocator.free(freed)

    # Lower SGLang's lengths to the physical ones (out of place: other holders keep their copy).
    seq_lens, seq_lens_cpu = batch.seq_lens.clone(), batch.seq_lens_cpu.clone()
    orig = batch.orig_seq_lens.clone() if batch.orig_seq_lens is not None else None
    for i, e in zip(index, due):
        kv = batch.reqs[i].kv
        kv.kv_committed_len = kv.kv_allocated_len = e.state.params.budget
        seq_lens[i] = seq_lens_cpu[i] = e.state.params.budget
        if orig is not None:
            orig[i] = e.state.params.budget
    batch.seq_lens, batch.seq_lens_cpu, batch.seq_lens_sum = seq_lens, seq_lens_cpu, None
    if orig is not None:
        batch.orig_seq_lens = orig
    if metrics.enabled():
        metrics.record_evictions(len(due), int(freed.numel()))
        metrics.record_kv_used(_held_slots(batch))
    return None


def _held_slots(batch) -> int:
    return sum(r.kv.kv_allocated_len for r in batch.reqs if r.kv.holds_kv)
