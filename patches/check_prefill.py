"""``PrefillBudget.check_prefill`` (sglang 0.5.23): admit an evicting request on an exact fit.

SGLang admits a request when its tokens are strictly fewer than the remaining budget and reserves
a page per request for page alignment. An evicting request's reservation is its exact slot bound
(``admission_sglang.reserve_as_bounded``, which leaves out the page that page size 1 never uses and
sets ``EXACT_FIT`` on the budget), so it is admitted when it fits: reservation <= remaining. Without
this the last request that fits the pool exactly waits for the others to finish.
"""

from sglang_vase.admission_sglang import EXACT_FIT

TARGET = "sglang.srt.mem_cache.prefill_budget.PrefillBudget.check_prefill"
HOOK_TYPE = "AROUND"

# Turns SGLang's strict comparison into <= for integer reservations (the budget may be fractional:
# plain requests are estimated with a ratio).
_EPSILON = 1e-6


def hook(original, self, *args, total_tokens, **kwargs):
    if getattr(self, EXACT_FIT, False):
        total_tokens -= _EPSILON
    return original(self, *args, total_tokens=total_tokens, **kwargs)
