"""A request's eviction stats as clients see them: one dict under ``KEY`` ("vase").

The scheduler builds it with each output (``output_streamer``); the tokenizer manager keeps the
latest as ``meta_info["vase"]`` (``tokenizer_meta_info``); the OpenAI routes add each choice's as
``metadata["vase"]`` (``completion_response``, ``chat_response``).
"""

from sglang_vase.engine import hooks
from sglang_vase.engine.state import request_state

KEY = "vase"


def stats(req) -> dict | None:
    """The stats of ``req`` (None where it does not evict). A provisional eviction is settled first
    (``RequestState.settle``): one the request's finish wasted is taken back, and its trace discarded."""
    st = request_state(req)
    if st is None:
        return None
    if st.settle(len(req.output_ids), req.finished()):
        if hooks.HOOKS.trace_dir:
            hooks.HOOKS.discard_trace(st.rid, st.evictions)
    return {
        "policy": st.params.policy,
        "budget": st.params.budget,
        "window": st.params.window,
        "keep_prompt": st.params.keep_prompt,
        "mode": st.params.mode,
        "evictions": st.total_evictions,
        "forced_evictions": st.forced_evictions,
        "evicted_tokens": st.total_evicted_tokens,
        "kv_len": req.kv.kv_committed_len if req.kv.holds_kv else 0,
        "peak_kv_len": max(st.peak_kv_len, req.kv.kv_committed_len if req.kv.holds_kv else 0),
        "value_slots": st.policy.n_pinned,
        "seed": st.seed,
    }


def with_vase_metadata(response, ret):
    """``response`` with ``metadata["vase"]``: one entry per generation result (None where the
    request did not evict: eviction disabled for it, or no stats)."""
    if not hasattr(response, "metadata"):
        return response  # an error response (ORJSONResponse): nothing to add
    per_result = [r.get("meta_info", {}).get(KEY) for r in ret]
    response.metadata = {**(response.metadata or {}), KEY: per_result}
    return response
