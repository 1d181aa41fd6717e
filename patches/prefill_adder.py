"""``PrefillAdder`` (sglang 0.5.23): admit evicting requests by their exact slot bound.

SGLang reserves, for every running and new request, up to 4096 future tokens
(SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION) scaled by ``new_token_ratio``. An evicting request never
holds more than C = max(prompt, B) + R slots, so it needs only C minus what it holds now. This
module's ``hook`` patches the running-request estimate; ``add_one_req.py`` uses
``reserve_as_bounded`` for the new request.
"""

from contextlib import contextmanager

from sglang_vase.engine.state import request_state

TARGET = "sglang.srt.managers.schedule_policy.PrefillAdder._get_running_request_total_token_offset"
HOOK_TYPE = "AROUND"


def future_tokens(req, st) -> int:
    """Slots the request may still add: bounded by its slot bound and its remaining output."""
    remaining_output = max(0, req.sampling_params.max_new_tokens - len(req.output_ids))
    return min(remaining_output, max(0, st.slot_bound - req.kv.kv_allocated_len))


def hook(original, self, req, *args, **kwargs):
    st = request_state(req)
    if st is None:
        return original(self, req, *args, **kwargs)
    return future_tokens(req, st)


@contextmanager
def reserve_as_bounded(req):
    """Make SGLang's admission reserve the request's exact future slots, then restore it.

    Admission reads ``max_new_tokens - len(output_ids)`` as the future growth (and takes a separate
    whole-lifetime simulation path for ignore_eos requests); presenting the bound there keeps every
    admission check, chunking rule and budget update of SGLang's own code.
    """
    st = request_state(req)
    if st is None:
        yield
        return
    sp = req.sampling_params
    prompt = len(req.full_untruncated_fill_ids)
    st.slot_bound = st.params.slot_bound(prompt)
    saved = (sp.max_new_tokens, sp.ignore_eos)
    growth = min(max(0, sp.max_new_tokens - len(req.output_ids)), max(0, st.slot_bound - prompt))
    sp.max_new_tokens, sp.ignore_eos = len(req.output_ids) + growth, False
    try:
        yield
    finally:
        sp.max_new_tokens, sp.ignore_eos = saved
