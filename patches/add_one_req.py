"""``PrefillAdder.add_one_req`` (sglang 0.5.23): reserve a new evicting request's exact slot bound.

See ``prefill_adder.reserve_as_bounded``.
"""

from sglang_vase.patches.prefill_adder import reserve_as_bounded

TARGET = "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req"
HOOK_TYPE = "AROUND"


def hook(original, self, req, *args, **kwargs):
    with reserve_as_bounded(req):
        return original(self, req, *args, **kwargs)
