"""What eviction cannot honour is refused at startup with the reason: models (SGLang's ModelConfig
of tiny configs, no weights), a model only its loaded layers reveal (a tiny sliding-window Gemma-2
with dummy weights, refused in the scheduler), and ``sglang.Engine`` started without the launcher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from sglang_vase.config import ENV_VAR, VaseParams

TINY = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 512, "vocab_size": 49152, "max_position_embeddings": 4096, "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-6, "hidden_act": "silu"}
MODELS = {
    "mla": ({"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "kv_lora_rank": 64,
             "q_lora_rank": None, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
             "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 2,
             "moe_intermediate_size": 128}, "MLA"),
    "mrope": ({"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
               "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
               "vision_config": {"depth": 1, "embed_dim": 64, "num_heads": 2, "hidden_size": 256}}, "M-RoPE"),
    "hybrid-swa": ({"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "sliding_window": 64,
                    "head_dim": 64, "layer_types": ["sliding_attention", "full_attention"], "num_local_experts": 4,
                    "num_experts_per_tok": 2}, "sliding-window"),
    "llama": ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, None),
}
LLAMA4 = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
          "text_config": {**TINY, "model_type": "llama4_text", "head_dim": 64, "intermediate_size_mlp": 512,
                          "attention_chunk_size": 128, "num_local_experts": 2, "num_experts_per_tok": 1},
          "vision_config": {"model_type": "llama4_vision_model", "hidden_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "intermediate_size": 128, "image_size": 56, "patch_size": 14,
                            "vision_output_dim": 64, "projector_input_dim": 64, "projector_output_dim": 64}}
GEMMA2_SLIDING = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "sliding_window": 64, "head_dim": 64,
                  "query_pre_attn_scalar": 64, "hidden_act": "gelu_pytorch_tanh",
                  "hidden_activation": "gelu_pytorch_tanh", "attn_logit_softcapping": 50.0,
                  "final_logit_softcapping": 30.0}


def tiny_model(folder, config: dict, tokenizer: bool = False) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**TINY, **config}))
    if tokenizer:  # the embedded model's tokenizer (same vocabulary size)
        from sglang_vase.models import prepare_default_model

        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(prepare_default_model(), name), folder / name)
    return str(folder)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_refusals(tmp_path, name):
    from sglang.srt.configs.model_config import ModelConfig

    from sglang_vase.compat import model_refusals

    config, reason = MODELS[name]
    reasons = model_refusals(ModelConfig(tiny_model(tmp_path / name, config)))
    if reason is None:
        assert reasons == []
    else:
        assert len(reasons) == 1 and reason in reasons[0], reasons


@pytest.mark.parametrize("disable_hybrid_swa_memory", [False, True])
def test_chunked_local_attention_is_refused(tmp_path, disable_hybrid_swa_memory):
    """Llama-4's chunked local attention is refused even when --disable-hybrid-swa-memory hides its
    hybrid sliding-window layout from SGLang's is_hybrid_swa."""
    from sglang.srt.configs.model_config import ModelConfig

    from sglang_vase.compat import model_refusals

    config = ModelConfig(tiny_model(tmp_path / "llama4", LLAMA4), disable_hybrid_swa_memory=disable_hybrid_swa_memory)
    reasons = model_refusals(config)
    assert len(reasons) == 1 and ("chunked local attention" in reasons[0] or "sliding-window" in reasons[0]), reasons
    assert ("chunked local attention" in reasons[0]) == disable_hybrid_swa_memory


def test_launcher_refuses_the_model_before_starting_sglang(tmp_path):
    path = tiny_model(tmp_path / "mla", MODELS["mla"][0])
    proc = subprocess.run([sys.executable, "-m", "sglang_vase.launch_server", "--model-path", path],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "MLA" in proc.stderr and "--vase-policy none" in proc.stderr


@pytest.mark.slow
def test_sliding_window_layers_are_refused_by_the_scheduler(tmp_path):
    """Gemma-2 passes the launcher's config check (not a hybrid model), but its attention layers
    have a window: the scheduler refuses it once the model is built."""
    from sglang_vase.serving import Server

    path = tiny_model(tmp_path / "gemma2", GEMMA2_SLIDING, tokenizer=True)
    with pytest.raises(RuntimeError, match="cannot run with sliding-window attention"):
        Server(["--model-path", path, "--load-format", "dummy", "--max-total-tokens", "2048",
                "--max-running-requests", "4"], timeout=240)


@pytest.mark.slow
def test_engine_started_without_the_launcher_is_refused():
    """``sglang.Engine`` with SGLANG_VASE_CONFIG set, bypassing the launcher's checks, and a flag
    eviction cannot honour (mixed prefill/decode chunks): every scheduler refuses it with the reason."""
    from sglang_vase.launch_server import CPU_ENV
    from sglang_vase.models import prepare_default_model

    script = (
        "import sglang\n"
        f"sglang.Engine(model_path={prepare_default_model()!r}, device='cpu', attention_backend='torch_native', "
        "disable_cuda_graph=True, max_total_tokens=4096, max_running_requests=4, enable_mixed_chunk=True)\n"
    )
    env = {**os.environ, **CPU_ENV, ENV_VAR: VaseParams(budget=128, window=32).to_json()}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          cwd="/tmp")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "sglang-vase KV eviction cannot run with" in out and "--enable-mixed-chunk" in out, out[-3000:]
