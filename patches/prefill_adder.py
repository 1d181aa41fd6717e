"""``PrefillAdder`` (sglang 0.5.23): admit evicting requests by their exact slot bound.

SGLang reserves, for every running and new request, up to 4096 future tokens
(SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION) scaled by ``new_token_ratio``. An evicting request never
holds more than its slot bound (max(prefill, B) + R, then B + R once it has evicted), so it needs
exactly that bound minus what it holds now, however large, and no more. This module's ``hook``
patches the running-request estimate; ``add_one_req.py`` and ``add_chunked_req.py`` use
``reserve_as_bounded`` for the new request, ``add_one_req_ignore_eos.py`` keeps the evicting
requests out of SGLang's whole-lifetime simulation for eviction-disabled ``ignore_eos`` requests.
"""

from contextlib import contextmanager

from sglang.srt.managers import schedule_policy

from sglang_vase.engine.state import request_state

TARGET = "sglang.srt.managers.schedule_policy.PrefillAdder._get_running_request_total_token_offset"
HOOK_TYPE = "AROUND"


def future_tokens(req, st) -> int:
    """Slots a running request may still add: bounded by its slot bound and its remaining output."""
    remaining_output = max(0, req.sampling_params.max_new_tokens - len(req.output_ids))
    return min(remaining_output, max(0, st.slot_bound() - req.kv.kv_allocated_len))


def admission_growth(req, st) -> int:
    """Slots a request being admitted may add after its prefill."""
    remaining_output = max(0, req.sampling_params.max_new_tokens - len(req.output_ids))
    return min(remaining_output, max(0, st.slot_bound() - len(req.full_untruncated_fill_ids)))


def hook(original, self, req, *args, **kwargs):
    st = request_state(req)
    if st is None:
        return original(self, req, *args, **kwargs)
    return future_tokens(req, st)


@contextmanager
def reserve_as_bounded(req):
    """Make SGLang's admission reserve the request's exact future slots, then restore it.

    Admission reads ``max_new_tokens - len(output_ids)`` as the future growth, clipped at
    CLIP_MAX_NEW_TOKENS (and takes a separate whole-lifetime simulation path for ignore_eos
    requests); presenting the bound there, with the clip lifted to it, keeps every admission check,
    chunking rule and budget update of SGLang's own code.
    """
    st = request_state(req)
    if st is None:
        yield
        return
    sp = req.sampling_params
    growth = admission_growth(req, st)
    saved = (sp.max_new_tokens, sp.ignore_eos, schedule_policy.CLIP_MAX_NEW_TOKENS)
    sp.max_new_tokens, sp.ignore_eos = len(req.output_ids) + growth, False
    schedule_policy.CLIP_MAX_NEW_TOKENS = max(saved[2], sp.max_new_tokens)
    try:
        yield
    finally:
        sp.max_new_tokens, sp.ignore_eos, schedule_policy.CLIP_MAX_NEW_TOKENS = saved
