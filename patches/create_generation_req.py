"""``Scheduler._create_generation_req`` (sglang 0.5.23): attach each request's VaSE state.

SGLang documents this method as the extension point for request-local state. The parameters were
validated in the tokenizer manager, so parsing cannot fail here.
"""

from sglang_vase.config import request_params, server_defaults
from sglang_vase.engine.state import RequestState, derive_seed

TARGET = "sglang.srt.managers.scheduler.Scheduler._create_generation_req"
HOOK_TYPE = "AFTER"


def hook(req, self, *args, **kwargs):
    defaults = server_defaults()
    params = request_params(req.sampling_params.custom_params, defaults)
    seed = params.seed if params.seed is not None else derive_seed(req.rid, defaults.seed)
    prompt = len(req.origin_input_ids)
    req._vase = RequestState(params=params, seed=seed, rid=req.rid, prefill_len=prompt, kept_prompt=params.kept_prompt(prompt))
