"""``ModelRunner.alloc_memory_pool`` (sglang 0.5.23): allocate the query ring and position offsets.

Right after the KV pool exists and before attention backends and CUDA graphs are set up, so the
ring's writes are captured into the decode graph. Sized to the req_to_token rows
(max_running_requests + 1), not to a fixed request count.
"""

from sglang_vase.config import server_defaults
from sglang_vase.engine import state

TARGET = "sglang.srt.model_executor.model_runner.ModelRunner.alloc_memory_pool"
HOOK_TYPE = "AFTER"


def hook(result, self, *args, **kwargs):
    if getattr(self, "is_draft_worker", False):
        return
    from sglang.srt.layers.radix_attention import RadixAttention

    # The attention layers know their per-rank query heads (after tensor parallelism).
    attn = next(m for m in self.model.modules() if isinstance(m, RadixAttention))
    pool = self.token_to_kv_pool
    state.DEVICE = state.DeviceState(
        rows=self.req_to_token_pool.req_to_token.shape[0],
        num_layers=pool.layer_num,
        window=max_window(),
        num_q_heads=attn.tp_q_head_num,
        head_dim=attn.qk_head_dim,
        dtype=pool.dtype,
        device=self.device,
    )


def max_window() -> int:
    """Requests may choose their window up to the server's (the ring is allocated once)."""
    return server_defaults().window
