"""``ModelRunner.alloc_memory_pool`` (sglang 0.5.23): allocate the query ring and position offsets.

Right after the KV pool exists and before attention backends and CUDA graphs are set up, so the
ring's writes are captured into the decode graph. The ring has one row per request that can evict
at once (``engine.memory``: pool // (B + R), at most one per running request), plus the scratch row;
its bytes were charged to the KV budget before the pool was sized (``config_from_budget``).

Where the Triton kernels run, they are compiled here, at this server's shapes (``evictor.warm_up``),
so that no eviction stalls the scheduler on a compile.
"""

import logging

from sglang.srt.runtime_context import get_parallel

from sglang_vase.config import server_defaults
from sglang_vase.engine.evictor import requests_per_batch, warm_up
from sglang_vase.engine.memory import ModelShape
from sglang_vase.engine.state import DeviceState, attach
from sglang_vase.kernels._dispatch import Route

TARGET = "sglang.srt.model_executor.model_runner.ModelRunner.alloc_memory_pool"
HOOK_TYPE = "AFTER"

logger = logging.getLogger(__name__)


def hook(result, self, *args, **kwargs):
    if getattr(self, "is_draft_worker", False):
        return
    from sglang.srt.layers.radix_attention import RadixAttention

    defaults = server_defaults()
    parallel = get_parallel()
    shape = ModelShape.from_model_config(self.model_config, parallel.tp_size)
    # The attention layers know their per-rank query heads (after tensor parallelism).
    attention = [m for m in self.model.modules() if isinstance(m, RadixAttention)]
    attn = attention[0]
    pool = self.token_to_kv_pool
    plan = defaults.memory_plan(shape)
    rows = self.req_to_token_pool.req_to_token.shape[0]
    ring_rows = plan.rows_for(self.max_total_num_tokens, rows - 1)
    device = DeviceState(
        rows=rows,
        ring_rows=ring_rows,
        num_layers=pool.layer_num,
        window=defaults.window,
        num_q_heads=attn.tp_q_head_num,
        head_dim=attn.qk_head_dim,
        dtype=self.model_config.dtype,
        device=self.device,
        head_offset=kv_head_offset(parallel.tp_rank, parallel.tp_size, self.model_config.get_total_num_kv_heads()),
    )
    # The scheduler reaches it through the req_to_token pool, the forward through its layers.
    attach(device, self, self.req_to_token_pool, *attention)
    layers = range(pool.start_layer, pool.start_layer + pool.layer_num)
    k_buffers = [pool.get_key_buffer(l) for l in layers]
    if Route.of(k_buffers[0]).compaction:
        seconds = warm_up(k_buffers, [pool.get_value_buffer(l) for l in layers], device, defaults)
        logger.info("sglang-vase: eviction kernels compiled for this server's shapes in %.1f s (lengths and "
                    "batch sizes are not compiled in: nothing compiles while serving)", seconds)
    kv_bytes = self.max_total_num_tokens * shape.kv_cell_bytes(pool.store_dtype.itemsize)
    ring = device.ring.nbytes
    logger.info(
        "sglang-vase: query ring %d rows + 1 scratch (pool %d tokens // (B %d + R %d), at most %d running) "
        "x %s %s = %.1f MiB, %.2f%% of the KV pool (%.1f MiB); eviction workspace %.0f MiB: up to %d requests "
        "of the default policy per eviction batch, each batch a fixed number of kernel launches for all layers "
        "(a larger --vase-workspace-mb batches more)",
        ring_rows, self.max_total_num_tokens, defaults.budget, defaults.window, rows - 1,
        tuple(device.ring.buffer.shape[1:]), self.model_config.dtype, ring / 2**20,
        100.0 * ring / max(kv_bytes, 1), kv_bytes / 2**20, plan.workspace_bytes / 2**20,
        requests_per_batch(defaults, k_buffers[0], device, len(k_buffers)),
    )


def kv_head_offset(tp_rank: int, tp_size: int, total_kv_heads: int) -> int:
    """Global index of this rank's first KV head. With more ranks than KV heads SGLang replicates
    each head over tp_size // total_kv_heads consecutive ranks, which then draw the same noise."""
    if tp_size <= total_kv_heads:
        return tp_rank * (total_kv_heads // tp_size)
    return tp_rank // (tp_size // total_kv_heads)
