"""``ReqToTokenPool.alloc`` (sglang 0.5.23): bind a query-ring row to each new request that needs one.

Admission (``add_one_req``) only lets such a request in while a ring row is free, so binding here,
when the request gets its req_to_token row and before its prefill records queries, cannot fail;
if it ever did, the request is aborted rather than evicted with another request's queries.
"""

from http import HTTPStatus

from sglang.srt.managers.schedule_batch import FINISH_ABORT

from sglang_vase.engine.state import device_of, needs_ring_row, request_state

TARGET = "sglang.srt.mem_cache.memory_pool.ReqToTokenPool.alloc"
HOOK_TYPE = "AROUND"


def hook(original, self, reqs, *args, **kwargs):
    due = [r for r in reqs if not r.kv.holds_kv and needs_ring_row(r)]
    result = original(self, reqs, *args, **kwargs)
    device = device_of(self)
    if result is None or device is None:
        return result
    for req in due:
        st = request_state(req)
        st.ring_row = device.ring.bind(req.kv.req_pool_idx)
        if not st.ring_row:
            req.to_finish = FINISH_ABORT("sglang-vase: no query-ring row was free for this request",
                                         status_code=HTTPStatus.SERVICE_UNAVAILABLE)
    return result
