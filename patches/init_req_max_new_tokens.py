"""``Scheduler.init_req_max_new_tokens`` (sglang 0.5.23): do not cap generation by pool capacity.

SGLang clips ``max_new_tokens`` so that prompt + output fits the whole KV pool. An evicting request
never holds more than max(prompt, B) + R slots, so its output is bounded only by the model's
context (RoPE positions) and SGLANG_MAX_NEW_TOKENS_LIMIT; its slot bound must fit the pool and
its req_to_token row, else it is aborted with a clear message.
"""

from sglang_vase.admission_sglang import slot_capacity
from sglang_vase.engine.state import request_state

TARGET = "sglang.srt.managers.scheduler.Scheduler.init_req_max_new_tokens"
HOOK_TYPE = "AROUND"


def hook(original, self, req, *args, **kwargs):
    st = request_state(req)
    requested = req.sampling_params.max_new_tokens
    original(self, req, *args, **kwargs)
    if st is None or req.to_finish is not None:
        return
    input_len = len(req.origin_input_ids)
    bound = st.slot_bound()
    capacity = slot_capacity(self)
    if bound > capacity:
        req.set_finish_with_abort(
            f"sglang-vase: this request can hold up to max(prompt={input_len}, budget="
            f"{st.params.budget}) + window={st.params.window} = {bound} KV slots, more than the "
            f"KV pool / row capacity {capacity}; lower the budget or raise --max-total-tokens"
        )
        return
    limit = requested if requested is not None else 1 << 30
    if self.max_new_tokens_limit is not None and self.max_new_tokens_limit > 0:
        limit = min(limit, self.max_new_tokens_limit)
    max_new = max(0, min(limit, self.model_config.context_len - input_len - 1))
    req.sampling_params.max_new_tokens = max_new
    if req.sampling_params.min_new_tokens > max_new:
        req.sampling_params.min_new_tokens = max_new
