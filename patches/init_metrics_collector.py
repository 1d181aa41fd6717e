"""``Scheduler.init_metrics_collector`` (sglang 0.5.23): add VaSE's Prometheus counters.

They share SGLang's labels and multiprocess registry, so they appear on the server's /metrics.
"""

from sglang_vase import metrics

TARGET = "sglang.srt.managers.scheduler.Scheduler.init_metrics_collector"
HOOK_TYPE = "AFTER"


def hook(result, self, *args, **kwargs):
    collector = getattr(self, "metrics_collector", None)
    if collector is not None:
        metrics.init(dict(collector.labels))
