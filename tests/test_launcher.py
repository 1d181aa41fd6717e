"""The launcher's command-line handling and the per-request parameter rules, without a server."""

from __future__ import annotations

import json
import os

import pytest

from sglang_vase.config import ENV_VAR, VaseParams, request_params
from sglang_vase.launch_server import LaunchError, prepare

MODEL = ["--model-path", "/some/model"]


def test_cpu_route_and_eviction_flags_are_added():
    params, argv, env, notes = prepare(MODEL + ["--vase-budget", "512", "--vase-window", "64"], cuda_available=False)
    assert params == VaseParams(budget=512, window=64)
    assert json.loads(env[ENV_VAR])["budget"] == 512
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"
    for flag in ("--device", "--attention-backend", "--disable-cuda-graph", "--max-total-tokens", "--sleep-on-idle",
                 "--page-size"):
        assert flag in argv
    # SGLang's defaults stay on: the radix cache and the overlap scheduler.
    assert "--disable-radix-cache" not in argv and "--disable-overlap-schedule" not in argv
    assert not any(a.startswith("--vase") for a in argv)
    assert any("CPU route" in n for n in notes)


def test_user_flags_win_and_gpu_route_adds_no_cpu_flags():
    _, argv, env, _ = prepare(MODEL + ["--max-total-tokens", "999", "--page-size", "1"], cuda_available=True)
    assert argv.count("--max-total-tokens") == 0 or argv[argv.index("--max-total-tokens") + 1] == "999"
    assert "--device" not in argv and "SGLANG_USE_CPU_ENGINE" not in env
    assert argv.count("--page-size") == 1


def test_gpu_route_disables_only_the_prefill_cuda_graph():
    _, argv, _, notes = prepare(MODEL, cuda_available=True)
    assert argv[argv.index("--cuda-graph-backend-prefill") + 1] == "disabled"
    assert "--disable-cuda-graph" not in argv and "--cuda-graph-backend-decode" not in argv
    assert any("--cuda-graph-backend-prefill disabled" in n for n in notes)
    _, argv, _, _ = prepare(MODEL + ["--cuda-graph-backend-prefill", "disabled"], cuda_available=True)
    assert argv.count("--cuda-graph-backend-prefill") == 1


def test_embedded_model_defaults_evict_in_a_demo_and_every_flag_is_logged_once():
    from sglang_vase.models import default_model_dir

    params, _, _, notes = prepare(["--model-path", str(default_model_dir())], cuda_available=False)
    assert (params.budget, params.window) == (128, 32)  # the README's 256-token example evicts
    params, _, _, _ = prepare(["--model-path", str(default_model_dir()), "--vase-budget", "256", "--vase-keep-prompt"],
                              cuda_available=False)
    assert params.keep_prompt
    assert (params.budget, params.window) == (256, 32)
    assert prepare(MODEL, cuda_available=False)[0].budget == 4096  # a user's model: the paper's default
    text = "\n".join(notes)
    for flag in ("--device cpu", "--attention-backend torch_native", "--max-total-tokens 65536", "--page-size 1",
                 "--vase-budget 128", "--vase-window 32", "--vase-keep-prompt False", "--vase-ring-rows auto",
                 "--vase-workspace-mb 256"):
        assert text.count(flag) == 1, (flag, text)


