"""``Scheduler.__init__`` (sglang 0.5.23): refuse configurations eviction would silently break.

The launcher refuses the same flags with a friendlier message; this guard also covers servers
started another way (``sglang.Engine`` with SGLANG_VASE_CONFIG set). It also turns on the output
streamer's per-request info (the eviction stats in meta_info) and checks that every patch applied,
since SGLang only logs a failing plugin.
"""

from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer
from sglang.srt.runtime_context import get_parallel

from sglang_vase.config import server_defaults
from sglang_vase.plugin import check_applied

TARGET = "sglang.srt.managers.scheduler.Scheduler.__init__"
HOOK_TYPE = "AFTER"


def unsupported(scheduler) -> list[str]:
    """Why this scheduler cannot run eviction (empty when it can)."""
    reasons = []
    if scheduler.enable_overlap:
        reasons.append("the overlap scheduler (pass --disable-overlap-schedule)")
    if not scheduler.spec_algorithm.is_none():
        reasons.append("speculative decoding")
    if scheduler.page_size != 1:
        reasons.append(f"--page-size {scheduler.page_size} (token-level eviction needs --page-size 1)")
    if not getattr(scheduler.tree_cache, "disable", False):
        reasons.append("the radix cache (pass --disable-radix-cache)")
    if scheduler.is_mixed_chunk:
        reasons.append("--enable-mixed-chunk")
    if scheduler.is_hybrid_swa or getattr(scheduler, "is_hybrid_ssm", False):
        reasons.append("hybrid sliding-window / state-space models")
    if get_parallel().pp_size > 1:
        reasons.append("pipeline parallelism")
    if getattr(scheduler, "enable_hierarchical_cache", False):
        reasons.append("the hierarchical cache")
    return reasons


def hook(result, self, *args, **kwargs):
    if not server_defaults().enabled:
        return
    reasons = unsupported(self)
    if reasons:
        raise ValueError("sglang-vase KV eviction cannot run with " + "; ".join(reasons))
    check_applied()
    SchedulerOutputStreamer.has_additional_customized_info = True

