"""benchmarks/fidelity.py: the repetition detectors, the trigger bookkeeping, the metrics, and one
``--quick`` run end to end (teacher-forced replay in worker processes + a real sglang-vase server)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import fidelity

DATA_OK = (fidelity.DEFAULT_DATA_DIR / "math.jsonl").exists()


def test_ngram_loop_rule():
    text = list(range(300))  # no repeats
    assert not fidelity.has_ngram_loop(text)
    looped = list(range(100)) + [7, 8, 9] * 30
    assert fidelity.has_ngram_loop(looped)
    # a 20-token block seen exactly twice is not a loop; three times is
    block = list(range(1000, 1020))
    assert not fidelity.has_ngram_loop(list(range(50)) + block + list(range(60, 90)) + block)
    assert fidelity.has_ngram_loop(block + [1] + block + [2] + block)


def test_tail_loop_and_distinct():
    assert fidelity.has_tail_loop(list(range(300)) + [5, 6, 7, 8] * 30)
    assert not fidelity.has_tail_loop(list(range(400)))
    assert fidelity.distinct_ngram_ratio(list(range(10))) == 1.0
    assert fidelity.distinct_ngram_ratio([1] * 10) == pytest.approx(1 / 7)
    assert fidelity.distinct_ngram_ratio([1, 2]) is None


def test_budget_and_first_eviction():
    assert fidelity.budget_for(384, 4, 16) == 96
    assert fidelity.budget_for(64, 4, 8) == 16
    assert fidelity.budget_for(64, 100, 8) == 16  # at least 2R
    # prompt 20, B 32, R 8: n reaches 40 (> 32, % 8 == 0) at the step of row 20 -> rows 21.. are evicted
    first, events = fidelity.first_affected_row(20, 100, 32, 8)
    assert first == 21
    assert events == len([i for i in range(1, 100) if i >= 20 and (i - 20) % 8 == 0])
    assert fidelity.first_affected_row(10, 5, 32, 8) == (5, 0)  # never evicts
    # an eviction after the last row (prompt 31, row 9 reaches n = 40) affects nothing: not counted
    assert fidelity.first_affected_row(31, 10, 32, 8) == (10, 0)
    assert fidelity.first_affected_row(31, 11, 32, 8) == (10, 1)


def test_replay_metrics_identity_and_shift():
    torch.manual_seed(0)
    ref = torch.log_softmax(torch.randn(12, 50), -1)
    tokens = ref.argmax(-1).tolist()
    same = fidelity.replay_metrics(ref, ref.clone(), tokens, first=5)
    assert same["kl_all"] == 0 and same["kl_after"] == 0 and same["top1_all"] == 1 and same["nll_increase_all"] == 0
    other = torch.log_softmax(torch.randn(12, 50), -1)
    mixed = torch.cat([ref[:5], other[5:]])
    m = fidelity.replay_metrics(ref, mixed, tokens, first=5)
    assert m["kl_before_max"] == 0 and m["kl_after"] > 0
    assert m["kl_all"] == pytest.approx(m["kl_after"] * 7 / 12)
    assert 0 <= m["top1_after"] <= 1


@pytest.mark.slow
@pytest.mark.skipif(not DATA_OK, reason="shared/data/reasoning/math.jsonl not found")
def test_quick_run(tmp_path):
    out = tmp_path / "fidelity.json"
    returned = fidelity.main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["table"] == returned["table"]

    for key in ("config", "machine", "date", "command", "prompts", "results", "replay_runs", "engine_runs",
                "engine", "timing", "table", "plots"):
        assert key in data, key
    cfg = data["config"]
    assert cfg["cont_len"] == 64 and cfg["window"] == 8 and cfg["compressions"] == [2, 4] and cfg["seeds"] == 1
    assert cfg["policies"] == ["vase", "snapkv", "streamingllm", "evict-large-v"]
    assert cfg["budgets"] == {"2": 32, "4": 16}
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["torch"] == torch.__version__
    assert "--quick" in data["command"]

    rows = {(r["policy"], r["compression"]): r for r in data["results"]}
    full = rows[("full", 1)]
    assert full["kl_all"] == 0.0 and full["top1_all"] == 1.0 and full["nll_increase_all"] == 0.0
    assert full["kl_before_max"] == 0.0
    for pol in cfg["policies"]:
        for c in (2, 4):
            r = rows[(pol, c)]
            assert r["evictions"] > 0 and r["engine_evictions"] > 0
            assert r["kl_before_max"] == 0.0  # rows before the first eviction match the full cache exactly
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

    assert "| full |" in data["table"] and "| vase |" in data["table"]
    assert len(data["plots"]) == 3
    for p in data["plots"]:
        path = Path(p)
        assert path.parent == tmp_path and path.suffix == ".png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
