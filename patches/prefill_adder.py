"""``PrefillAdder._get_running_request_total_token_offset`` (sglang 0.5.23): a running evicting
request reserves its exact future slots (``admission_sglang.future_tokens``), not SGLang's clipped
estimate of its remaining output.

The rest of admission by the slot bound is in ``add_one_req``, ``add_chunked_req``,
``check_prefill`` and ``add_one_req_ignore_eos``; ``sglang_vase.admission_sglang`` explains it.
"""

from sglang_vase.admission_sglang import PrefixCensus, future_tokens
from sglang_vase.engine.state import request_state

TARGET = "sglang.srt.managers.schedule_policy.PrefillAdder._get_running_request_total_token_offset"
HOOK_TYPE = "AROUND"


def hook(original, self, req, *args, **kwargs):
    st = request_state(req)
    if st is None:
        return original(self, req, *args, **kwargs)
    return future_tokens(req, st, PrefixCensus.of(self))
