"""What KV eviction can run with, checked against SGLang's own objects (sglang 0.5.23).

Each function returns the reasons a configuration is refused (empty when it can run). The launcher
applies ``model_refusals`` before it starts SGLang; ``scheduler_init`` applies all of them in
every scheduler process, so ``sglang.Engine`` and other entry points are refused too.
"""

from __future__ import annotations


def model_refusals(model_config) -> list[str]:
    """Models whose attention eviction would silently break (SGLang ``ModelConfig``, no weights)."""
    from sglang.srt.configs.model_config import AttentionArch

    reasons = []
    if model_config.attention_arch == AttentionArch.MLA:
        reasons.append("MLA models (the latent KV buffer is not per-head K and V)")
    elif model_config.attention_arch != AttentionArch.MHA:
        reasons.append(f"{model_config.attention_arch.name} models (no per-head KV cache to evict)")
    if getattr(model_config, "model_is_mrope", False):
        reasons.append("M-RoPE models (SGLang computes their decode positions from the physical length)")
    if getattr(model_config, "use_alibi", False):
        reasons.append("ALiBi models (the bias is computed from physical positions)")
    if getattr(model_config, "is_hybrid_swa", False):
        reasons.append("hybrid sliding-window models")
    elif getattr(model_config, "is_local_attention_model", False):
        # --disable-hybrid-swa-memory turns is_hybrid_swa off; the chunked layers remain.
        reasons.append("chunked local attention (Llama-4: its attention reads physical lengths and "
                       "position-ordered page tables)")
    return reasons


def scheduler_refusals(scheduler) -> list[str]:
    """Scheduler features eviction does not follow yet (resolved values, not flags)."""
    from sglang.srt.disaggregation.utils import DisaggregationMode
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, check_cuda_graph_backend
    from sglang.srt.runtime_context import get_parallel

    reasons = []
    if not scheduler.spec_algorithm.is_none():
        reasons.append("speculative decoding")
    if scheduler.page_size != 1:
        reasons.append(f"--page-size {scheduler.page_size} (token-level eviction needs --page-size 1)")
    if scheduler.is_mixed_chunk:
        reasons.append("--enable-mixed-chunk")
    if scheduler.is_hybrid_swa or getattr(scheduler, "is_hybrid_ssm", False):
        reasons.append("hybrid sliding-window / state-space models")
    parallel = get_parallel()
    if parallel.pp_size > 1:
        reasons.append("pipeline parallelism")
    if parallel.attn_dp_size > 1:
        reasons.append("DP attention")
    if getattr(scheduler, "enable_hierarchical_cache", False):
        reasons.append("the hierarchical cache")
    if scheduler.disaggregation_mode != DisaggregationMode.NULL:
        reasons.append("prefill/decode disaggregation")
    for backend in (Backend.FULL, Backend.BREAKABLE):
        if check_cuda_graph_backend(Phase.PREFILL, backend):
            reasons.append(
                f"the {backend} prefill CUDA graph (it captures the query-ring writes of its capture "
                "batch; pass --cuda-graph-backend-prefill disabled, decode graphs stay on)"
            )
    return reasons


def runtime_refusals(model_runner) -> list[str]:
    """What only the loaded model and the allocated pool tell: pool layout, KV quantization, and
    attention layers with a sliding window or ALiBi."""
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    reasons = []
    pool = model_runner.token_to_kv_pool
    if type(pool) is not MHATokenToKVPool:
        reasons.append(f"KV pool {type(pool).__name__} (eviction compacts MHATokenToKVPool's per-head buffers)")
    else:
        if getattr(pool, "is_quantized_kv_cache", False) or getattr(pool, "k_scale_buffer", None) is not None:
            reasons.append("quantized KV caches with scale buffers or dequantized reads")
        k = pool.get_key_buffer(pool.start_layer)
        if k.dim() != 3 or k.shape[1] != pool.head_num:
            reasons.append(f"KV buffers of shape {tuple(k.shape)} (eviction needs the [slots, heads, dim] layout)")
    for module in model_runner.model.modules():
        if isinstance(module, RadixAttention):
            if module.sliding_window_size is not None and module.sliding_window_size > 0:
                reasons.append(f"sliding-window attention (layer {module.layer_id}, window {module.sliding_window_size})")
                break
            if getattr(module, "k_scale_float", None) not in (None, 1.0) or getattr(module, "v_scale_float", None) not in (None, 1.0):
                reasons.append("per-layer KV scales (scoring reads the stored, scaled keys)")
                break
        if getattr(module, "alibi_slopes", None) is not None:
            reasons.append("ALiBi attention (the bias is computed from physical positions)")
            break
    return reasons
