"""benchmarks/accuracy_grid.py and accuracy_stats.py: the grid's system specs, its paired
differences and loop measure, and one small grid end to end (phases, eviction seeds, resume, the
report) against a real sglang-vase server it starts on the embedded SmolLM2-135M model."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

import accuracy
import accuracy_grid
import accuracy_stats
from accuracy_grid import System

DATA_OK = (accuracy.DEFAULT_DATA_DIR / "math.jsonl").exists()


def test_parse_systems():
    systems = accuracy_grid.parse_systems("full:4, vase@128:4,snapkv@64:2")
    assert systems == [System("full", None, 4), System("vase", 128, 4), System("snapkv", 64, 2)]
    assert systems[0].label("m") == "m-full" and systems[1].label("m") == "m-vase-b128"
    assert systems[0].vase(32) is False
    assert systems[1].vase(32) == {"policy": "vase", "budget": 128, "window": 32}
    pressed = accuracy_grid.parse_systems("vase@128:4,vase@128/pressure:2")[1]
    assert pressed == System("vase", 128, 2, "pressure") and pressed.label("m") == "m-vase-b128-pressure"
    assert pressed.vase(32) == {"policy": "vase", "budget": 128, "window": 32, "mode": "pressure"}
    for bad in ("vase:4", "full@128:4", "vase@128", "vase@128:4,vase@128:2", "Vase@1:1", "vase@128/lazy:2"):
        with pytest.raises(ValueError, match="--systems"):
            accuracy_grid.parse_systems(bad)


def test_shard_argument():
    assert accuracy_grid.parse_args(["--model-path", "m", "--tag", "t", "--systems", "full:1"]).shard == (0, 1)
    assert accuracy_grid.parse_args(["--model-path", "m", "--tag", "t", "--systems", "full:1",
                                     "--shard", "1/2"]).shard == (1, 2)
    for bad in ("2/2", "1", "a/2", "-1/2"):
        with pytest.raises(SystemExit):
            accuracy_grid.parse_args(["--model-path", "m", "--tag", "t", "--systems", "full:1", "--shard", bad])


def test_appends_from_several_processes_keep_whole_lines(tmp_path):
    """Two grid shards append to the same partial file: every line stays whole (one write each)."""
    import multiprocessing as mp

    path = tmp_path / "p.jsonl"
    text = "x" * 20000  # longer than a buffered writer's chunk
    procs = [mp.get_context("fork").Process(target=_append_many, args=(path, i, text)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 2 * 50 and all(json.loads(x)["content"] == text for x in lines)


def _append_many(path, who, text):
    for i in range(50):
        accuracy.append_line(path, {"who": who, "i": i, "content": text})


def test_systems_with_fewer_samples_take_more_questions_per_phase():
    systems = accuracy_grid.parse_systems("full:4,vase@128:4,rkv@128:2,h2o@128:1,random@128:3")
    assert list(accuracy_grid.spans(systems, 8).values()) == [8, 8, 16, 32, 8]


def _job(label: str, n: int, questions: int, done: set[tuple[str, int]] = frozenset()) -> accuracy.Job:
    items = [{"qid": str(q), "prompt": f"p{q}", "gold": "1", "source_id": q} for q in range(questions)]
    return accuracy.Job(label, "math", "m", items, n, {}, None, 0, None, Path("unused"), "k",
                        {key: {} for key in done}, len(done))


def test_plan_measures_each_systems_first_whole_phase_and_streams_the_rest():
    full, vase, rkv = accuracy_grid.parse_systems("full:2,vase@64:2,rkv@64:1")
    # full: a past run left block 0 partly done (q0 both samples, q1 one); vase untouched; rkv
    # (1 sample: phases of 4 questions) measured by a past run
    jobs = {full: _job("full", 2, 8, {("0", 0), ("0", 1), ("1", 0)}), vase: _job("vase", 2, 8), rkv: _job("rkv", 1, 8)}
    alone, stream = accuracy_grid.plan([full, vase, rkv], jobs, 2, (0, 1), measured={"rkv"})
    assert [(p.system.policy, p.block, p.qids) for p in alone] == [("vase", 0, ["0", "1"]), ("full", 1, ["2", "3"])]
    assert [len(p.work) for p in alone] == [4, 4]
    streamed = [(j.label, it["qid"], s) for j, it, s in stream]
    assert streamed[:1] == [("full", "1", 1)]  # block 0's leftover, in phase order
    assert ("rkv", "0", 0) in streamed and ("rkv", "4", 0) in streamed
    assert len(streamed) == (1 + 4 * 2) + 6 * 2 + 8  # full: q1 s1 + q4-7; vase: q2-7; rkv: all
    assert len(set(streamed)) == len(streamed)
    assert not {("vase", q, s) for q in "01" for s in range(2)} & set(streamed)
    # shard 1/2 plans the other blocks only
    alone1, stream1 = accuracy_grid.plan([full, vase, rkv], jobs, 2, (1, 2), measured={"rkv"})
    assert [(p.system.policy, p.block) for p in alone1] == [("full", 1), ("vase", 1)]
    assert {it["qid"] for j, it, s in stream1 if j.label == "rkv"} == {"4", "5", "6", "7"}


def test_only_whole_phases_at_the_same_settings_count_as_measured():
    def phase(label, finished=32, pool=1000, concurrency=32):
        return {"label": label, "requests": 32, "finished": finished, "pool_tokens": pool, "concurrency": concurrency}

    phases = [phase("a"), phase("b", finished=0), phase("c", pool=999), phase("d", concurrency=8),
              {**phase("stream"), "systems": ["e"]}]
    assert accuracy_grid.measured_labels(phases, 1000, 32) == {"a"}


def test_pool_holds_full_length_requests():
    assert accuracy_grid.pool_tokens(longest_prompt=250, max_tokens=2048, requests=8) == 8 * 2298


def _recs(pass_by_q: dict[str, list[bool]]) -> list[dict]:
    return [{"qid": q, "sample": i, "correct": c} for q, cs in pass_by_q.items() for i, c in enumerate(cs)]


def test_paired_difference_matches_a_hand_computation():
    ref = _recs({"0": [True, True], "1": [True, False], "2": [False, False], "9": [True]})
    sys_ = _recs({"0": [True], "1": [False], "2": [True], "3": [True]})  # 3 and 9 are not shared
    d = accuracy_stats.paired_difference(sys_, ref)
    diffs = [0.0, -0.5, 1.0]
    mean = sum(diffs) / 3
    se = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2 / 3)
    assert d["n_questions"] == 3
    assert d["diff"] == pytest.approx(mean) and d["se"] == pytest.approx(se)
    assert d["ci95"] == pytest.approx([mean - 1.96 * se, mean + 1.96 * se])
    same = accuracy_stats.paired_difference(ref, ref)
    assert same["diff"] == 0.0 and same["se"] == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loops_are_told_from_solutions(seed):
    rng = random.Random(seed)
    solution = [rng.randrange(30000) for _ in range(600)]
    assert not accuracy_stats.is_loop(solution)
    # a solution that quotes one 40-token formula twice is still not a loop
    formula = solution[100:140]
    assert not accuracy_stats.is_loop(solution[:300] + formula + solution[300:])
    # nor one that writes a 200-token code block, then the block again with a line changed
    code = solution[:200]
    assert not accuracy_stats.is_loop(solution[200:300] + code + solution[300:350] + code[:150] + [7] + code[150:])
    cycle = [rng.randrange(30000) for _ in range(rng.randrange(20, 120))]
    looping = solution[:200] + cycle * (1400 // len(cycle))
    assert accuracy_stats.is_loop(looping)
    assert accuracy_stats.repeated_share(cycle * 10) == 1.0
    assert accuracy_stats.repeated_share(cycle * 2, ngram=len(cycle) // 2) == 0.0  # twice is not three times
    assert not accuracy_stats.is_loop(cycle[:10] * 6)  # under min_tokens: too short to call


@pytest.mark.slow
@pytest.mark.skipif(not DATA_OK, reason="reasoning data not found")
def test_grid_end_to_end_and_resume(tmp_path, monkeypatch):
    """Two systems on one server it starts: a measured first phase per system then the stream, the
    sample's seed as the eviction seed, evictions in the records, a resume that asks nothing, and
    the report."""
    from sglang_vase.models import default_model_dir

    calls = []
    real_post = accuracy.post_chat

    def spy(endpoint, body, timeout):
        calls.append(body)
        return real_post(endpoint, body, timeout)

    monkeypatch.setattr(accuracy, "post_chat", spy)
    argv = ["--model-path", str(default_model_dir()), "--tag", "t", "--systems", "full:1,vase@16:2",
            "--limit", "3", "--block", "2", "--max-tokens", "40", "--window", "8", "--concurrency", "6",
            "--out-dir", str(tmp_path)]
    result = accuracy_grid.main(argv)
    assert len(calls) == 3 * 1 + 3 * 2
    assert all((b["temperature"], b["top_p"], b["max_tokens"], b["n"]) == (0.6, 0.95, 40, 1) for b in calls)
    vase_calls = [b for b in calls if b["custom_params"]["vase"] is not False]
    assert all(b["custom_params"]["vase"]["seed"] == b["seed"] for b in vase_calls)
    assert {b["custom_params"]["vase"]["policy"] for b in vase_calls} == {"vase"}
    phases = [json.loads(x) for x in (tmp_path / "partial" / "accuracy_grid_t_phases.jsonl").read_text().splitlines()]
    # full has 1 sample per question, vase 2: a phase of full covers two blocks (4 questions); each
    # system's first phase is measured alone, the rest (vase's second block) streamed
    assert [(p.get("block"), p["label"]) for p in phases] == [(0, "t-full"), (0, "t-vase-b16"), (None, "stream")]
    assert [p["requests"] for p in phases] == [3, 4, 2] and phases[2]["systems"] == ["t-vase-b16"]
    assert all(p["finished"] == p["requests"] and p["output_tokens"] > 0 and p["max_running"] >= 1 for p in phases)
    assert phases[0]["pool_tokens"] % 8 == 0
    full, vase = result["rows"]
    assert (full["n_samples"], vase["n_samples"]) == (3, 6)
    assert vase["evicting_samples"] > 0 and full["evicting_samples"] == 0
    assert vase["vs_full"]["n_questions"] == 3 and "vs_full" not in full
    assert vase["served"]["phases"] == 1 and vase["served"]["output_tok_s"] > 0 and full["served"]["phases"] == 1
    assert "| vase | 16 |" in result["table"]
    assert len(result["plots"]) == 2 and all(Path(p).parent == tmp_path and Path(p).stat().st_size > 1000
                                             for p in result["plots"])

    calls.clear()
    again = accuracy_grid.main(argv)  # resumes: nothing left to ask, no server started
    assert calls == [] and again["rows"][1]["n_samples"] == 6
    assert len((tmp_path / "partial" / "accuracy_grid_t_phases.jsonl").read_text().splitlines()) == 3
