"""``SchedulerOutputStreamer.build_additional_customized_info`` (sglang 0.5.23): per-request
eviction stats (``request_stats.stats``), sent with each output to the tokenizer manager (see
``tokenizer_meta_info``).

SGLang's documented extension point; ``scheduler_init`` sets ``has_additional_customized_info``.
"""

from sglang_vase.request_stats import KEY, stats

TARGET = (
    "sglang.srt.managers.scheduler_components.output_streamer."
    "SchedulerOutputStreamer.build_additional_customized_info"
)
HOOK_TYPE = "REPLACE"


def hook(self, reqs, *args, **kwargs):
    return {KEY: [stats(r) for r in reqs]}
