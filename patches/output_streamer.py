"""``SchedulerOutputStreamer.build_additional_customized_info`` (sglang 0.5.23): per-request
eviction stats, sent with each output to the tokenizer manager (see ``tokenizer_meta_info``).

SGLang's documented extension point; ``scheduler_init`` sets ``has_additional_customized_info``.
"""

from sglang_vase.engine import hooks
from sglang_vase.engine.state import request_state

TARGET = (
    "sglang.srt.managers.scheduler_components.output_streamer."
    "SchedulerOutputStreamer.build_additional_customized_info"
)
HOOK_TYPE = "REPLACE"
KEY = "vase"


def stats(req) -> dict | None:
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
        "evictions": st.total_evictions,
        "evicted_tokens": st.total_evicted_tokens,
        "kv_len": req.kv.kv_committed_len if req.kv.holds_kv else 0,
        "peak_kv_len": max(st.peak_kv_len, req.kv.kv_committed_len if req.kv.holds_kv else 0),
        "value_slots": st.policy.n_pinned,
        "seed": st.seed,
    }


def hook(self, reqs, *args, **kwargs):
    return {KEY: [stats(r) for r in reqs]}
