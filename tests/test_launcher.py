"""The launcher's command-line handling and the per-request parameter rules, without a server."""

from __future__ import annotations

import json

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
                 "--disable-radix-cache", "--disable-overlap-schedule", "--page-size"):
        assert flag in argv
    assert not any(a.startswith("--vase") for a in argv)
    assert any("CPU route" in n for n in notes)


def test_user_flags_win_and_gpu_route_adds_no_cpu_flags():
    _, argv, env, _ = prepare(MODEL + ["--max-total-tokens", "999", "--page-size", "1"], cuda_available=True)
    assert argv.count("--max-total-tokens") == 0 or argv[argv.index("--max-total-tokens") + 1] == "999"
    assert "--device" not in argv and "SGLANG_USE_CPU_ENGINE" not in env
    assert argv.count("--page-size") == 1


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
    for bad, field in [({"budget": 100}, "multiple"), ({"window": 64}, "window"), ({"policy": 3}, "policy"),
                       ({"seed": -1}, "seed"), ({"n_large": 2, "policy": "streamingllm"}, "n_large"),
                       ({"budget": True}, "budget"), ({"x": 1}, "unknown")]:
        with pytest.raises(ValueError, match=field):
            request_params({"vase": bad}, defaults)
