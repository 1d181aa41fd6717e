"""``Scheduler._add_request_to_queue`` (sglang 0.5.23): abort a retracted request that can never
be re-admitted.

A retracted evicting request re-prefills its prompt and output uncompressed, which can exceed the
whole KV pool (it held only max(prompt, B) + R slots before); queued, it would wait forever. It
is answered with a 503 and a message instead, as SGLang answers its own unresumable retractions.
"""

from http import HTTPStatus

from sglang_vase.admission_sglang import slot_capacity
from sglang_vase.engine.state import request_state

TARGET = "sglang.srt.managers.scheduler.Scheduler._add_request_to_queue"
HOOK_TYPE = "AROUND"


def hook(original, self, req, is_retracted=False, *args, **kwargs):
    st = request_state(req)
    if is_retracted and st is not None:
        capacity = slot_capacity(self)
        if st.slot_bound() > capacity:
            from sglang.srt.managers.scheduler import _make_abort_req

            message = (
                f"sglang-vase: retracted under memory pressure after {len(req.output_ids)} output tokens; "
                f"re-prefilling prompt + output ({st.prefill_len} tokens) needs {st.slot_bound()} KV slots, "
                f"more than the pool's {capacity}. Retry with a smaller max_new_tokens or a larger pool."
            )
            self.send_abort_output(
                _make_abort_req(req, finished_reason={"type": "abort", "message": message,
                                                      "status_code": HTTPStatus.SERVICE_UNAVAILABLE}),
                req,
            )
            self._release_aborted_request(req)
            return None
    return original(self, req, is_retracted, *args, **kwargs)
