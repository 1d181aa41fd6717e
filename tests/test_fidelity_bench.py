"""benchmarks/fidelity.py and its fidelity_* modules: the repetition detectors, the trigger
bookkeeping, the metrics, and one ``--quick`` run end to end (the batched teacher-forced replay + a
real sglang-vase server)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import fidelity
import fidelity_configs
import fidelity_engine
import fidelity_replay
import fidelity_report
from sglang_vase.engine.geometry import Geometry

DATA_OK = (fidelity.DEFAULT_DATA_DIR / "math.jsonl").exists()


def test_ngram_loop_rule():
    text = list(range(300))  # no repeats
    assert not fidelity_engine.has_ngram_loop(text)
    looped = list(range(100)) + [7, 8, 9] * 30
    assert fidelity_engine.has_ngram_loop(looped)
    # a 20-token block seen exactly twice is not a loop; three times is
    block = list(range(1000, 1020))
    assert not fidelity_engine.has_ngram_loop(list(range(50)) + block + list(range(60, 90)) + block)
    assert fidelity_engine.has_ngram_loop(block + [1] + block + [2] + block)


def test_tail_loop_and_distinct():
    assert fidelity_engine.has_tail_loop(list(range(300)) + [5, 6, 7, 8] * 30)
    assert not fidelity_engine.has_tail_loop(list(range(400)))
    assert fidelity_engine.distinct_ngram_ratio(list(range(10))) == 1.0
    assert fidelity_engine.distinct_ngram_ratio([1] * 10) == pytest.approx(1 / 7)
    assert fidelity_engine.distinct_ngram_ratio([1, 2]) is None


def test_budget_and_first_eviction():
    assert fidelity_configs.budget_for(384, 4, 16) == 96
    assert fidelity_configs.budget_for(64, 4, 8) == 16
    assert fidelity_configs.budget_for(64, 100, 8) == 16  # at least 2R
    # prompt 20, B 32, R 8: n reaches 40 (> 32, % 8 == 0) at the step of row 20 -> rows 21.. are evicted
    first, events = fidelity_configs.first_affected_row(20, 100, 32, 8)
    assert first == 21
    assert events == len([i for i in range(1, 100) if i >= 20 and (i - 20) % 8 == 0])
    assert fidelity_configs.first_affected_row(10, 5, 32, 8) == (5, 0)  # never evicts
    # an eviction after the last row (prompt 31, row 9 reaches n = 40) affects nothing: not counted
    assert fidelity_configs.first_affected_row(31, 10, 32, 8) == (10, 0)
    assert fidelity_configs.first_affected_row(31, 11, 32, 8) == (10, 1)
    # late=50 (pressure mode's schedule): one eviction after row 50 (n = 70 -> 32), then n reaches
    # 40, 48, ... from row 58 on, counted up to the row before the last
    first, events = fidelity_configs.first_affected_row(20, 100, 32, 8, late=50)
    assert first == 51 and events == 1 + len(range(58, 99, 8))
    for bad in (12, 99):  # at or below B (prompt 20 + 12 = 32), or after the last row's step
        with pytest.raises(ValueError, match="late"):
            fidelity_configs.first_affected_row(20, 100, 32, 8, late=bad)
    # regrow=50: n = 70 -> 32 after row 50, and back at 70 every 38 rows: after rows 88 (and 126)
    assert fidelity_configs.first_affected_row(20, 100, 32, 8, late=50, regrow=True) == (51, 2)
    # the second eviction after the last row (88) affects nothing: not counted
    assert fidelity_configs.first_affected_row(20, 89, 32, 8, late=50, regrow=True) == (51, 1)
    assert fidelity_configs.first_affected_row(20, 90, 32, 8, late=50, regrow=True) == (51, 2)
    with pytest.raises(ValueError, match="regrow"):
        fidelity_configs.first_affected_row(20, 100, 32, 8, late=12, regrow=True)


def test_token_metrics_against_the_definitions():
    """KL(full || row), top-1 agreement and NLL increase of each row against row 0, as computed from
    logit differences, equal their float64 definitions; a row equal to row 0 gets exactly 0."""
    torch.manual_seed(0)
    logits = 3.0 * torch.randn(4, 12, 50)
    logits[1] = logits[0]
    logits[2, :5] = logits[0, :5]
    logits[3] = logits[0] + 0.01 * torch.randn(12, 50)
    targets = logits[0].argmax(-1)
    lp = logits.double().log_softmax(-1)
    kl_want = (lp[0].exp() * (lp[0] - lp)).sum(-1)
    nll_want = lp[0].gather(-1, targets[:, None])[:, 0] - lp.gather(-1, targets[None, :, None].expand(4, -1, 1))[..., 0]
    top1_want = (lp.argmax(-1) == lp[0].argmax(-1)).double()
    kl, top1, nll = fidelity_replay.token_metrics(logits.clone(), targets)
    torch.testing.assert_close(kl, kl_want.clamp_min(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(nll, nll_want, atol=1e-5, rtol=1e-4)
    assert torch.equal(top1, top1_want)
    assert kl[1].max() == 0 and kl[2, :5].max() == 0 and nll[1].abs().max() == 0
    assert 0 < kl[3].max() < 1e-3 < kl[2, 5:].min()

    m = fidelity_replay.summarize(kl[2], top1[2], nll[2], first=5)
    assert m["kl_before_max"] == 0 and m["kl_after"] > 0 and m["rows_after"] == 7
    assert m["kl_all"] == pytest.approx(m["kl_after"] * 7 / 12)
    assert 0 <= m["top1_after"] <= 1


def test_policy_specs_and_configs():
    assert fidelity_configs.parse_policy_spec("vase") == ("vase", {})
    assert (fidelity_configs.parse_policy_spec("vase-adaptive:tau=2.5:n_large=8")
            == ("vase-adaptive", {"tau": 2.5, "n_large": 8}))
    with pytest.raises(ValueError, match="k=v"):
        fidelity_configs.parse_policy_spec("vase:tau")
    policy = fidelity_configs.build_policy("vase-adaptive:tau=3", 64, 16, "sorted")
    assert policy.tau == 3.0 and policy.sort_kept and policy.budget == 64
    late = fidelity_configs.build_policy("vase:late=512", 64, 16, "released")
    assert late.budget == 64 and fidelity_configs.schedule_of("vase:late=512") == (512, False)
    assert fidelity_configs.build_policy("vase:regrow=512", 64, 16, "released").budget == 64
    assert fidelity_configs.schedule_of("vase:regrow=512") == (512, True)
    assert fidelity_configs.schedule_of("vase") == (None, False)
    with pytest.raises(ValueError, match="late must"):
        fidelity_configs.schedule_of("vase:late=0")
    with pytest.raises(ValueError, match="regrow must"):
        fidelity_configs.schedule_of("vase:regrow=yes")
    with pytest.raises(ValueError, match="exclude"):
        fidelity_configs.schedule_of("vase:late=512:regrow=512")
    configs = fidelity_configs.make_configs(["snapkv", "vase:n_large=8"], ["released", "sorted"], {2: 64, 4: 32}, 3)
    assert configs[0]["policy"] == fidelity_configs.FULL
    assert len(configs) == 1 + 2 * 2 * 1 + 2 * 2 * 3  # deterministic: seed 0 only
    engine = fidelity_configs.engine_configs(configs)
    assert {c["policy"] for c in engine} == {fidelity_configs.FULL, "snapkv"}
    assert {c["order"] for c in engine[1:]} == {"released"}


def test_value_range_stats():
    values = torch.zeros(2, 104, 8)
    values[:, :, 0] = 1.0  # range 1 ...
    values[0, 50, 0] = 10.0  # ... but one token 10 on head 0
    values[:, :4, 0] = 1e3  # sinks are left out
    stats = fidelity_replay.value_range_stats(values)
    assert stats["max_over_median"] == [10.0, 1.0]
    assert stats["share_above_4x"] == [0.01, 0.0]
    assert stats["p99_over_median"][1] == 1.0


def _row(policy, kl, kl_std, top1=0.9, nll=0.1, order="sorted", compression=4, seeds=3):
    return {"policy": policy, "order": order, "compression": compression, "budget": 256, "kl_after": kl,
            "kl_after_std": kl_std, "top1_after": top1, "top1_after_std": 0.0, "nll_increase_after": nll,
            "nll_increase_after_std": 0.0, "replay_seeds": list(range(seeds))}


def test_adaptive_verdict_against_the_better_rival():
    rows = [_row("snapkv-sample", 0.10, 0.01), _row("vase", 0.12, 0.01),
            _row("vase-adaptive", 0.115, 0.01, top1=0.8, nll=0.1)]
    verdict = {v["metric"]: v for v in fidelity_report.adaptive_verdict(rows)}
    kl = verdict["kl_after"]
    assert kl["best_rival"] == "snapkv-sample" and kl["worse_by"] == pytest.approx(0.015)
    assert kl["two_se"] == pytest.approx(2 * math.sqrt(2 * 0.01 ** 2 / 3))  # 0.0163: within noise
    assert not kl["worse_beyond_noise"]
    assert verdict["top1_after"]["worse_by"] == pytest.approx(0.1) and verdict["top1_after"]["worse_beyond_noise"]
    assert not verdict["nll_increase_after"]["worse_beyond_noise"]  # a tie
    rows[2]["kl_after"] = 0.125  # 0.025 > 0.0163
    assert {v["metric"]: v for v in fidelity_report.adaptive_verdict(rows)}["kl_after"]["worse_beyond_noise"]
    rows[2]["kl_after"] = 0.05  # better than both: negative
    assert {v["metric"]: v for v in fidelity_report.adaptive_verdict(rows)}["kl_after"]["worse_by"] < 0
    assert fidelity_report.adaptive_verdict(rows[:2]) == []  # no adaptive rows: nothing to judge
    table = fidelity_report.verdict_table(fidelity_report.adaptive_verdict(rows))
    assert table.count("\n| sorted | 256 |") == 3 and "**yes**" in table


@pytest.mark.slow
@pytest.mark.skipif(not DATA_OK, reason="shared/data/reasoning/math.jsonl not found")
def test_an_interrupted_run_resumes_from_its_finished_prompts(tmp_path, monkeypatch):
    """The replay of a finished prompt is kept as it finishes: started again with the same settings,
    the run takes it from there (nothing is replayed) and writes the same rows."""
    out = tmp_path / "fidelity.json"
    argv = ["--quick", "--threads", "1", "--policies", "vase,snapkv,snapkv:late=40,snapkv:regrow=40", "--out",
            str(out)]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(fidelity, "render", interrupted)  # stopped after the replay, before the results file
        with pytest.raises(KeyboardInterrupt):
            fidelity.main(argv)
    partial = fidelity_replay.partial_path(out)
    first = [json.loads(line) for line in partial.read_text().splitlines()[1:]]
    assert [r["index"] for r in first] == [0]

    saved = partial.read_text()
    other = ["--quick", "--threads", "1", "--policies", "vase", "--out", str(out)]
    with pytest.raises(SystemExit, match=r"other settings \(differing: \['policies'"):
        fidelity.main(other)  # refused: the finished prompt is kept, not overwritten
    assert partial.read_text() == saved

    reordered = ["--quick", "--threads", "1", "--policies", "snapkv:regrow=40,snapkv:late=40,snapkv,vase", "--out",
                 str(out)]
    with monkeypatch.context() as m:
        m.setattr(fidelity_replay, "replay_prompt", interrupted)  # must not be needed
        data = fidelity.main(reordered)  # the same settings: the policies' order does not matter
    assert sorted(map(json.dumps, data["replay_runs"])) == sorted(map(json.dumps, first[0]["runs"]))
    assert data["prompts"][0]["continuation_text"] == first[0]["prompt"]["continuation_text"]
    assert out.exists() and not partial.exists()
    # snapkv:late=40: the full cache for 40 rows, one eviction, then the static schedule from B
    late = {r["compression"]: r for r in data["replay_runs"] if r["policy"] == "snapkv:late=40"}
    for c, b in data["config"]["budgets"].items():
        r = late[int(c)]
        assert r["first_affected_row"] == 41 and r["kl_before_max"] == 0.0 and r["kl_after"] > 0
        assert r["evictions"] == 1 + Geometry(b, 8).evictions_in(b, 64 - 40)
        # snapkv:regrow=40: the same first eviction, then only when back at prompt + 40 slots
        again = next(g for g in data["replay_runs"] if g["policy"] == "snapkv:regrow=40" and g["compression"] == int(c))
        prompt = data["prompts"][0]["prompt_tokens"]
        assert again["first_affected_row"] == 41 and again["evictions"] == 1 + (62 - 40) // (prompt + 40 - b)
        assert again["kl_after"] != r["kl_after"]  # the late row evicts again every R tokens
    fresh = fidelity.main(argv)["replay_runs"]  # a fresh run computes the same rows
    assert sorted(map(json.dumps, fresh)) == sorted(map(json.dumps, data["replay_runs"]))


@pytest.mark.slow
@pytest.mark.skipif(not DATA_OK, reason="shared/data/reasoning/math.jsonl not found")
def test_shards_split_the_prompts_and_the_last_writes_the_results(tmp_path):
    """Two shards share one per-prompt file: the first to finish stops naming the prompt it waits
    for, the second takes the first's prompt from the file and writes the same results as one
    unsharded run."""
    out = tmp_path / "fidelity.json"
    argv = ["--quick", "--prompts", "2", "--threads", "1", "--policies", "vase,snapkv", "--out", str(out)]
    with pytest.raises(SystemExit, match=r"shard 1/2 finished its prompts; prompts \[0\] are other shards'"):
        fidelity.main(argv + ["--shard", "1/2"])
    partial = fidelity_replay.partial_path(out)
    assert [json.loads(line)["index"] for line in partial.read_text().splitlines()[1:]] == [1]
    assert not out.exists()
    sharded = fidelity.main(argv + ["--shard", "0/2"])
    assert out.exists() and not partial.exists()
    assert [p["index"] for p in sharded["prompts"]] == [0, 1]
    whole = fidelity.main(argv + ["--out", str(tmp_path / "whole.json")])
    for key in ("replay_runs", "results", "value_ranges"):
        assert json.dumps(sharded[key]) == json.dumps(whole[key]), key
    with pytest.raises(SystemExit):
        fidelity.parse_args(argv + ["--shard", "0/2", "--engine"])  # the engine part is not sharded


def test_quick_run(tmp_path):
    out = tmp_path / "fidelity.json"
    returned = fidelity.main(["--quick", "--engine", "--threads", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["tables"] == returned["tables"]
    assert data["tables"]["value_ranges"].count("\n| ") == 30  # one row per layer under the header
    assert data["adaptive_verdict"] == []  # vase-adaptive is not among --quick's policies
    rendered = fidelity.main(["--render", "--out", str(out)])  # tables and plots again, without a run
    assert rendered["tables"] == data["tables"] and rendered["plots"] == data["plots"]

    for key in ("config", "machine", "date", "command", "prompts", "results", "replay_runs", "engine_runs",
                "engine", "timing", "tables", "plots", "value_ranges", "noise_floor_kl"):
        assert key in data, key
    cfg = data["config"]
    assert cfg["cont_len"] == 64 and cfg["window"] == 8 and cfg["compressions"] == [2, 4] and cfg["seeds"] == 1
    assert cfg["policies"] == ["vase", "snapkv", "streamingllm", "evict-large-v"] and cfg["orders"] == ["released"]
    assert cfg["budgets"] == {"2": 32, "4": 16}
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["torch"] == torch.__version__
    assert "--quick" in data["command"]
    assert len(data["value_ranges"]) == 30 and data["value_ranges"][0]["max_over_median"]["max"] > 1
    assert 0 <= data["noise_floor_kl"] < 0.05  # bf16 summation order only

    rows = {(r["policy"], r["compression"]): r for r in data["results"]}
    full = rows[("full", 1)]
    assert full["kl_all"] == 0.0 and full["top1_all"] == 1.0 and full["nll_increase_all"] == 0.0
    for pol in cfg["policies"]:
        for c in (2, 4):
            r = rows[(pol, c)]
            assert r["order"] == "released"
            assert r["evictions"] > 0 and r["engine_evictions"] > 0
            assert r["kl_before_max"] == 0.0  # rows before the first eviction are the full cache's
            for k in ("kl_after", "kl_all"):
                assert r[k] >= 0 and math.isfinite(r[k])
            assert r["kl_after"] > 0
            for k in ("top1_after", "top1_all", "repetition_rate", "tail_loop_rate"):
                assert 0 <= r[k] <= 1, (pol, c, k, r[k])
            assert 0 < r["distinct4"] <= 1
            assert math.isfinite(r["nll_increase_after"])
    # the evict-large-v negative control hurts more than VaSE at the tighter budget
    assert rows[("evict-large-v", 4)]["kl_after"] > rows[("vase", 4)]["kl_after"]

    # one request per (config, prompt), each the full length (EOS ignored)
    assert len(data["engine_runs"]) == 1 + 4 * 2
    assert all(r["tokens"] == 64 for r in data["engine_runs"])
    assert len(data["replay_runs"]) == 1 + 4 * 2

    assert "| vase |" in data["tables"]["released"]
    assert len(data["plots"]) == 5
    for p in data["plots"]:
        path = Path(p)
        assert path.parent == tmp_path and path.suffix == ".png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
