"""``Req.reset_for_retract`` (sglang 0.5.23): a retracted request starts its eviction state over.

Retraction frees the whole row (SGLang's release inserts nothing: it does not checkpoint) and later
re-prefills prompt + output uncompressed (the tokens evicted before are attended again), so the
eviction count restarts, the slot bound is that of the longer prefill (``add_request_to_queue``
aborts the request when that bound exceeds the pool), and its uncompacted row may enter the radix
tree again: the request's own ``skip_radix_cache_insert`` comes back.
"""

from sglang_vase.engine.state import request_state

TARGET = "sglang.srt.managers.schedule_batch.Req.reset_for_retract"
HOOK_TYPE = "AFTER"


def hook(result, self, *args, **kwargs):
    state = request_state(self)
    if state is None:
        return
    prompt = len(self.origin_input_ids)
    state.restart(prefill_len=prompt + len(self.output_ids), kept_prompt=state.params.kept_prompt(prompt))
    if state.saved_skip_insert is not None:
        self.skip_radix_cache_insert = state.saved_skip_insert
        state.saved_skip_insert = None
