"""``PrefillAdder.add_one_req_ignore_eos`` (sglang 0.5.23): keep evicting requests out of the
whole-lifetime simulation that admits eviction-disabled ``ignore_eos`` requests.

SGLang admits such a request only if, finishing the running requests shortest-first, memory never
runs out. It reads every request's ``max_new_tokens`` and logical length, which for an evicting
request are unbounded and unrelated to the slots it will ever hold, so one evicting request could
block the queue. Here the evicting requests' exact future growth (``admission_sglang.future_tokens``,
already reserved in the adder's total budget) is taken off the simulation's free memory up front,
and they are left out of the simulation: it then runs over the eviction-free requests only.
"""

from contextlib import ExitStack, contextmanager

from sglang_vase.admission_sglang import admission_growth, future_tokens
from sglang_vase.engine.state import request_state

TARGET = "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req_ignore_eos"
HOOK_TYPE = "AROUND"


@contextmanager
def _outside_simulation(req):
    """The simulation skips requests with nothing left to generate."""
    sp = req.sampling_params
    saved = sp.max_new_tokens
    sp.max_new_tokens = 0
    try:
        yield
    finally:
        sp.max_new_tokens = saved


def hook(original, self, req, *args, **kwargs):
    running = list(self.running_batch.reqs) if self.running_batch is not None else []
    evicting = [(r, st) for r in running + list(self.can_run_list) if (st := request_state(r)) is not None]
    if not evicting:
        return original(self, req, *args, **kwargs)
    # Running evicting requests grow by their future tokens; admitted ones already took their
    # prefill from the current budget and grow by the rest of their bound.
    reserve = sum(future_tokens(r, st) if r in running else admission_growth(r, st) for r, st in evicting)
    budget = self.memory_budget
    with ExitStack() as stack:
        for r, _ in evicting:
            stack.enter_context(_outside_simulation(r))
        budget.current_offset += reserve
        try:
            return original(self, req, *args, **kwargs)
        finally:
            budget.current_offset -= reserve
