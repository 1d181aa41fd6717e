"""``SamplingParams.verify`` (sglang 0.5.23): reject bad ``custom_params["vase"]`` with a 400.

Runs in the tokenizer manager (main process) before the request reaches a scheduler; SGLang turns
the ValueError into an HTTP 400 on the native and OpenAI routes and keeps serving.
"""

from sglang_vase.config import request_params, server_defaults

TARGET = "sglang.srt.sampling.sampling_params.SamplingParams.verify"
HOOK_TYPE = "AFTER"
ALWAYS = True  # also with --vase-policy none, so a request cannot silently get no eviction


def hook(result, self, *args, **kwargs):
    defaults = server_defaults()
    params = request_params(self.custom_params, defaults)
    if params.enabled and not defaults.enabled:
        raise ValueError(
            "custom_params.vase: KV eviction is disabled on this server (--vase-policy none); "
            "restart it with a --vase-policy to use it"
        )
