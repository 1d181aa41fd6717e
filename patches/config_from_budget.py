"""``KVCacheConfigurator.config_from_budget`` (sglang 0.5.23): charge eviction's buffers to the KV
budget before SGLang turns it into a token count.

The query ring (its rows follow the pool: T // (B + R)) and the eviction workspace are allocated
beside the pool, so the pool gets T = (budget - fixed) // (cell + ring row / (B + R)) tokens
(``engine.memory``); with --max-running-requests M only M rows are charged where the pool would hold
more. A user's --max-total-tokens still caps the pool afterwards, in SGLang's own code.
"""

import logging

from sglang.srt.runtime_context import get_parallel, get_schedule

from sglang_vase.config import server_defaults
from sglang_vase.engine.memory import ModelShape

TARGET = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator.config_from_budget"
HOOK_TYPE = "AROUND"

logger = logging.getLogger(__name__)


def hook(original, self, budget_bytes, *args, **kwargs):
    if self.is_draft_worker:
        return original(self, budget_bytes, *args, **kwargs)
    shape = ModelShape.from_model_config(self.model_config, get_parallel().tp_size)
    plan = server_defaults().memory_plan(shape)
    cell = shape.kv_cell_bytes(self.kv_cache_dtype.itemsize)
    requested = get_schedule().max_running_requests  # per worker, as SGLang sizes req_to_token
    max_rows = max(1, requested // self.attn_dp_size) if requested else None
    tokens = plan.pool_tokens(budget_bytes, cell, max_rows)
    kv_budget = tokens * cell
    logger.info(
        "sglang-vase: KV budget %.2f GiB -> %.2f GiB for the pool (%d tokens), %.1f MiB for the query "
        "ring (at most %d rows + 1 scratch) and the eviction workspace", budget_bytes / 2**30, kv_budget / 2**30,
        tokens, (budget_bytes - kv_budget) / 2**20, plan.rows_for(tokens, max_rows or tokens),
    )
    return original(self, kv_budget, *args, **kwargs)
