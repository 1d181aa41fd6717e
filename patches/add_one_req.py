"""``PrefillAdder.add_one_req`` (sglang 0.5.23): admit a new evicting request by its exact slot
bound (``admission_sglang.reserve_as_bounded``), and only while a query-ring row is free for it.

A request that scores with queries and can reach its trigger needs a ring row from its prefill on
(``state.needs_ring_row``); rows are bound when its req_to_token row is (``req_to_token_pool_alloc``).
When none is left the request is skipped (it stays queued, first in line for the next free row) and
admission goes on with the requests behind it, which may need no row: short requests are never
held up by the ring. A request refused for want of slots leaves its deficit for pressure mode
(``admission_sglang.note_deficit``).
"""

from sglang.srt.managers.schedule_policy import AddReqResult

from sglang_vase.admission_sglang import note_deficit, reserve_as_bounded
from sglang_vase.engine.state import device_of, needs_ring_row

TARGET = "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req"
HOOK_TYPE = "AROUND"


def hook(original, self, req, *args, **kwargs):
    if needs_ring_row(req):
        pending = sum(1 for r in self.can_run_list if needs_ring_row(r))
        if device_of(self.tree_cache.req_to_token_pool).ring.free_rows() - pending <= 0:
            return self.budget_state()
    with reserve_as_bounded(self, req):
        result = original(self, req, *args, **kwargs)
        if result is AddReqResult.NO_TOKEN:
            note_deficit(self, req)  # pressure mode evicts it away at the next step
        return result
