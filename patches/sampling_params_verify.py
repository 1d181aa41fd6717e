"""``SamplingParams.verify`` (sglang 0.5.23): reject bad ``custom_params["vase"]`` with a 400.

Runs in the tokenizer manager (main process) before the request reaches a scheduler; SGLang turns
the ValueError into an HTTP 400 on the native and OpenAI routes and keeps serving. Everything a
policy checks at eviction time is checked here (``config.request_params`` builds the policy).

Beam search is refused with eviction: beam members alias the leader's prompt slots and share
decode slots (sglang ``managers/beam_search/fork.py``), so compacting one member's row would
permute the others' KV and free slots they still read.
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
    if params.enabled and self.beam_width is not None and self.beam_width > 1:
        raise ValueError(
            f"sampling_params.beam_width ({self.beam_width}) cannot be combined with KV eviction: beams "
            "share KV slots that eviction would compact; send custom_params {\"vase\": false} for beam search"
        )
