"""``Req.reset_for_retract`` (sglang 0.5.23): a retracted request starts its eviction state over.

Retraction frees the whole row and later re-prefills prompt + output uncompressed (the tokens
evicted before are attended again), so the eviction count restarts and the slot bound is that of
the longer prefill (``add_request_to_queue`` aborts the request when that bound exceeds the pool).
"""

from sglang_vase.engine.state import request_state

TARGET = "sglang.srt.managers.schedule_batch.Req.reset_for_retract"
HOOK_TYPE = "AFTER"


def hook(result, self, *args, **kwargs):
    state = request_state(self)
    if state is not None:
        state.restart(prefill_len=len(self.origin_input_ids) + len(self.output_ids))
