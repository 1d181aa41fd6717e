"""``Req._compute_max_prefix_len`` (sglang 0.5.23): prefill again the prompt positions that the first
eviction's query window covers.

SGLang prefills only the part of a prompt the radix cache does not hold, so queries are recorded
only for those positions. A request of P > B tokens with P % R != 0 first evicts at the next multiple
of R, with a window that reaches back to column floor(P / R) * R of its prompt; if those positions
came from the tree, their ring entries would hold another request's queries, and the same seeded
request would keep other tokens when its prompt is cached (every repeated prompt, n > 1 sample,
chat turn and retracted request's re-prefill). Capping the prefix match there costs at most R - 1
prefill tokens per cached request and gives exactly the uncached run's keep sets (masking the
missing queries would not).
"""

from sglang_vase.engine.state import request_state

TARGET = "sglang.srt.managers.schedule_batch.Req._compute_max_prefix_len"
HOOK_TYPE = "AFTER"


def hook(result, self, *args, **kwargs):
    st = request_state(self)
    if st is None:
        return None
    max_new = self.sampling_params.max_new_tokens
    start = st.first_window_start((1 << 30 if max_new is None else max_new) - len(self.output_ids))
    return None if start is None or start >= result else start
