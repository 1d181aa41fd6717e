"""Smoke test of benchmarks/throughput.py: ``--quick`` end to end (plain SGLang and sglang-vase, both
workloads, the eviction overhead, both PNGs). The restricted baseline is the same code with SGLang's
radix cache and overlap scheduler off; test_defaults serves that setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import throughput as bench


def test_parse_log_lines():
    log = (
        "[2026-01-02 03:04:05.250] Decode batch, #running-req: 3, #token: 410, token usage: 0.41, "
        "cpu graph: False, gen throughput (token/s): 30.00, #queue-req: 1, \n"
        "[2026-01-02 03:04:05] Decode batch, #running-req: 2, #token: 300, token usage: 0.30, "
        "gen throughput (token/s): 20.50, #queue-req: 0,\n"
        "[2026-01-02 03:04:06.000] KV cache pool is full. Retract requests. #retracted_reqs: 2, "
        "#new_tokens_gained: 100, #new_token_ratio: 0.5 -> 0.7\n"
    )
    steps, retracts = bench.parse_log(log)
    assert [s["running"] for s in steps] == [3, 2]
    assert steps[0]["tokens"] == 410 and steps[0]["usage"] == 0.41 and steps[1]["gen_tps"] == 20.5
    assert steps[1]["t"] - steps[0]["t"] == pytest.approx(-0.25)
    assert retracts == [{"t": pytest.approx(steps[0]["t"] + 0.75), "n": 2}]
    assert bench.step_times_ms(steps, 3) == [pytest.approx(100.0)]
    assert bench.pct([1, 2, 3, 4], 50) == 2.5 and bench.pct([], 50) is None


def test_levels_name_the_physical_limit():
    assert bench.resolve_levels(["8", "limit", "limit+8", "16"], limit=32) == [8, 16, 32, 40]
    assert bench.resolve_levels(["limit-40"], limit=32) == [1]
    check = bench.limit_check({"32": {"max_running_requests": 31, "retractions_meta_info": 0,
                                      "retraction_events_log": 0},
                               "16": {"max_running_requests": 16}}, limit=32)
    assert check == {"32": {"max_running": 31, "within_5pct": True, "retractions": 0}}


@pytest.mark.slow
def test_quick_run(tmp_path):
    out = tmp_path / "throughput.json"
    result = bench.main(["--quick", "--systems", "sglang,sglang-vase", "--out", str(out), "--log-dir",
                         str(tmp_path / "logs"), "--no-progress"])
    data = json.loads(out.read_text())
    systems = {"sglang", "sglang-vase"}
    assert data["workloads"].keys() == {"distinct", "shared"}
    for key in ("cpu_count", "torch", "device", "date", "command"):
        assert key in data["machine"]
    settings = data["settings"]
    limit = settings["physical_limit"]
    assert settings["output_len"] == 64 and settings["levels"] == {"distinct": [2, limit + 2], "shared": [4]}
    assert "--disable-radix-cache" not in data["servers"]["sglang"]["command"]

    for workload, w in data["workloads"].items():
        assert w["systems"].keys() == result["workloads"][workload]["systems"].keys() == systems
        for system, entry in w["systems"].items():
            for n, level in entry["levels"].items():
                assert level["requests"] == int(n)
                assert level["output_tokens"] == int(n) * 64, (system, n)  # ignore_eos: full-length outputs
                assert level["output_tok_s"] > 0
                assert 1 <= level["max_running_requests"] <= int(n)
                assert 0 < level["peak_kv_tokens"] <= settings["pool_tokens"]
                for metric in ("ttft_ms", "tpot_ms"):
                    assert level[metric]["p50"] > 0 and level[metric]["p90"] >= level[metric]["p50"]
                assert len(level["trace"]["t_s"]) == len(level["trace"]["token_usage"]) > 0
                if workload == "shared":
                    assert level["prefix_hit_rate"] > 0, (system, n)  # samples read the shared prompt
        assert set(w["ratio_vase_vs"]) == {"sglang"}
        assert all(r > 0 for ratios in w["ratio_vase_vs"].values() for r in ratios.values())
    vase_levels = data["workloads"]["distinct"]["systems"]["sglang-vase"]["levels"]
    assert all(level["vase"]["evictions_total"] > 0 for level in vase_levels.values())
    assert str(limit + 2) in data["workloads"]["distinct"]["at_physical_limit"]

    overhead = data["servers"]["sglang-vase"]["overhead"]
    assert overhead["no_eviction_evictions"] == 0 and overhead["eviction_evictions"] > 0
    for name in ("eviction", "no_eviction"):
        assert overhead[name]["step_ms"]["n"] > 0 and overhead[name]["step_ms"]["p50"] > 0

    for path in data["plots"].values():
        png = Path(path)
        assert png.parent == tmp_path and png.stat().st_size > 1000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
