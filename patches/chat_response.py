"""``OpenAIServingChat._build_chat_response`` (sglang 0.5.23): the eviction stats of each choice in
the response's ``metadata["vase"]``, as for completions (``completion_response``,
``request_stats.with_vase_metadata``)."""

from sglang_vase.request_stats import with_vase_metadata

TARGET = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._build_chat_response"
HOOK_TYPE = "AFTER"


def hook(result, self, request, ret, *args, **kwargs):
    return with_vase_metadata(result, ret)
