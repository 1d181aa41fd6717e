"""``ReqToTokenPool.free`` (sglang 0.5.23): a request's query-ring row goes back with its
req_to_token row (finish, abort, retraction), and the row maps to the scratch ring row again."""

from sglang_vase.engine.state import device_of, request_state

TARGET = "sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free"
HOOK_TYPE = "BEFORE"


def hook(self, req, *args, **kwargs):
    st = request_state(req)
    device = device_of(self)
    if st is not None and st.ring_row and device is not None:
        device.ring.release(req.kv.req_pool_idx, st.ring_row)
        st.ring_row = 0
    return None