def test_a_named_model_is_served_by_its_name_with_its_own_defaults(monkeypatch):
    """``--model-path qwen2.5-coder-0.5b``: the built folder is served under the name, with the
    model's eviction defaults (the folder's path gets them too)."""
    from sglang_vase import models

    built = []
    monkeypatch.setattr(models, "prepare_named_model", lambda name, verbose=False: built.append(name) or "/m/q")
    model = models.NAMED_MODELS["qwen2.5-coder-0.5b"]
    params, argv, _, notes = prepare(["--model-path", "qwen2.5-coder-0.5b"], cuda_available=False)
    assert built == ["qwen2.5-coder-0.5b"] and argv[argv.index("--model-path") + 1] == "/m/q"
    assert argv[argv.index("--served-model-name") + 1] == "qwen2.5-coder-0.5b"
    assert (params.budget, params.window) == (model.budget, model.window)
    assert any(f"sized for {model.folder}" in n for n in notes)
    _, argv, _, _ = prepare(["--model-path", "qwen2.5-coder-0.5b", "--served-model-name", "mine"],
                            cuda_available=False)
    assert argv[argv.index("--served-model-name") + 1] == "mine" and argv.count("--served-model-name") == 1
    _, argv, _, _ = prepare(["--served-model-name", "qwen2.5-coder-0.5b", "--model-path=qwen2.5-coder-0.5b"],
                            cuda_available=False)  # the name given as another flag's value, and the = form
    assert argv == ["--served-model-name", "qwen2.5-coder-0.5b", "--model-path=/m/q"] + argv[3:]
    params, _, _, _ = prepare(["--model-path", str(models.named_model_dir("qwen2.5-coder-0.5b")),
                               "--vase-window", "32"], cuda_available=False)
    assert (params.budget, params.window) == (model.budget, 32)


def test_cpu_ranks_get_their_own_cores(monkeypatch):
    """--dp-size 2 on the CPU route: one core group a rank (SGLang would ask for a NUMA node each)."""
    monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    _, _, env, notes = prepare(MODEL + ["--dp-size", "2"], cuda_available=False)
    assert env["SGLANG_CPU_OMP_THREADS_BIND"] == "0,1|2,3" and env["OMP_NUM_THREADS"] == "2"
    assert any("SGLANG_CPU_OMP_THREADS_BIND=0,1|2,3" in n for n in notes)
    _, _, env, _ = prepare(MODEL + ["--dp-size", "2", "--tp-size", "2"], cuda_available=False)
    assert env["SGLANG_CPU_OMP_THREADS_BIND"] == "0|1|2|3" and env["OMP_NUM_THREADS"] == "1"
    assert "SGLANG_CPU_OMP_THREADS_BIND" not in prepare(MODEL, cuda_available=False)[2]
    assert "SGLANG_CPU_OMP_THREADS_BIND" not in prepare(MODEL + ["--dp-size", "2"], cuda_available=True)[2]
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "0|1")  # the user's binding wins
    assert "SGLANG_CPU_OMP_THREADS_BIND" not in prepare(MODEL + ["--dp-size", "2"], cuda_available=False)[2]


def test_policy_none_is_plain_sglang():
    _, argv, env, _ = prepare(MODEL + ["--vase-policy", "none", "--page-size", "16"], cuda_available=True)
    assert "--disable-radix-cache" not in argv and "--page-size" in argv
    assert json.loads(env[ENV_VAR])["policy"] == "none"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--vase-budget", "100", "--vase-window", "32"], "multiple"),
        (["--vase-budget", "32", "--vase-window", "32"], "larger"),
        (["--vase-n-large", "5000"], "n_large"),
        (["--vase-budgett", "64"], "unknown sglang-vase flag"),
        (["--page-size", "16"], "page-size"),
        (["--enable-mixed-chunk"], "mixed"),
        (["--speculative-algorithm", "EAGLE"], "speculative"),
        (["--pp-size", "2"], "pipeline"),
        (["--attn-dp-size", "2"], "DP attention"),
        (["--enable-dp-attention"], "DP attention"),
        (["--disaggregation-mode", "decode"], "disaggregation"),
        (["--cuda-graph-backend-prefill", "breakable"], "prefill CUDA graph"),
        (["--cuda-graph-backend-prefill=full"], "prefill CUDA graph"),
        (["--vase-ring-rows", "-1"], "ring_rows"),
        (["--vase-workspace-mb", "0"], "workspace_mb"),
        (["--vase-mode", "lazy"], "unknown mode"),
    ],
)
def test_refused_flags(flags, message):
    with pytest.raises(LaunchError, match=message):
        prepare(MODEL + flags, cuda_available=True)


