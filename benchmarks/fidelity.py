"""Fidelity of KV-cache eviction policies: how far does an evicted cache move the model?

Two measurements, on math prompts (``<problem>\\nPlease reason step by step, and put your final answer
within \\boxed{}.`` in the model's chat template):

1. Teacher-forced replay (reference decoder, ``sglang_vase.reference.replay``; tests prove it equal
   to the engine path). For each prompt a full-cache greedy continuation of ``--cont-len`` tokens is
   generated (EOS ignored) while its next-token log-probs are recorded (the loop of
   ``replay.generate``, greedy, keeping the log-probs). That continuation is then replayed with
   ``replay.teacher_forced`` under every policy x budget (x seed for stochastic policies). Per row
   (row i predicts continuation token i):
   - KL(full || evicted) of the next-token distributions (float64, each row clamped at >= 0
     against rounding),
   - top-1 agreement: argmax of the evicted distribution == argmax of the full one (the greedy token),
   - NLL increase: -log p_evicted(token_i) - (-log p_full(token_i)).
   Each is averaged over the rows computed after the first eviction ("after": the rows whose cache
   had been evicted at least once, found by replaying the engine trigger ``should_evict`` on the
   physical length) and over all rows ("all"). Per (policy, compression, seed) the per-prompt means
   are averaged over prompts; stochastic policies report mean and std (ddof=1) over seeds 0..S-1,
   deterministic ones run once (seed 0). The same seeds are used for every policy. A ``full`` row
   replays the continuation with ``teacher_forced`` and no policy: KL 0 and top-1 1 by construction
   (a check of the row alignment and of determinism). ``kl_before_max`` (rows before the first
   eviction) must be 0 as well.

2. Free generation in the real engine: one sglang-vase server (server window = R) gets, for every
   policy x budget (x seed for stochastic policies) and the full cache (``custom_params
   {"vase": false}``), one request per prompt (all requests concurrently), ``max_new_tokens =
   cont_len``, temperature 0.6, top-p 0.95, ``ignore_eos`` (``--engine-prompts K`` uses K prompts here,
   the first --prompts of them shared with the replay). (SGLang honours ``sampling_seed`` only
   with deterministic inference, so the token sampling itself is not seeded; the eviction seed is.)
   Metrics per output (token ids):
   - loop: some 20-gram of tokens occurs >= 3 times in the output (occurrences may overlap). A
     periodic run of period p <= 20 triggers it once it is 20 + 2p tokens long; a normal
     step-by-step solution of a few hundred tokens essentially never repeats a 20-token span 3 times.
     ``repetition_rate`` = share of outputs with a loop.
   - tail_loop (secondary): the last 25% of the output is one block of period p <= 64 repeated >= 3
     times (tail[i] == tail[i + p] for all i, len(tail) >= 3p).
   - distinct-4: unique 4-grams / 4-grams of the output; ``distinct4`` is its mean.

Compression c means budget B = cont_len / c rounded to a multiple of R (at least 2R), as the VaSE
paper sizes budgets against the generation length; the prompt (prefilled uncompressed, cut down at
the first eviction) adds to the context, so ``effective_compression`` = (prompt + cont_len) / B is
recorded too.

Defaults (about 20-30 minutes on 2 shared CPU cores, bf16): 2 prompts (the first math.jsonl problems
whose chat prompt fits --max-prompt-tokens), cont_len 384, window 16, compressions 2,4,8 (B = 192, 96,
48), 2 seeds, every registered policy, 2 worker processes with one torch thread each. bf16 is the
served dtype of the embedded SmolLM2-135M (its weights are bf16); ``--dtype float32`` is ~1.5x slower.
``--quick``: 1 prompt, cont_len 64, window 8, compressions 2,4, 1 seed, policies vase, snapkv,
streamingllm, evict-large-v (< 3 minutes).

Outputs: ``--out`` (default benchmarks/results/fidelity.json) and next to it ``<stem>_kl.png``,
``<stem>_top1.png``, ``<stem>_repetition.png``; a markdown table at 4x (or the compression nearest to
it) on stdout, sorted by KL.

    python benchmarks/fidelity.py [--quick] [--prompts 2] [--cont-len 384] [--compressions 2,4,8]
        [--window 16] [--seeds 2] [--policies vase,snapkv,...] [--workers 2] [--no-engine]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as _dt
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import torch

from sglang_vase.serving import Server

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DATA_DIR = ROOT.parent / "shared/data/reasoning"
DEFAULT_OUT = HERE / "results" / "fidelity.json"
MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
TEMPERATURE = 0.6
TOP_P = 0.95
# One torch thread per server process: the replay workers share the cores.
SERVER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# Loop detectors (see the module docstring).
LOOP_NGRAM = 20
LOOP_MIN_COUNT = 3
TAIL_FRACTION = 0.25
TAIL_MAX_PERIOD = 64
TAIL_MIN_REPEATS = 3

DEFAULTS = dict(prompts=2, cont_len=384, window=16, compressions="2,4,8", seeds=2, policies=None, workers=2)
QUICK = dict(prompts=1, cont_len=64, window=8, compressions="2,4", seeds=1,
             policies="vase,snapkv,streamingllm,evict-large-v")
FULL = "full"


def _one_thread() -> None:
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already started
        pass


# --------------------------------------------------------------------------------------- prompts

def load_prompts(tokenizer, data_dir: Path, dataset: str, n: int, max_prompt_tokens: int) -> list[dict]:
    """The first ``n`` problems of ``<dataset>.jsonl`` whose chat prompt has <= max_prompt_tokens."""
    path = Path(data_dir) / f"{dataset}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (use --data-dir)")
    out = []
    with open(path) as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            question = row.get("problem") or row.get("question")
            if not question:
                continue
            messages = [{"role": "user", "content": question + MATH_SUFFIX}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):  # transformers may return a BatchEncoding
                ids = ids["input_ids"]
            ids = [int(t) for t in ids]
            if len(ids) > max_prompt_tokens:
                continue
            out.append({"index": len(out), "line": line_no, "source_id": row.get("unique_id", row.get("id")),
                        "prompt_tokens": len(ids), "input_ids": ids})
            if len(out) >= n:
                break
    if len(out) < n:
        raise ValueError(f"only {len(out)} problems of {path} fit --max-prompt-tokens {max_prompt_tokens}")
    return out


def budget_for(cont_len: int, compression: float, window: int) -> int:
    """B = cont_len / c rounded to a multiple of R, at least 2R (B > R, B % R == 0)."""
    return max(2 * window, int(round(cont_len / compression / window)) * window)


def first_affected_row(prompt_len: int, cont_len: int, budget: int, window: int) -> tuple[int, int]:
    """(first row computed after an eviction, evictions that affect a row), from the engine trigger.

    Row 0 comes from the prefill; row i >= 1 from the decode step of continuation token i-1, which
    appends it (n += 1), computes the logits, then evicts if ``should_evict(n)``. The eviction after
    step i first affects row i + 1; one after the last row affects nothing and is not counted (the
    engine, whose request ends there, does not run it either)."""
    from sglang_vase.engine.selection import should_evict

    n, first, events = prompt_len, cont_len, 0
    for i in range(1, cont_len):
        n += 1
        if should_evict(n, budget, window):
            n = budget
            if i + 1 < cont_len:
                events += 1
                first = min(first, i + 1)
    return first, events


# --------------------------------------------------------------------------------------- workers

_W: dict = {}


def _init_worker(model_path: str, dtype_name: str) -> None:
    _one_thread()
    from sglang_vase.reference.replay import load_model

    _W["model"] = load_model(model_path, getattr(torch, dtype_name))
    _W["refs"] = {}


def _reference_task(job: dict) -> dict:
    """Full-cache greedy continuation (EOS ignored) and its log-probs, saved to ``job['ref_path']``."""
    from sglang_vase.reference.replay import EvictingDecoder

    t0 = time.time()
    model = _W["model"]
    dec = EvictingDecoder(model, None)  # the loop of replay.generate (greedy), keeping the log-probs
    logits = dec.prefill(job["prompt_ids"])
    tokens, rows = [], []
    for i in range(job["cont_len"]):
        lp = torch.log_softmax(logits.float().cpu(), dim=-1)
        token = int(torch.argmax(lp))
        tokens.append(token)
        rows.append(lp)
        if i + 1 < job["cont_len"]:
            logits = dec.step(token)
    torch.save({"tokens": tokens, "logprobs": torch.stack(rows)}, job["ref_path"])
    return {"prompt": job["prompt"], "tokens": tokens, "seconds": time.time() - t0}


def _reference(prompt: int, path: str) -> dict:
    if prompt not in _W["refs"]:
        _W["refs"].clear()  # one prompt at a time is enough (jobs are ordered by prompt)
        _W["refs"][prompt] = torch.load(path)
    return _W["refs"][prompt]


def replay_metrics(ref_lp: torch.Tensor, lp: torch.Tensor, tokens: list[int], first: int) -> dict:
    """Per-run metrics of evicted log-probs ``lp`` against the full-cache ``ref_lp`` (both [T, V])."""
    ref64, lp64 = ref_lp.double(), lp.double()
    kl = (ref64.exp() * (ref64 - lp64)).sum(-1).clamp_min(0.0)  # [T]
    top1 = (lp.argmax(-1) == ref_lp.argmax(-1)).double()
    idx = torch.tensor(tokens, dtype=torch.long)[:, None]
    nll_inc = (ref64.gather(1, idx) - lp64.gather(1, idx))[:, 0]
    t = ref_lp.shape[0]
    out = {"rows": t, "first_affected_row": first, "rows_after": t - first,
           "kl_before_max": float(kl[:first].max()) if first > 0 else 0.0}
    for name, v in (("kl", kl), ("top1", top1), ("nll_increase", nll_inc)):
        out[f"{name}_all"] = float(v.mean())
        out[f"{name}_after"] = float(v[first:].mean()) if first < t else None
    return out


def _replay_task(job: dict) -> dict:
    from sglang_vase.policies import get_policy
    from sglang_vase.reference.replay import teacher_forced

    t0 = time.time()
    ref = _reference(job["prompt"], job["ref_path"])
    tokens = ref["tokens"]
    if job["policy"] == FULL:
        policy, first, events = None, len(tokens), 0
    else:
        policy = get_policy(job["policy"], budget=job["budget"], window=job["window"])
        first, events = first_affected_row(job["prompt_len"], len(tokens), job["budget"], job["window"])
    lp = teacher_forced(_W["model"], job["prompt_ids"], tokens, policy=policy, seed=job["seed"])
    metrics = replay_metrics(ref["logprobs"], lp, tokens, first)
    metrics["evictions"] = events
    return {**{k: job[k] for k in ("prompt", "policy", "compression", "budget", "seed")},
            **metrics, "seconds": time.time() - t0}


def _run_jobs(pool, fn, jobs: list[dict], label: str, t_start: float) -> list[dict]:
    results = []
    it = pool.imap_unordered(fn, jobs) if pool is not None else map(fn, jobs)
    for k, res in enumerate(it, 1):
        results.append(res)
        what = f"{res.get('policy', 'reference')} c={res.get('compression', '-')} s={res.get('seed', '-')}"
        print(f"[fidelity] {label} {k}/{len(jobs)} prompt {res['prompt']} {what} "
              f"({res['seconds']:.0f}s, elapsed {time.time() - t_start:.0f}s)", flush=True)
    return results


# ---------------------------------------------------------------------------------- repetition

def has_ngram_loop(tokens: list[int], n: int = LOOP_NGRAM, min_count: int = LOOP_MIN_COUNT) -> bool:
    """Some n-gram occurs >= min_count times (overlapping occurrences count)."""
    if len(tokens) < n:
        return False
    counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return max(counts.values()) >= min_count


def has_tail_loop(tokens: list[int], fraction: float = TAIL_FRACTION, max_period: int = TAIL_MAX_PERIOD,
                  min_repeats: int = TAIL_MIN_REPEATS) -> bool:
    """The last ``fraction`` of the tokens is periodic with a period p <= max_period repeated >= min_repeats times."""
    tail = tokens[len(tokens) - int(len(tokens) * fraction):]
    for p in range(1, min(max_period, len(tail) // min_repeats) + 1):
        if all(tail[i] == tail[i + p] for i in range(len(tail) - p)):
            return True
    return False


def distinct_ngram_ratio(tokens: list[int], n: int = 4) -> float | None:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


# -------------------------------------------------------------------------------------- engine

class EngineRun(threading.Thread):
    """The free-generation part in a background thread, so that the server's start (minutes on a
    loaded CPU) and its batched decoding overlap the replay workers. Every config (policy,
    compression, budget, seed) x prompt is one request, all in flight at once (up to
    --engine-concurrency). ``abort()`` kills the server; ``join()`` then ``outcome()``."""

    def __init__(self, args, model_path: str, prompts: list[dict], configs: list[dict], t_start: float):
        super().__init__(name="fidelity-engine", daemon=True)
        self.args, self.model_path, self.prompts, self.configs, self.t_start = args, model_path, prompts, configs, t_start
        self.cancel = threading.Event()
        self.server: Server | None = None
        self.runs: list[dict] = []
        self.info: dict = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 -- re-raised by outcome()
            self.error = e
        finally:
            if self.server is not None:
                self.server.stop()

    def abort(self) -> None:
        self.cancel.set()
        if self.server is not None:
            self.server.stop()

    def outcome(self) -> tuple[list[dict], dict]:
        if self.error is not None:
            raise RuntimeError(f"engine part failed: {self.error}") from self.error
        return self.runs, self.info

    def _run(self) -> None:
        args, t0 = self.args, time.time()
        jobs = [(cfg, p) for cfg in self.configs for p in self.prompts]
        server_budget = max([c["budget"] for c in self.configs if c["policy"] != FULL] or [2 * args.window])
        self.server = server = Server(
            ["--model-path", self.model_path, "--vase-budget", str(server_budget), "--vase-window", str(args.window),
             "--random-seed", "0"], env=SERVER_ENV, wait=False)
        self.info = {"server_cmd": shlex.join(server.cmd), "requests": len(jobs)}
        server.wait_ready(timeout=900, cancel=self.cancel)
        self.info["startup_seconds"] = time.time() - t0
        print(f"[fidelity] engine: server up in {self.info['startup_seconds']:.0f}s; {len(jobs)} requests of "
              f"{args.cont_len} tokens", flush=True)

        def one(item):
            cfg, p = item
            vase = False if cfg["policy"] == FULL else {
                "policy": cfg["policy"], "budget": cfg["budget"], "window": args.window, "seed": cfg["seed"]}
            res = server.generate(input_ids=p["input_ids"], max_new_tokens=args.cont_len, vase=vase, timeout=7200,
                                  temperature=TEMPERATURE, top_p=TOP_P, ignore_eos=True)
            ids = res["output_ids"]
            meta = res.get("meta_info", {})
            return {**{k: cfg[k] for k in ("policy", "compression", "budget", "seed")}, "prompt": p["index"],
                    "tokens": len(ids), "loop": has_ngram_loop(ids), "tail_loop": has_tail_loop(ids),
                    "distinct4": distinct_ngram_ratio(ids),
                    "evictions": (meta.get("vase") or {}).get("evictions", 0)}

        t1 = time.time()
        with cf.ThreadPoolExecutor(max_workers=max(1, min(args.engine_concurrency, len(jobs)))) as ex:
            futures = [ex.submit(one, item) for item in jobs]
            for k, fut in enumerate(cf.as_completed(futures), 1):
                self.runs.append(fut.result())
                if k % max(1, len(futures) // 10) == 0 or k == len(futures):
                    print(f"[fidelity] engine {k}/{len(futures)} (elapsed {time.time() - self.t_start:.0f}s)",
                          flush=True)
        self.info["generate_seconds"] = time.time() - t1
        self.info["generated_tokens"] = sum(r["tokens"] for r in self.runs)
        self.info["seconds"] = time.time() - t0


# ----------------------------------------------------------------------------------- aggregation

def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _std(xs):
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


REPLAY_KEYS = ["kl_after", "kl_all", "top1_after", "top1_all", "nll_increase_after", "nll_increase_all"]
ENGINE_KEYS = ["repetition_rate", "tail_loop_rate", "distinct4"]


def aggregate(replay: list[dict], engine: list[dict], stochastic: dict[str, bool]) -> list[dict]:
    """One row per (policy, compression): per seed the mean over prompts, then mean/std over seeds."""
    cells: dict[tuple, dict] = {}
    for r in replay:
        cell = cells.setdefault((r["policy"], r["compression"]), {"budget": r["budget"], "replay": {}, "engine": {}})
        cell["replay"].setdefault(r["seed"], []).append(r)
    for r in engine:
        cell = cells.setdefault((r["policy"], r["compression"]), {"budget": r["budget"], "replay": {}, "engine": {}})
        cell["engine"].setdefault(r["seed"], []).append(r)
    rows = []
    for (policy, compression), cell in sorted(cells.items(), key=lambda kv: (kv[0][0] != FULL, kv[0][0], kv[0][1])):
        row = {"policy": policy, "compression": compression, "budget": cell["budget"],
               "stochastic": bool(stochastic.get(policy, False))}
        per_seed = {}
        for seed, runs in cell["replay"].items():
            per_seed[seed] = {k: _mean([r[k] for r in runs]) for k in REPLAY_KEYS}
            per_seed[seed]["kl_before_max"] = max(r["kl_before_max"] for r in runs)
            per_seed[seed]["evictions"] = _mean([r["evictions"] for r in runs])
        for seed, outs in cell["engine"].items():
            d = per_seed.setdefault(seed, {})
            d["repetition_rate"] = _mean([float(o["loop"]) for o in outs])
            d["tail_loop_rate"] = _mean([float(o["tail_loop"]) for o in outs])
            d["distinct4"] = _mean([o["distinct4"] for o in outs])
            d["engine_evictions"] = _mean([o["evictions"] for o in outs])
        for k in REPLAY_KEYS + ENGINE_KEYS:
            vals = [d.get(k) for d in per_seed.values()]
            row[k] = _mean(vals)
            row[f"{k}_std"] = _std(vals)
        row["replay_seeds"] = sorted(cell["replay"])
        row["engine_seeds"] = sorted(cell["engine"])
        row["kl_before_max"] = max((d.get("kl_before_max", 0.0) for d in per_seed.values()), default=None)
        row["evictions"] = _mean([d.get("evictions") for d in per_seed.values()])
        row["engine_evictions"] = _mean([d.get("engine_evictions") for d in per_seed.values()])
        row["per_seed"] = {str(s): d for s, d in sorted(per_seed.items())}
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- output

def _fmt(v, std=None, digits=4):
    if v is None:
        return "-"
    s = f"{v:.{digits}f}"
    return s + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown_table(rows: list[dict], compression: float) -> str:
    sel = [r for r in rows if r["policy"] == FULL or r["compression"] == compression]
    sel.sort(key=lambda r: (r["kl_after"] if r["kl_after"] is not None else (0.0 if r["policy"] == FULL else 1e9)))
    lines = [f"Fidelity at {compression:g}x compression (KL, top-1 and NLL increase over the rows after the first "
             "eviction; repetition = share of free generations with a 20-gram occurring >= 3 times)", "",
             "| policy | budget | KL(full‖evicted) | top-1 agreement | NLL increase | repetition rate | distinct-4 |",
             "|---|---|---|---|---|---|---|"]
    for r in sel:
        lines.append(f"| {r['policy']} | {r['budget'] if r['policy'] != FULL else '-'} "
                     f"| {_fmt(r['kl_after'] if r['policy'] != FULL else r['kl_all'], r['kl_after_std'])} "
                     f"| {_fmt(r['top1_after'] if r['policy'] != FULL else r['top1_all'], r['top1_after_std'], 3)} "
                     f"| {_fmt(r['nll_increase_after'] if r['policy'] != FULL else r['nll_increase_all'], r['nll_increase_after_std'])} "
                     f"| {_fmt(r['repetition_rate'], r['repetition_rate_std'], 2)} "
                     f"| {_fmt(r['distinct4'], r['distinct4_std'], 3)} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = sorted({r["policy"] for r in rows if r["policy"] != FULL})
    full = next((r for r in rows if r["policy"] == FULL), None)
    specs = [("kl", "kl_after", "KL(full ‖ evicted), rows after the first eviction", True),
             ("top1", "top1_after", "top-1 agreement with the full cache", False),
             ("repetition", "repetition_rate", "free-generation repetition rate (20-gram x3)", False)]
    paths = []
    colors = [plt.get_cmap("tab10")(i) for i in range(10)] + ["black", "olive", "navy"]
    markers = "os^vD<>pPX*h"
    for suffix, key, ylabel, logy in specs:
        fig, ax = plt.subplots(figsize=(9, 5))
        for i, pol in enumerate(policies):
            pts = sorted((r["compression"], r[key], r.get(f"{key}_std")) for r in rows
                         if r["policy"] == pol and r[key] is not None)
            if logy:
                pts = [(c, v, s) for c, v, s in pts if v > 0]
            if not pts:
                continue
            xs, ys, es = zip(*pts)
            vase_family = pol.startswith("vase")
            ax.errorbar(xs, ys, yerr=[e or 0.0 for e in es], marker=markers[i % len(markers)],
                        linestyle="-" if vase_family else "--", linewidth=2.2 if vase_family else 1.2, capsize=3,
                        color=colors[i % len(colors)], label=pol)
        if full is not None and full.get(key) is not None and not logy:
            ax.axhline(full[key], color="black", linewidth=1, linestyle=":", label="full cache")
        if full is not None and key == "top1_after" and full.get("top1_all") is not None:
            ax.axhline(full["top1_all"], color="black", linewidth=1, linestyle=":", label="full cache")
        ax.set_xscale("log", base=2)
        comps = sorted({r["compression"] for r in rows if r["policy"] != FULL})
        ax.set_xticks(comps)
        ax.set_xticklabels([f"{c:g}x" for c in comps])
        if logy:
            ax.set_yscale("log")
        else:
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("compression (continuation length / budget)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        else:
            ax.text(0.5, 0.5, "no data (engine part skipped?)", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        path = out.with_name(f"{out.stem}_{suffix}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths


def machine_info() -> dict:
    import transformers

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.cuda.is_available()}
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        import sglang

        info["sglang"] = sglang.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return info


# ------------------------------------------------------------------------------------------ main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="HF model folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--dataset", default="math", help="<data-dir>/<dataset>.jsonl")
    p.add_argument("--prompts", type=int, default=None, help=f"prompts (default {DEFAULTS['prompts']})")
    p.add_argument("--max-prompt-tokens", type=int, default=192, help="skip problems whose chat prompt is longer")
    p.add_argument("--cont-len", type=int, default=None, help=f"continuation length (default {DEFAULTS['cont_len']})")
    p.add_argument("--compressions", default=None, help=f"comma list (default {DEFAULTS['compressions']})")
    p.add_argument("--window", type=int, default=None, help=f"R (default {DEFAULTS['window']})")
    p.add_argument("--seeds", type=int, default=None, help=f"seeds of stochastic policies (default {DEFAULTS['seeds']})")
    p.add_argument("--policies", default=None, help="comma list (default: every registered policy)")
    p.add_argument("--workers", type=int, default=None, help=f"replay processes (default {DEFAULTS['workers']})")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--engine-prompts", type=int, default=None,
                   help="prompts for the free-generation part (default: --prompts; the first ones are shared)")
    p.add_argument("--engine-concurrency", type=int, default=64, help="requests in flight at once")
    p.add_argument("--no-engine", action="store_true", help="skip the free-generation (server) part")
    p.add_argument("--quick", action="store_true",
                   help="1 prompt, cont_len 64, window 8, compressions 2,4, 1 seed, 4 policies")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--update", action="store_true",
                   help="re-run only --policies and replace their rows in --out, keeping every other row "
                        "(same settings required; the full-cache rows stay those of the original run)")
    args = p.parse_args(argv)
    preset = {**DEFAULTS, **(QUICK if args.quick else {})}
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    _one_thread()
    t_start = time.time()
    from transformers import AutoTokenizer

    from sglang_vase.models import prepare_default_model
    from sglang_vase.policies import POLICIES, get_policy

    model_path = args.model_path or prepare_default_model()
    policies = [s.strip() for s in args.policies.split(",") if s.strip()] if args.policies else sorted(POLICIES)
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; known: {sorted(POLICIES)}")
    compressions = [float(c) for c in str(args.compressions).split(",") if c.strip()]
    compressions = [int(c) if c.is_integer() else c for c in compressions]
    budgets = {c: budget_for(args.cont_len, c, args.window) for c in compressions}
    stochastic = {p: bool(POLICIES[p].stochastic) for p in policies}
    for pol in policies:  # fail early on parameter errors
        for b in budgets.values():
            get_policy(pol, budget=b, window=args.window)

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    engine_prompts = max(args.prompts, args.engine_prompts or args.prompts)
    all_prompts = load_prompts(tokenizer, Path(args.data_dir), args.dataset, engine_prompts, args.max_prompt_tokens)
    prompts = all_prompts[:args.prompts]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"[fidelity] {len(prompts)} prompts ({[p['prompt_tokens'] for p in prompts]} tokens), cont_len "
          f"{args.cont_len}, window {args.window}, budgets {budgets}, policies {policies}, seeds {args.seeds}, "
          f"{args.workers} workers, {args.dtype}", flush=True)

    configs = [{"policy": FULL, "compression": 1, "budget": None, "seed": 0}]
    for pol in policies:
        for c in compressions:
            for s in (range(args.seeds) if stochastic[pol] else [0]):
                configs.append({"policy": pol, "compression": c, "budget": budgets[c], "seed": s})

    result = {
        "benchmark": "fidelity",
        "config": {"model_path": model_path, "dataset": args.dataset, "data_dir": args.data_dir,
                   "prompts": args.prompts, "engine_prompts": len(all_prompts), "max_prompt_tokens": args.max_prompt_tokens, "cont_len": args.cont_len,
                   "window": args.window, "compressions": compressions,
                   "budgets": {str(c): b for c, b in budgets.items()}, "seeds": args.seeds, "policies": policies,
                   "stochastic": stochastic, "workers": args.workers, "dtype": args.dtype, "quick": args.quick,
                   "engine": not args.no_engine, "temperature": TEMPERATURE, "top_p": TOP_P,
                   "loop_rule": f"some {LOOP_NGRAM}-gram occurs >= {LOOP_MIN_COUNT} times in the output tokens",
                   "tail_loop_rule": f"last {TAIL_FRACTION:.0%} of the output periodic with period <= "
                                     f"{TAIL_MAX_PERIOD}, >= {TAIL_MIN_REPEATS} repeats",
                   "budget_rule": "B = cont_len / compression rounded to a multiple of window, >= 2 * window",
                   "kl_rule": "KL(full || evicted) per row in float64, clamped at >= 0; 'after' = rows computed "
                              "after the first eviction, 'all' = every row; per-prompt means averaged over prompts; "
                              "mean and std (ddof=1) over seeds"},
        "machine": machine_info(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, str(Path(__file__).resolve()), *argv]),
        "prompts": [{k: p[k] for k in ("index", "line", "source_id", "prompt_tokens")} for p in all_prompts],
    }

    # --update: refuse an incomparable run before any work (references: as soon as they exist)
    previous = load_previous(out, result) if args.update else None

    # ---- 3 (in the background): free generation in the engine
    engine_run = None
    if not args.no_engine:
        engine_run = EngineRun(args, model_path, all_prompts, configs, t_start)
        engine_run.start()

    # ---- 1-2: reference continuations, then teacher-forced replay
    try:
        replay = _replay_part(args, model_path, prompts, configs, budgets, tokenizer, result, t_start, previous)
    except BaseException:
        if engine_run is not None:
            engine_run.abort()
        raise
    replay.sort(key=row_order)
    result["replay_runs"] = replay
    result["results"] = aggregate(replay, [], stochastic)
    if not args.update:
        out.write_text(json.dumps(result, indent=1))  # partial: replay only

    engine = []
    if engine_run is not None:
        try:
            while engine_run.is_alive():
                engine_run.join(1.0)
        except BaseException:
            engine_run.abort()
            raise
        engine, info = engine_run.outcome()
        result["engine"] = info
        engine.sort(key=row_order)
        result["engine_runs"] = engine

    if args.update:
        replay, engine, stochastic = merge_into_previous(result, previous, policies, replay, engine)
        result["replay_runs"], result["engine_runs"] = replay, engine

    # ---- 4: aggregate, plots, table
    rows = aggregate(replay, engine, stochastic)
    result["results"] = rows
    this_run = result["updates"][-1] if args.update else result
    timing, machine = this_run["timing"], this_run["machine"]
    timing["total_seconds"] = time.time() - t_start
    try:
        machine["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    table_c = min(compressions, key=lambda c: abs(math.log(c / 4)))
    result["table_compression"] = table_c
    result["table"] = markdown_table(rows, table_c)
    result["plots"] = plot(rows, out)
    out.write_text(json.dumps(result, indent=1))
    print(result["table"])
    print(f"[fidelity] wrote {out} and {len(result['plots'])} plots in {result['timing']['total_seconds']:.0f}s",
          flush=True)
    return result


def row_order(row: dict) -> tuple:
    """The order of replay and engine rows in the results file."""
    return row["policy"], row["compression"], row["seed"], row["prompt"]


# Settings an --update run must share with the file it updates, so that its rows are comparable.
UPDATE_KEYS = ("model_path", "dataset", "prompts", "engine_prompts", "max_prompt_tokens", "cont_len", "window",
               "compressions", "seeds", "dtype", "temperature", "top_p")


def load_previous(out: Path, result: dict) -> dict:
    """The results file an ``--update`` run merges into; exits if its settings differ."""
    old = json.loads(out.read_text())
    diff = {k: (old["config"].get(k), result["config"][k]) for k in UPDATE_KEYS
            if old["config"].get(k) != result["config"][k]}
    if diff:
        raise SystemExit(f"--update: settings differ from {out} (previous, now): {diff}")
    return old


def check_same_references(old: dict, result: dict) -> None:
    """Exit unless this run's greedy reference continuations are the previous run's."""
    for before, now in zip(old["prompts"], result["prompts"]):
        if before.get("continuation_text") != now.get("continuation_text"):
            raise SystemExit(f"--update: the reference continuation of prompt {now['index']} differs from the "
                             f"previous run's (another machine or torch build?): its rows would not be comparable")


def merge_into_previous(result: dict, old: dict, policies: list[str], replay: list[dict],
                        engine: list[dict]) -> tuple[list[dict], list[dict], dict]:
    """Replace ``policies``' rows of the previous run ``old`` by this run's (``--update``; settings
    and references checked by ``load_previous`` and ``check_same_references``): the full-cache rows
    and every other policy's rows stay. ``result`` takes the previous run's config with the union
    of policies and a record of this update."""
    keep = set(policies)

    def merged(old_rows, new_rows):
        rows = [r for r in old_rows if r["policy"] not in keep] + [r for r in new_rows if r["policy"] in keep]
        return sorted(rows, key=row_order)

    stochastic = {**old["config"]["stochastic"], **result["config"]["stochastic"]}
    result["config"] = {**old["config"], "policies": sorted(stochastic), "stochastic": stochastic}
    result["updates"] = old.get("updates", []) + [
        {"date": result["date"], "command": result["command"], "policies": sorted(keep),
         "timing": result["timing"], "machine": result["machine"], "engine": result.get("engine")}]
    for key in ("date", "command", "timing", "machine", "engine"):
        result[key] = old.get(key)
    return merged(old["replay_runs"], replay), merged(old.get("engine_runs", []), engine), stochastic


def _replay_part(args, model_path, prompts, configs, budgets, tokenizer, result, t_start,
                 previous: dict | None = None) -> list[dict]:
    """Reference continuations, then every teacher-forced replay, in a pool of 1-thread workers."""
    with tempfile.TemporaryDirectory(prefix="fidelity-refs-") as tmp:
        ref_jobs = [{"prompt": p["index"], "prompt_ids": p["input_ids"], "cont_len": args.cont_len,
                     "ref_path": os.path.join(tmp, f"ref{p['index']}.pt")} for p in prompts]
        replay_jobs = []
        for p in prompts:  # prompt-major, so that a worker reloads a reference rarely
            first = {c: first_affected_row(p["prompt_tokens"], args.cont_len, b, args.window) for c, b in budgets.items()}
            p["first_affected_row"] = {str(c): f[0] for c, f in first.items()}
            p["evictions"] = {str(c): f[1] for c, f in first.items()}
            for cfg in configs:
                replay_jobs.append({**cfg, "prompt": p["index"], "prompt_ids": p["input_ids"],
                                    "prompt_len": p["prompt_tokens"], "window": args.window,
                                    "ref_path": ref_jobs[p["index"]]["ref_path"]})
        for p, rp in zip(prompts, result["prompts"]):
            rp["first_affected_row"] = p["first_affected_row"]
            rp["evictions"] = p["evictions"]
            rp["effective_compression"] = {str(c): round((p["prompt_tokens"] + args.cont_len) / b, 2)
                                           for c, b in budgets.items()}
        workers = max(1, args.workers)
        pool = None
        if workers > 1:
            if str(HERE) not in sys.path:
                sys.path.insert(0, str(HERE))  # spawned workers import this module by name
            pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker,
                                                initargs=(model_path, args.dtype))
        else:
            _init_worker(model_path, args.dtype)
        ok = False
        try:
            t0 = time.time()
            refs = _run_jobs(pool, _reference_task, ref_jobs, "reference", t_start)
            result["timing"] = {"reference_seconds": time.time() - t0}
            for r in refs:
                result["prompts"][r["prompt"]]["continuation_text"] = tokenizer.decode(r["tokens"])
            if previous is not None:
                check_same_references(previous, result)
            t0 = time.time()
            replay = _run_jobs(pool, _replay_task, replay_jobs, "replay", t_start)
            result["timing"]["replay_seconds"] = time.time() - t0
            result["timing"]["replay_runs"] = len(replay_jobs)
            ok = True
        finally:
            if pool is not None:
                if ok:
                    pool.close()
                else:
                    pool.terminate()
                pool.join()
            _W.clear()
    return replay


if __name__ == "__main__":
    main()
