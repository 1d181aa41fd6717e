"""benchmarks/accuracy.py: answer extraction and grading, and the harness's tables, per-endpoint
settings and resume on canned responses (tests/test_accuracy_grid.py runs it against a real server)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import accuracy

DATA_OK = (accuracy.DEFAULT_DATA_DIR / "math.jsonl").exists()


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{42}.", "42"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\left\{ 1, \{2\} \right\}}", r"\left\{ 1, \{2\} \right\}"),  # escaped braces
    (r"\boxed{\sqrt{\frac{a}{b^{2}}}}", r"\sqrt{\frac{a}{b^{2}}}"),  # nested braces
    (r"first \boxed{1}, then \boxed{2}", "2"),  # the last box wins
    (r"$\boxed 7$", "7"),
    (r"\fbox{x+1}", "x+1"),
    (r"\boxed{\frac{1}{2", None),  # cut inside the box
    ("no box here", None),
    (None, None),
])
def test_extract_boxed(text, expected):
    assert accuracy.extract_boxed(text) == expected


@pytest.mark.parametrize("text, gold, kind, correct", [
    (r"\boxed{1/2}", "0.5", "math", True),
    (r"\boxed{3}", "4", "math", False),
    (r"\boxed{\dfrac{14}{3}}", r"\frac{14}{3}", "math", True),
    (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", "math", True),
    (r"\boxed{4.5\times 10^{33}}", "4.5e33", "math", True),  # minerva's e-notation golds
    (r"\boxed{\frac{1}{2n+2}}", r"$\frac{1}{2 n+2}$", "math", True),  # olympiadbench's $-wrapped golds
    (r"\boxed{27}", "27", "math", True),
    (r"\boxed{Evelyn}", r"\text{Evelyn}", "math", True),
    ("the answer is 4", "4", "math", False),  # no box, no credit
    (r"\boxed{\text{B}}", "B", "gpqa", True),
    (r"\boxed{(A)}", "A", "gpqa", True),
    (r"\boxed{C}", "A", "gpqa", False),
    (r"\boxed{A. 10^-4 ev}", "A", "gpqa", True),
    ("so the answer is (D).", "D", "gpqa", True),
    ("no letter", "A", "gpqa", False),
])
def test_grade(text, gold, kind, correct):
    assert accuracy.grade(text, gold, kind)[0] is correct


def test_amc_float_gold_and_normalize():
    assert accuracy._gold_str(27.0) == "27" and accuracy._gold_str(2.5) == "2.5"
    # the string fallback (only when a side does not parse)
    assert accuracy.normalize_answer(r"\text{ Evelyn }.") == accuracy.normalize_answer("evelyn")


def test_summarize_se():
    items = [{"qid": str(i), "source_id": i} for i in range(3)]
    recs = {}
    for i, hits in enumerate([[1, 1], [0, 1], [0, 0]]):
        for s, c in enumerate(hits):
            recs[(str(i), s)] = {"correct": bool(c), "completion_tokens": 10 * (s + 1),
                                 "finish_reason": "length" if s else "stop", "extracted": "1" if c else None}
    st = accuracy.summarize(items, recs, 2)
    assert st["pass@1"] == pytest.approx(0.5)
    assert st["se"] == pytest.approx(math.sqrt(0.25 / 3))  # std(1, .5, 0) = .5, / sqrt(3)
    assert st["mean_output_tokens"] == 15 and st["share_max_tokens"] == 0.5 and st["n_samples"] == 6


@pytest.mark.skipif(not DATA_OK, reason="reasoning data not found")
def test_load_task_prompts():
    math_items = accuracy.load_task("math", limit=2)
    assert len(math_items) == 2 and math_items[0]["prompt"].endswith(accuracy.MATH_SUFFIX)
    gpqa = accuracy.load_task("gpqa", limit=1)
    assert "\\boxed{}" in gpqa[0]["prompt"] and gpqa[0]["gold"] in "ABCD"


@pytest.mark.skipif(not DATA_OK, reason="reasoning data not found")
def test_levels_keep_each_questions_id():
    """A level filter keeps each question's id (its place in the file): its seeds and its finished
    samples are the same with or without the filter."""
    every = {it["qid"]: it for it in accuracy.load_task("math")}
    easy = accuracy.load_task("math", levels={1, 2})
    assert len(easy) == 133  # MATH-500 has 43 level-1 and 90 level-2 problems
    assert all(every[it["qid"]] == it for it in easy)
    assert [int(it["qid"]) for it in easy] == sorted(int(it["qid"]) for it in easy)
    assert len(accuracy.load_task("math", levels={1, 2}, limit=5)) == 5


@pytest.mark.skipif(not DATA_OK, reason="reasoning data not found")
def test_compare_two_endpoints_with_a_fake_server(tmp_path, monkeypatch):
    """Two endpoints into one table, per-endpoint vase params, resume, on canned responses."""
    calls = []

    def fake_post(endpoint, body, timeout):
        calls.append((endpoint, body))
        right = endpoint.endswith("good")
        answer = {"0": r"\left( 3, \frac{\pi}{2} \right)", "1": "p - q"}
        prompt = body["messages"][0]["content"]
        qid = "0" if "polar" in prompt else "1"
        text = f"... so \\boxed{{{answer[qid] if right else '0'}}}"
        return {"choices": [{"message": {"content": text}, "finish_reason": "stop" if right else "length"}],
                "usage": {"completion_tokens": 10 if right else 20, "prompt_tokens": 5}}

    monkeypatch.setattr(accuracy, "post_chat", fake_post)
    monkeypatch.setattr(accuracy, "served_model", lambda endpoint: "fake-model")
    kw = dict(n=3, max_tokens=64, limit=2, concurrency=2, out_dir=tmp_path, progress=False)
    res = accuracy.compare(["http://x/good", "http://x/bad"], "math", labels=["vase", "plain"],
                           vase_per_endpoint=[{"budget": 64}, None], **kw)
    good, bad = res["runs"]
    assert (good["pass@1"], good["se"], good["share_max_tokens"], good["mean_output_tokens"]) == (1.0, 0.0, 0.0, 10)
    assert (bad["pass@1"], bad["share_max_tokens"], bad["mean_output_tokens"]) == (0.0, 1.0, 20)
    assert len(calls) == 12
    assert all(b.get("custom_params") == {"vase": {"budget": 64}} for e, b in calls if e.endswith("good"))
    assert all("custom_params" not in b for e, b in calls if e.endswith("bad"))
    assert "| vase |" in res["table"] and "| plain |" in res["table"]
    for name in ("accuracy_math_vase.json", "accuracy_math_plain.json", "accuracy_math_vase_vs_plain.json",
                 "accuracy_math_vase_vs_plain.png"):
        assert (tmp_path / name).exists()
    accuracy.compare(["http://x/good", "http://x/bad"], "math", labels=["vase", "plain"],
                     vase_per_endpoint=[{"budget": 64}, None], **kw)
    assert len(calls) == 12  # resumed
    more = accuracy.run("http://x/good", "math", label="vase", vase={"budget": 64}, **{**kw, "n": 4})
    assert len(calls) == 14 and more["new_requests"] == 2 and more["resumed_samples"] == 6  # one more each
    assert more["n_samples"] == 8 and more["pass@1"] == 1.0
    accuracy.run("http://x/good", "math", label="vase", vase={"budget": 128}, **kw)
    assert len(calls) == 20  # other vase params: the old samples do not count