def test_request_params_merge_and_errors():
    defaults = VaseParams(budget=256, window=32)
    assert request_params(None, defaults) is defaults
    assert request_params({"vase": False}, defaults).enabled is False
    merged = request_params({"vase": {"budget": 128, "seed": 3}}, defaults)
    assert (merged.budget, merged.window, merged.seed, merged.n_large) == (128, 32, 3, None)
    assert merged.build_policy().n_pinned == 32  # budget // 4, re-derived for the new budget
    assert merged.slot_bound(prompt_len=10) == 160 and merged.slot_bound(prompt_len=500) == 532
    assert request_params({"vase": {"mode": "pressure"}}, defaults).mode == "pressure"
    kept = request_params({"vase": {"keep_prompt": True}}, defaults)
    assert kept.keep_prompt and kept.kept_prompt(500) == 500 and kept.slot_bound(prompt_len=500) == 500 + 256 + 32
    for bad, field in [({"budget": 100}, "multiple"), ({"window": 64}, "window"), ({"policy": 3}, "policy"),
                       ({"seed": -1}, "seed"), ({"n_large": 2, "policy": "streamingllm"}, "n_large"),
                       ({"budget": True}, "budget"), ({"x": 1}, "unknown"), ({"keep_prompt": 1}, "keep_prompt"),
                       ({"mode": "lazy"}, "mode"), ({"mode": 1}, "mode")]:
        with pytest.raises(ValueError, match=field):
            request_params({"vase": bad}, defaults)


def _resolve_on(platform: dict, extra: list[str]):
    """The launcher's argv for a CUDA machine with ``platform``'s facts, resolved by SGLang itself."""
    from sglang.srt.arg_groups.model_override_base import resolved_view
    from sglang.srt.runtime_context import override_platform
    from sglang.srt.server_args import prepare_server_args

    from sglang_vase.launch_server import check_resolved
    from sglang_vase.models import default_model_dir

    facts = {"is_cuda": True, "is_sm90": False, "is_sm100": False, "is_sm120": False,
             "is_hopper_with_cuda_12_3": False, "has_flashinfer": True, **platform}
    with override_platform(**facts):
        _, argv, _, notes = prepare(["--model-path", str(default_model_dir()), "--device", "cuda",
                                     "--mem-fraction-static", "0.8", *extra], cuda_available=True)
        server_args = prepare_server_args(argv)
        check_resolved(server_args)
        view = resolved_view(server_args)
        return view.attention_backend, view.page_size, notes


def test_blackwell_gets_a_page_one_attention_backend():
    """On compute capability 10.x SGLang's default attention backend (trtllm_mha) raises the page
    size to 64 after the launcher's --page-size 1: the launcher names a page-1 backend there (SGLang's
    own resolution, with the device mocked through its platform overrides)."""
    backend, page, notes = _resolve_on({"is_sm100": True}, [])
    assert (backend, page) == ("flashinfer", 1)
    assert any("compute capability 10.x" in n for n in notes)
    assert _resolve_on({"is_sm100": True, "has_flashinfer": False}, [])[:2] == ("triton", 1)
    # Hopper keeps SGLang's own choice (fa3, page size 1); nothing is added.
    backend, page, notes = _resolve_on({"is_sm90": True, "is_hopper_with_cuda_12_3": True}, [])
    assert (backend, page) == ("fa3", 1) and not any("compute capability" in n for n in notes)


@pytest.mark.parametrize("platform, backend", [({"is_sm100": True}, "trtllm_mha"), ({"is_sm100": True}, "fa4"),
                                               ({"is_sm90": True}, "trtllm_mha")])
def test_a_named_backend_that_needs_larger_pages_is_refused(platform, backend):
    with pytest.raises(LaunchError, match=f"page size 1.*{backend}|{backend}.*page size 1"):
        _resolve_on(platform, ["--attention-backend", backend])
