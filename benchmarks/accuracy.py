"""Reasoning accuracy (pass@1) of a served model, with the paper's protocol.

Runs one task against one or two OpenAI-compatible endpoints (plain SGLang or an sglang-vase
server) and reports, per endpoint:

- pass@1: for each question the mean correctness over its n samples, then the mean and standard
  error (sample std / sqrt(#questions)) across questions;
- the mean output length (completion tokens, from the server's ``usage``);
- the share of outputs that hit --max-tokens (``finish_reason == "length"``: loops, unfinished).

Protocol (as the paper): the served model's chat template (``/v1/chat/completions``, one user
turn); math-style tasks ask ``<question>\\nPlease reason step by step, and put your final answer
within \\boxed{}.``; GPQA uses the question as given in the data (it already carries its
multiple-choice instruction). Sampling T=0.6, top-p 0.95, n samples per question (16 for
AIME/HMMT, 8 otherwise), one request per sample. Grading: the last ``\\boxed{}`` of the output
against the gold answer with math-verify (normalised string comparison only when a side does
not parse); GPQA by the letter in the box.

``--vase-json '{"budget": 512}'`` sends ``custom_params: {"vase": {...}}`` with every request
(sglang-vase reads it; plain SGLang ignores it).

Every finished sample goes to ``<out-dir>/partial/accuracy_<task>_<label>.jsonl`` as it arrives; a
rerun with the same settings skips the (question, sample) pairs already there, so an interrupted
run resumes (the file is tracked by git: commit it to resume on another machine). Records made
with other settings (model, sampling, max tokens, vase params) are ignored. Outputs:
``<out-dir>/accuracy_<task>_<label>.json`` and a bar chart ``.png``; with two endpoints also
``accuracy_<task>_<label1>_vs_<label2>.json/.png`` and a markdown table on stdout.

    python benchmarks/accuracy.py --endpoint http://127.0.0.1:30000 --task aime24 \\
        [--endpoint2 http://127.0.0.1:30001 --labels vase,plain] [--n 16] [--max-tokens 32768] \\
        [--limit K] [--levels 1,2] [--concurrency 16] [--vase-json '{"budget": 2048}'] [--seed 0]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import threading
import time
from pathlib import Path

import requests

from common import DATA_DIR as DEFAULT_DATA_DIR, MATH_SUFFIX, REPO, RESULTS_DIR as DEFAULT_OUT_DIR, TEMPERATURE, TOP_P, \
    machine_info, problems

DEFAULT_MAX_TOKENS = 32768

# task -> (data file, kind, default n samples per question)
TASKS = {
    "math": ("math.jsonl", "math", 8),
    "aime24": ("aime24.jsonl", "math", 16),
    "aime25": ("aime25.jsonl", "math", 16),
    "aime26": ("aime26.jsonl", "math", 16),
    "hmmt": ("hmmt.jsonl", "math", 16),
    "amc": ("amc.jsonl", "math", 8),
    "minerva": ("minerva.jsonl", "math", 8),
    "olympiadbench": ("olympiadbench.jsonl", "math", 8),
    "gpqa": ("gpqa.jsonl", "gpqa", 8),
}

SMALL_MODEL_NOTE = ("served model is the embedded SmolLM2-135M demo model: accuracy near zero is expected; "
                    "this run checks the harness end to end, not the method")


# ----------------------------------------------------------------------------------------- data

def _gold_str(ans) -> str:
    if isinstance(ans, float) and ans.is_integer():
        return str(int(ans))
    return str(ans).strip()


def load_task(task: str, data_dir: str | Path | None = None, limit: int | None = None,
              levels: set[int] | None = None) -> list[dict]:
    """The task's questions: ``[{"qid", "prompt", "gold"}]`` in file order (first ``limit``), only
    those of ``levels`` (MATH's difficulty) if given. ``qid`` is the question's place in the file,
    so a question keeps its id, its sampling seeds and its finished samples under any filter."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    fname, kind, _ = TASKS[task]
    path = Path(data_dir or DEFAULT_DATA_DIR) / fname
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (use --data-dir)")
    items = []
    for position, (line_no, row, question) in enumerate(problems(path)):
        if "answer" not in row:
            raise ValueError(f"{path}:{line_no + 1}: a question without an 'answer'")
        if levels is not None and row.get("level") not in levels:
            continue
        prompt = question if kind == "gpqa" else question + MATH_SUFFIX
        items.append({"qid": str(position), "source_id": row.get("unique_id", row.get("id")),
                      "prompt": prompt, "gold": _gold_str(row["answer"])})
        if limit is not None and len(items) >= limit:
            break
    return items


# -------------------------------------------------------------------------------------- grading

def extract_boxed(text: str | None) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent/cut."""
    if not text:
        return None
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    i = idx + (len("\\boxed") if text.startswith("\\boxed", idx) else len("\\fbox"))
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":  # "\boxed 5" form
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2  # an escaped char (\{, \}, \\) never opens or closes the box
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
        j += 1
    return None  # unbalanced: the output was cut inside the box


_SCI = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+))\s*[eE]\s*([-+]?\d+)\s*$")


def _latexify(s: str) -> str:
    """'4.5e33' -> '4.5\\times 10^{33}' (math-verify's LaTeX parser reads 'e' as Euler's number)."""
    m = _SCI.match(s)
    return f"{m.group(1)}\\times 10^{{{m.group(2)}}}" if m else s


def normalize_answer(s: str) -> str:
    """Loose string form for the fallback comparison."""
    s = s.strip().strip("$")
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ ", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("^\\circ", "").replace("^{\\circ}", "")
    s = re.sub(r"\s+", "", s).rstrip(".").lower()
    return s


def _mv_timeout():
    # math-verify's timeouts use signal.alarm, which only works in the main thread.
    return 5 if threading.current_thread() is threading.main_thread() else None


def _parse(s: str):
    from math_verify import parse
    return parse(f"\\boxed{{{_latexify(s)}}}", parsing_timeout=_mv_timeout())


def _parsed_ok(p) -> bool:
    return bool(p) and any(not isinstance(x, str) for x in p)


def math_equal(pred: str, gold: str) -> bool:
    """math-verify equivalence; normalised string comparison when either side does not parse."""
    from math_verify import verify
    gold = gold.strip().strip("$").replace("$", "")  # olympiadbench golds carry $...$ (and "$69$,$84$")
    gold = re.sub(r"\bnp\.(\w+)", r"\\\1", gold)  # minerva: "np.arcsin(10/13)" -> "\arcsin(10/13)"
    try:
        g, p = _parse(gold), _parse(pred)
        if _parsed_ok(g) and _parsed_ok(p):
            return bool(verify(g, p, timeout_seconds=_mv_timeout()))
    except Exception:
        pass
    return normalize_answer(pred) == normalize_answer(gold)


_LETTER_IN_BOX = re.compile(r"^\(?\s*([A-Da-d])\s*\)?(?:$|[\s.:),])")
_LETTER_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*\(?\*?\*?([A-D])\b")


def extract_letter(text: str | None) -> str | None:
    """GPQA choice: the letter in the last \\boxed{} ('A', '\\text{A}', '(A)', 'A. 10^-4 ev');
    without a box, the last 'answer is X'."""
    box = extract_boxed(text)
    if box is not None:
        inner = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}", r"\1", box).strip()
        m = _LETTER_IN_BOX.match(inner)
        return m.group(1).upper() if m else None
    hits = _LETTER_ANSWER_IS.findall(text or "")
    return hits[-1] if hits else None


def grade(text: str | None, gold: str, kind: str = "math") -> tuple[bool, str | None]:
    """(correct, extracted answer) for one output."""
    if kind == "gpqa":
        letter = extract_letter(text)
        return (letter is not None and letter == gold.strip().upper()), letter
    pred = extract_boxed(text)
    if pred is None:
        return False, None
    return math_equal(pred, gold), pred


# -------------------------------------------------------------------------------------- serving

class FatalRequestError(RuntimeError):
    """The server refused a request (4xx): settings are wrong, retrying will not help."""


_local = threading.local()


def _session() -> requests.Session:
    if not hasattr(_local, "session"):
        _local.session = requests.Session()
    return _local.session


def post_chat(endpoint: str, body: dict, timeout: float) -> dict:
    """One /v1/chat/completions call (the only function that sends generation requests)."""
    r = _session().post(f"{endpoint.rstrip('/')}/v1/chat/completions", json=body, timeout=timeout)
    if 400 <= r.status_code < 500:
        raise FatalRequestError(f"{r.status_code}: {r.text[:500]}")
    r.raise_for_status()
    return r.json()


def served_model(endpoint: str) -> str:
    """The served model's id (part of the resume key); an unreachable server is an error."""
    try:
        r = requests.get(f"{endpoint.rstrip('/')}/v1/models", timeout=30)
    except requests.RequestException as e:
        raise ConnectionError(f"cannot reach {endpoint}: {e}") from None
    try:
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (requests.RequestException, ValueError, KeyError, IndexError):
        return "default"


def _sample(endpoint: str, body: dict, timeout: float, retries: int = 3) -> dict:
    delay = 2.0
    for attempt in range(retries + 1):
        t0 = time.time()
        try:
            resp = post_chat(endpoint, body, timeout)
            break
        except FatalRequestError:
            raise
        except (requests.RequestException, ValueError):
            if attempt == retries:
                raise
            time.sleep(delay)
            delay *= 2
    choice = resp["choices"][0]
    msg = choice.get("message") or {}
    usage = resp.get("usage") or {}
    per_choice = (resp.get("metadata") or {}).get("vase") or [None]
    return {"content": msg.get("content"), "reasoning": msg.get("reasoning_content"),
            "finish_reason": choice.get("finish_reason"),
            "completion_tokens": usage.get("completion_tokens"), "prompt_tokens": usage.get("prompt_tokens"),
            "latency_s": round(time.time() - t0, 3), "vase_stats": per_choice[0]}


# ------------------------------------------------------------------------------------ the run

def _sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:16]


