"""``OpenAIServingCompletion._build_completion_response`` (sglang 0.5.23): the eviction stats of
each choice in the response's ``metadata["vase"]`` (a list in choice order), so that OpenAI-API
clients (and clients behind sglang-router, which reaches workers through these routes) see what
``/generate`` reports in ``meta_info["vase"]``. Non-streaming responses only.
"""

from sglang_vase.patches.output_streamer import KEY

TARGET = ("sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion."
          "_build_completion_response")
HOOK_TYPE = "AFTER"


def with_vase_metadata(response, ret):
    """``response`` with ``metadata["vase"]``: one entry per generation result (None where the
    request did not evict: eviction disabled for it, or no stats)."""
    if not hasattr(response, "metadata"):
        return response  # an error response (ORJSONResponse): nothing to add
    stats = [r.get("meta_info", {}).get(KEY) for r in ret]
    response.metadata = {**(response.metadata or {}), KEY: stats}
    return response


def hook(result, self, request, ret, *args, **kwargs):
    return with_vase_metadata(result, ret)
