"""``PrefillAdder.add_chunked_req`` (sglang 0.5.23): the last chunk of a long prompt reserves the
request's exact slot bound too (see ``admission_sglang.reserve_as_bounded``).
"""

from sglang_vase.admission_sglang import reserve_as_bounded

TARGET = "sglang.srt.managers.schedule_policy.PrefillAdder.add_chunked_req"
HOOK_TYPE = "AROUND"


def hook(original, self, req, *args, **kwargs):
    with reserve_as_bounded(self, req):
        return original(self, req, *args, **kwargs)
