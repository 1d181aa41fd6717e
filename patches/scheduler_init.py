"""``Scheduler.__init__`` (sglang 0.5.23): refuse configurations eviction would silently break.

The launcher refuses the same flags with a friendlier message; this guard also covers servers
started another way (``sglang.Engine`` with SGLANG_VASE_CONFIG set), and checks what only the
resolved settings, the loaded model and the allocated pool tell (``sglang_vase.compat``). It also
turns on the output streamer's per-request info (the eviction stats in meta_info) and checks that
every patch applied, since SGLang only logs a failing plugin.
"""

from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer

from sglang_vase.compat import model_refusals, runtime_refusals, scheduler_refusals
from sglang_vase.config import server_defaults
from sglang_vase.registration import check_applied

TARGET = "sglang.srt.managers.scheduler.Scheduler.__init__"
HOOK_TYPE = "AFTER"


def hook(result, self, *args, **kwargs):
    if not server_defaults().enabled:
        return
    reasons = scheduler_refusals(self) + model_refusals(self.model_config)
    reasons += runtime_refusals(self.tp_worker.model_runner)
    if reasons:
        raise ValueError("sglang-vase KV eviction cannot run with " + "; ".join(reasons)
                         + " (or serve with --vase-policy none)")
    check_applied()
    SchedulerOutputStreamer.has_additional_customized_info = True
