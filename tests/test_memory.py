"""The query ring and the eviction workspace are planned before SGLang sizes the KV pool.

The footprints are computed from SGLang's own ``ModelConfig`` of Qwen3-4B and Qwen3-14B (their
public config.json, no weights) on an 80 GB GPU at default flags: SGLang then keeps at least
10 GiB outside its static memory (``arg_groups/memory_hook.handle_gpu_memory_settings``), the
weights take their bf16 size, the KV pool takes the rest.
"""

from __future__ import annotations

import json

import pytest

from sglang_vase.config import VaseParams
from sglang_vase.engine.memory import ModelShape
from sglang_vase.engine.ring import QueryRing

QWEN3 = {
    # name: (hidden, layers, q heads, kv heads, intermediate, tied embeddings, parameters)
    "Qwen3-4B": (2560, 36, 32, 8, 9728, True, 4.02e9),
    "Qwen3-14B": (5120, 40, 40, 8, 17408, False, 14.77e9),
}
GPU_MIB = 81559  # an H100 80 GB as torch reports it
RESERVED_MIB = 10 * 1024  # SGLang's floor for GPUs above 60 GB


def model_config(tmp_path, name):
    from sglang.srt.configs.model_config import ModelConfig

    hidden, layers, heads, kv, inter, tied, _ = QWEN3[name]
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": 128,
        "intermediate_size": inter, "vocab_size": 151936, "max_position_embeddings": 40960,
        "rope_theta": 1000000, "torch_dtype": "bfloat16", "tie_word_embeddings": tied, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "attention_bias": False}))
    return ModelConfig(str(folder))


@pytest.mark.parametrize("name", sorted(QWEN3))
@pytest.mark.parametrize("tp", [1, 2])
def test_ring_is_a_small_share_of_the_kv_pool_at_default_flags(tmp_path, name, tp):
    shape = ModelShape.from_model_config(model_config(tmp_path, name), tp)
    static = (GPU_MIB - RESERVED_MIB) * 2**20
    kv_budget = static - int(QWEN3[name][-1] * 2 / tp)  # bf16 weights, sharded over the ranks
    plan = VaseParams().memory_plan(shape)  # the launcher's GPU defaults
    # What the patches do: config_from_budget sizes the pool, alloc_memory_pool the ring.
    tokens = plan.pool_tokens(kv_budget, shape.kv_cell_bytes())
    rows = plan.rows_for(tokens, max_running_requests=4096)
    kv_bytes, ring_bytes = tokens * shape.kv_cell_bytes(), plan.ring_bytes(rows)
    assert ring_bytes <= 0.05 * kv_bytes, (ring_bytes, kv_bytes)
    # Everything fits the budget, and the ring holds one row per request the pool can hold at B + R.
    assert kv_bytes + ring_bytes + plan.workspace_bytes <= kv_budget
    assert rows == tokens // (4096 + 64)
    # The old sizing was a row per req_to_token row: at least 2048 (50 GiB for Qwen3-14B).
    assert rows < 2048


def test_shape_and_plan_arithmetic(tmp_path):
    shape = ModelShape.from_model_config(model_config(tmp_path, "Qwen3-14B"), 1)
    assert (shape.layers, shape.q_heads, shape.kv_heads, shape.head_dim, shape.dtype_bytes) == (40, 40, 8, 128, 2)
    assert QueryRing.row_bytes(shape, 64) == 40 * 64 * 40 * 128 * 2  # 25 MiB a row, as the issue measured
    assert shape.kv_cell_bytes() == 40 * 8 * 256 * 2
    plan = VaseParams(budget=128, window=32).memory_plan(shape)
    budget = 10 * 2**30
    tokens = plan.pool_tokens(budget, shape.kv_cell_bytes())
    rows = plan.rows_for(tokens, 10**6)
    assert tokens * shape.kv_cell_bytes() + plan.ring_bytes(rows) + plan.workspace_bytes <= budget
    # --max-running-requests caps the rows charged: the budget they would have taken buys tokens.
    capped = plan.pool_tokens(budget, shape.kv_cell_bytes(), max_rows=8)
    assert capped > tokens and plan.rows_for(capped, 8) == 8
    assert capped * shape.kv_cell_bytes() + plan.ring_bytes(8) + plan.workspace_bytes <= budget
    assert (capped + 1) * shape.kv_cell_bytes() + plan.ring_bytes(8) + plan.workspace_bytes > budget
    assert plan.pool_tokens(budget, shape.kv_cell_bytes(), max_rows=10**6) == tokens  # a cap that never binds
    # A fixed --vase-ring-rows is charged whole; rows never exceed the running requests.
    fixed = VaseParams(budget=128, window=32, ring_rows=3).memory_plan(shape)
    assert fixed.rows_for(10**6, 100) == 3 and fixed.rows_for(10**6, 2) == 2
    assert fixed.fixed_bytes() == fixed.workspace_bytes + 4 * QueryRing.row_bytes(shape, 32)