def _label_of(endpoint: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", re.sub(r"^https?://", "", endpoint)).strip("-")


def load_partial(path: Path, config_key: str) -> dict[tuple[str, int], dict]:
    """Finished samples from a partial file with this config, keyed (qid, sample)."""
    done = {}
    if not path.exists():
        return done
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted write
            if rec.get("config_key") == config_key:
                done[(rec["qid"], rec["sample"])] = rec
    return done


def summarize(items: list[dict], records: dict[tuple[str, int], dict], n: int) -> dict:
    per_q = []
    for it in items:
        recs = [records[(it["qid"], s)] for s in range(n) if (it["qid"], s) in records]
        if recs:
            per_q.append({"qid": it["qid"], "source_id": it["source_id"], "n": len(recs),
                          "pass@1": sum(r["correct"] for r in recs) / len(recs)})
    samples = [records[(it["qid"], s)] for it in items for s in range(n) if (it["qid"], s) in records]
    q = len(per_q)
    mean = sum(p["pass@1"] for p in per_q) / q if q else float("nan")
    if q > 1:
        var = sum((p["pass@1"] - mean) ** 2 for p in per_q) / (q - 1)
        se = math.sqrt(var / q)
    else:
        se = 0.0 if q == 1 else float("nan")
    lengths = [r["completion_tokens"] for r in samples if r.get("completion_tokens") is not None]
    lat = [r["latency_s"] for r in samples if r.get("latency_s") is not None]
    return {
        "pass@1": mean, "se": se,
        "n_questions": q, "n_samples": len(samples), "n_correct": sum(r["correct"] for r in samples),
        "mean_output_tokens": sum(lengths) / len(lengths) if lengths else float("nan"),
        "share_max_tokens": (sum(r["finish_reason"] == "length" for r in samples) / len(samples)
                             if samples else float("nan")),
        "share_no_answer": (sum(r["extracted"] is None for r in samples) / len(samples)
                            if samples else float("nan")),
        "mean_latency_s": sum(lat) / len(lat) if lat else float("nan"),
        "per_question": per_q,
    }


@dataclasses.dataclass
class Job:
    """One system's samples on one task: its settings, its partial file and what is finished there.

    ``vase_seed="sample"`` gives every request the eviction seed ``custom_params.vase.seed`` equal
    to its sampling seed, so a stochastic policy draws the same way on a rerun."""

    label: str
    task: str
    model: str
    items: list[dict]
    n: int
    body: dict                       # sampling fields every request carries
    vase: dict | bool | None
    seed: int | None
    vase_seed: str | None
    partial: Path
    config_key: str
    done: dict[tuple[str, int], dict]
    resumed: int

    @property
    def kind(self) -> str:
        return TASKS[self.task][1]

    def todo(self, qids: set[str] | None = None) -> list[tuple[dict, int]]:
        """The (question, sample) pairs not finished yet, in question order (only ``qids`` if given)."""
        return [(it, s) for it in self.items if qids is None or it["qid"] in qids
                for s in range(self.n) if (it["qid"], s) not in self.done]

    def request(self, it: dict, s: int) -> dict:
        body = {**self.body, "messages": [{"role": "user", "content": it["prompt"]}]}
        sample_seed = None if self.seed is None else self.seed + int(it["qid"]) * 1000 + s
        if sample_seed is not None:
            body["seed"] = sample_seed
        if self.vase is not None:
            vase = self.vase
            if self.vase_seed == "sample" and isinstance(vase, dict) and sample_seed is not None:
                vase = {**vase, "seed": sample_seed}
            body["custom_params"] = {"vase": vase}
        return body

    def record(self, it: dict, s: int, res: dict) -> dict:
        rec = {"qid": it["qid"], "sample": s, "source_id": it["source_id"], "prompt_sha": _sha(it["prompt"]),
               "config_key": self.config_key, "gold": it["gold"], **res}
        rec["correct"], rec["extracted"] = grade(_graded_text(rec), it["gold"], self.kind)
        self.done[(it["qid"], s)] = rec
        return rec


def prepare(endpoint: str, task: str, label: str | None = None, n: int | None = None,
            max_tokens: int = DEFAULT_MAX_TOKENS, limit: int | None = None, levels: set[int] | None = None,
            vase: dict | bool | None = None, seed: int | None = None, temperature: float = TEMPERATURE,
            top_p: float = TOP_P, data_dir: str | Path | None = None, out_dir: str | Path | None = None,
            regrade: bool = False, vase_seed: str | None = None, model: str | None = None) -> Job:
    """A job with the samples its partial file already holds under the same settings."""
    if vase_seed not in (None, "sample"):
        raise ValueError(f"vase_seed must be None or 'sample', got {vase_seed!r}")
    label = label or _label_of(endpoint)
    n = n or TASKS[task][2]
    items = load_task(task, data_dir, limit, levels)
    out_dir = Path(out_dir or DEFAULT_OUT_DIR)
    (out_dir / "partial").mkdir(parents=True, exist_ok=True)
    partial = out_dir / "partial" / f"accuracy_{task}_{label}.jsonl"
    model = model or served_model(endpoint)
    config = {"model": model, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens,
              "vase": vase, "seed": seed}
    if vase_seed:  # only then, so the keys of runs made before the option stay valid
        config["vase_seed"] = vase_seed
    config_key = _sha(json.dumps(config, sort_keys=True))
    prompt_sha = {it["qid"]: _sha(it["prompt"]) for it in items}
    done = {k: r for k, r in load_partial(partial, config_key).items() if r.get("prompt_sha") == prompt_sha.get(k[0])}
    if regrade:
        golds = {it["qid"]: it["gold"] for it in items}
        for (qid, _), r in done.items():
            if qid in golds:
                r["correct"], r["extracted"] = grade(_graded_text(r), golds[qid], TASKS[task][1])
    body = {"model": model, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "n": 1}
    resumed = sum((it["qid"], s) in done for it in items for s in range(n))
    return Job(label, task, model, items, n, body, vase, seed, vase_seed, partial, config_key, done, resumed)


def execute(endpoint: str, work: list[tuple[Job, dict, int]], concurrency: int,
            request_timeout: float = 6 * 3600, progress: bool = True, desc: str = "") -> tuple[list[dict], list[str]]:
    """Send every (job, question, sample) of ``work`` (in that order, ``concurrency`` at a time);
    each finished sample is graded and appended to its job's partial file as it arrives.
    Returns the new records and the errors (a failed pair is retried by the next run)."""
    from tqdm import tqdm

    new, errors = [], []
    if not work:
        return new, errors
    bar = tqdm(total=len(work), desc=desc, disable=not progress, file=sys.stderr)
    pool = cf.ThreadPoolExecutor(max_workers=max(1, concurrency))
    futs = {pool.submit(_sample, endpoint, job.request(it, s), request_timeout): (job, it, s) for job, it, s in work}
    try:
        for fut in cf.as_completed(futs):
            job, it, s = futs[fut]
            bar.update(1)
            try:
                res = fut.result()
            except FatalRequestError:
                raise
            except Exception as e:  # noqa: BLE001 - counted, the pair is retried on resume
                errors.append(f"{job.label} q{it['qid']}/s{s}: {type(e).__name__}: {e}"[:300])
                continue
            rec = job.record(it, s, res)
            append_line(job.partial, rec)
            new.append(rec)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return new, errors


def append_line(path: Path, obj) -> None:
    """Append ``obj`` as one JSON line in a single write: processes appending to the same file (an
    accuracy grid in shards) never interleave their lines."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(obj) + "\n").encode())
    finally:
        os.close(fd)


def job_summary(job: Job, endpoint: str, new: int = 0, errors: list[str] | None = None, elapsed: float = 0.0,
                note: str | None = None, limit: int | None = None, levels: set[int] | None = None,
                concurrency: int | None = None) -> dict:
    """The summary a job's result file holds: its stats over every finished sample, and this call's work."""
    errors = errors or []
    stats = summarize(job.items, job.done, job.n)
    notes = [x for x in (note, SMALL_MODEL_NOTE if "smollm2-135m" in job.model.lower() else None) if x]
    return {
        "task": job.task, "label": job.label, "endpoint": endpoint, "model": job.model,
        **{k: v for k, v in stats.items() if k != "per_question"},
        "n_per_question": job.n, "limit": limit, "levels": sorted(levels) if levels else None,
        "max_tokens": job.body["max_tokens"], "temperature": job.body["temperature"],
        "top_p": job.body["top_p"], "vase": job.vase, "vase_seed": job.vase_seed, "seed": job.seed,
        "concurrency": concurrency, "new_requests": new, "resumed_samples": job.resumed, "n_errors": len(errors),
        "errors": errors[:20], "complete": stats["n_samples"] == len(job.items) * job.n,
        "runtime_s_this_call": round(elapsed, 2),
        "partial_file": _rel(job.partial), "config_key": job.config_key,
        "note": "; ".join(notes) or None, "machine": machine_info(), "per_question": stats["per_question"],
    }


def run(endpoint: str, task: str, label: str | None = None, n: int | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS, limit: int | None = None, levels: set[int] | None = None,
        concurrency: int = 16,
        vase: dict | None = None, seed: int | None = None, temperature: float = TEMPERATURE,
        top_p: float = TOP_P, data_dir: str | Path | None = None, out_dir: str | Path | None = None,
        request_timeout: float = 6 * 3600, note: str | None = None, progress: bool = True,
        plot: bool = True, regrade: bool = False) -> dict:
    """Run (or resume) one task against one endpoint; write and return the summary dict."""
    out_dir = Path(out_dir or DEFAULT_OUT_DIR)
    job = prepare(endpoint, task, label, n, max_tokens, limit, levels, vase, seed, temperature, top_p, data_dir,
                  out_dir, regrade)
    t0 = time.time()
    new, errors = execute(endpoint, [(job, it, s) for it, s in job.todo()], concurrency, request_timeout, progress,
                          desc=f"{task}/{job.label}")
    summary = job_summary(job, endpoint, len(new), errors, time.time() - t0, note, limit, levels, concurrency)
    _write_json(out_dir / f"accuracy_{task}_{job.label}.json", summary)
    if plot:
        plot_bars([summary], out_dir / f"accuracy_{task}_{job.label}.png", task)
    return summary


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _graded_text(rec: dict) -> str:
    # With a reasoning parser the answer is in content; the reasoning part is searched too, so a
    # box written there still counts (the last box wins).
    return "\n".join(x for x in (rec.get("reasoning"), rec.get("content")) if x)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


def markdown_table(summaries: list[dict]) -> str:
    rows = ["| label | model | pass@1 | ± SE | questions | samples | mean output tokens | at max tokens | errors |",
            "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        rows.append(f"| {s['label']} | {s['model']} | {s['pass@1']:.4f} | {s['se']:.4f} | {s['n_questions']} | "
                    f"{s['n_samples']} | {s['mean_output_tokens']:.1f} | {s['share_max_tokens']:.1%} | {s['n_errors']} |")
    return "\n".join(rows)


def plot_bars(summaries: list[dict], path: Path, task: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [s["label"] for s in summaries]
    vals = [0.0 if math.isnan(s["pass@1"]) else s["pass@1"] for s in summaries]
    errs = [0.0 if math.isnan(s["se"]) else s["se"] for s in summaries]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(labels), 3.2))
    bars = ax.bar(labels, vals, yerr=errs, capsize=6, color=["#4C72B0", "#DD8452", "#55A868"][:len(labels)])
    for b, v, e in zip(bars, vals, errs):
        ax.text(b.get_x() + b.get_width() / 2, v + e + 0.01, f"{v:.3f}±{e:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, max(1.0, max(v + e for v, e in zip(vals, errs)) + 0.1))
    ax.set_ylabel("pass@1 ± SE (over questions)")
    s0 = summaries[0]
    ax.set_title(f"{task}: {s0['n_questions']} q × {s0['n_per_question']} samples, max {s0['max_tokens']} tok",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(endpoints: list[str], task: str, labels: list[str] | None = None,
            vase_per_endpoint: list[dict | None] | None = None, out_dir: str | Path | None = None,
            **kw) -> dict:
    """The same task against several endpoints (run one after the other): one table."""
    labels = labels or [_label_of(e) for e in endpoints]
    if len(labels) != len(endpoints) or len(set(labels)) != len(labels):
        raise ValueError("need one distinct label per endpoint")
    vase_per_endpoint = vase_per_endpoint or [kw.pop("vase", None)] * len(endpoints)
    kw.pop("vase", None)
    out_dir = Path(out_dir or DEFAULT_OUT_DIR)
    summaries = [run(e, task, label=l, vase=v, out_dir=out_dir, **kw)
                 for e, l, v in zip(endpoints, labels, vase_per_endpoint)]
    table = markdown_table(summaries)
    combined = {"task": task, "labels": labels, "table": table, "runs": summaries}
    if len(summaries) > 1:
        stem = f"accuracy_{task}_{'_vs_'.join(labels)}"
        _write_json(out_dir / f"{stem}.json", combined)
        if kw.get("plot", True):
            plot_bars(summaries, out_dir / f"{stem}.png", task)
    return combined


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", required=True, help="server base URL, e.g. http://127.0.0.1:30000")
    p.add_argument("--endpoint2", help="a second server for the same table")
    p.add_argument("--labels", help="comma-separated labels, one per endpoint (default: host-port)")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--n", type=int, help="samples per question (default 16 for AIME/HMMT, 8 otherwise)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--limit", type=int, help="only the first K questions")
    p.add_argument("--levels", help="only questions of these difficulty levels, e.g. 1,2 (MATH-500)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--top-p", type=float, default=TOP_P)
    p.add_argument("--seed", type=int, help="per-sample sampling seed = seed + 1000*question + sample")
    p.add_argument("--vase-json", help="JSON object sent as custom_params.vase with every request")
    p.add_argument("--vase-json2", help="custom_params.vase for --endpoint2 only ('null': send none)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per request")
    p.add_argument("--note", help="free text stored in the result JSON")
    p.add_argument("--regrade", action="store_true", help="re-grade resumed samples with the current grader")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    endpoints = [a.endpoint] + ([a.endpoint2] if a.endpoint2 else [])
    labels = [x.strip() for x in a.labels.split(",")] if a.labels else None
    vase = json.loads(a.vase_json) if a.vase_json else None
    vases = [vase] * len(endpoints)
    if a.endpoint2 and a.vase_json2 is not None:
        vases[1] = json.loads(a.vase_json2)
    t0 = time.time()
    res = compare(endpoints, a.task, labels=labels, vase_per_endpoint=vases, out_dir=a.out_dir, n=a.n,
                  max_tokens=a.max_tokens, limit=a.limit, concurrency=a.concurrency, seed=a.seed,
                  levels={int(x) for x in a.levels.split(",")} if a.levels else None,
                  temperature=a.temperature, top_p=a.top_p, data_dir=a.data_dir, request_timeout=a.timeout,
                  note=a.note, progress=not a.no_progress, plot=not a.no_plot, regrade=a.regrade)
    print(res["table"])
    for s in res["runs"]:
        if s["note"]:
            print(f"note ({s['label']}): {s['note']}")
        if s["n_errors"]:
            print(f"{s['label']}: {s['n_errors']} samples failed (rerun to retry them); first: {s['errors'][0]}")
    print(f"total {time.time() - t0:.1f}s; results in {a.out_dir}")
    return 0 if all(s["complete"] for s in res["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
