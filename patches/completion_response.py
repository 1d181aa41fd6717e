"""``OpenAIServingCompletion._build_completion_response`` (sglang 0.5.23): the eviction stats of
each choice in the response's ``metadata["vase"]`` (a list in choice order,
``request_stats.with_vase_metadata``), so that OpenAI-API clients (and clients behind
sglang-router, which reaches workers through these routes) see what ``/generate`` reports in
``meta_info["vase"]``. Non-streaming responses only.
"""

from sglang_vase.request_stats import with_vase_metadata

TARGET = ("sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion."
          "_build_completion_response")
HOOK_TYPE = "AFTER"


def hook(result, self, request, ret, *args, **kwargs):
    return with_vase_metadata(result, ret)
