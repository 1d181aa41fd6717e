"""Fidelity of KV-cache eviction policies: how far does an evicted cache move the model?

Two measurements, on math prompts (``<problem>\\nPlease reason step by step, and put your final answer
within \\boxed{}.`` in the model's chat template):

1. Teacher-forced replay (reference decoder, ``sglang_vase.reference.replay``; tests prove it equal
   to the engine path). For each prompt a full-cache greedy continuation of ``--cont-len`` tokens is
   generated with the end-of-sequence tokens suppressed (never emitted, so the continuation stays
   one solution instead of starting new chat turns). That continuation is then replayed under every
   policy x budget x kept order (x seed for stochastic policies) as the rows of ONE batched
   ``EvictingDecoder``: they share the teacher-forced tokens, so the projections and MLPs of all
   rows run as one matrix product, rows that have not evicted yet share one cache, and a full-cache
   row in the batch is the reference. Per row (row i predicts continuation token i):
   - KL(full || evicted) of the next-token distributions (each row clamped at >= 0 against rounding),
   - top-1 agreement: argmax of the evicted distribution == argmax of the full one,
   - NLL increase: -log p_evicted(token_i) - (-log p_full(token_i)).
   Each is averaged over the rows computed after the first eviction ("after": the rows whose cache
   had been evicted at least once, found from the engine trigger ``Geometry.triggers`` on the
   physical length) and over all rows ("all"). Per (policy, kept order, compression, seed) the
   per-prompt means are averaged over prompts; stochastic policies report mean and std (ddof=1)
   over seeds 0..S-1, deterministic ones run once (seed 0). The same seeds are used for every
   policy. ``kl_before_max`` (rows before the first eviction) is 0: those rows are the shared cache.
   ``noise_floor_kl``: the KL between the full cache computed as replayed (in chunks) and token by
   token (when the continuation was generated): what float summation order alone moves (bf16).
   Kept orders (``--orders``): ``released`` = [pinned by value range desc, sampled], the paper's
   released code; ``sorted`` = by position (the order only changes the smoothing at the next
   eviction). A policy may carry parameters: ``vase-adaptive:tau=2`` (``:``-separated ``k=v``).

   Value-range statistics, per layer: the range max_d V - min_d V of every non-sink token of the
   full cache at the end of each continuation, per KV head; max/median and 99th-percentile/median,
   the robust z-score of the maximum ((max - median) / (1.4826 MAD)) and the share of tokens above
   tau x median (``vase-adaptive``'s test) for ``VRANGE_TAUS``; mean and max over heads and prompts.

2. Free generation in the real engine (``--engine``): one sglang-vase server (server window = R)
   gets, for every plain policy name x budget (x seed for stochastic policies) in the server's
   kept order (released) and the full cache (``custom_params {"vase": false}``), one request per
   prompt (all requests concurrently), ``max_new_tokens = cont_len``, temperature 0.6, top-p 0.95,
   ``ignore_eos`` (``--engine-prompts K`` uses K prompts here, the first --prompts of them shared
   with the replay). (SGLang honours ``sampling_seed`` only with deterministic inference, so the
   token sampling itself is not seeded; the eviction seed is.) Metrics per output (token ids):
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

Defaults (the fidelity issue's setting): 8 prompts (the first math.jsonl problems whose chat prompt
fits --max-prompt-tokens), cont_len 1024, window 32, compressions 2,4,8 (B = 512, 256, 128), 3
seeds, both kept orders, every registered policy, bf16 (the served dtype of the embedded
SmolLM2-135M). ``--outlier-model`` replays on ``sglang_vase.models.prepare_outlier_model()`` instead.
``--quick``: 1 prompt, cont_len 64, window 8, compressions 2,4, 1 seed, released order, policies
vase, snapkv, streamingllm, evict-large-v.

Outputs: ``--out`` (default benchmarks/results/fidelity.json) and next to it ``<stem>_kl.png``,
``<stem>_top1.png``, ``<stem>_nll.png``, ``<stem>_vrange.png`` (and ``<stem>_repetition.png`` with the
engine part); markdown tables per kept order, of the value ranges per layer and of ``adaptive_verdict``
(vase-adaptive against the better of snapkv-sample and vase per order, budget and metric: worse
beyond seed noise when by more than two standard errors over seeds) on stdout and in the file.
``--render`` rebuilds those tables and the plots of an existing ``--out`` without running anything.
Each prompt's replay is appended to ``<out>.partial.jsonl`` as it finishes; a run with the same
settings (an interrupted one started again) takes the prompts found there and computes only the
rest; the file is removed once ``--out`` is written.

    python benchmarks/fidelity.py [--quick] [--outlier-model] [--prompts 8] [--cont-len 1024]
        [--compressions 2,4,8] [--window 32] [--seeds 3] [--orders sorted,released]
        [--policies vase,snapkv,vase-adaptive:tau=3,...] [--engine]
    python benchmarks/fidelity.py --render --out benchmarks/results/fidelity.json
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a machine whose cores other processes share, two
# spinning threads made the replay 40x slower here. libgomp reads it once, when torch loads it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import concurrent.futures as cf
import datetime as _dt
import json
import math
import shlex
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import torch

from common import DATA_DIR, MATH_SUFFIX, RESULTS_DIR, TEMPERATURE, TOP_P, chat_ids, machine_info, problems
from sglang_vase.serving import Server

DEFAULT_DATA_DIR = DATA_DIR
DEFAULT_OUT = RESULTS_DIR / "fidelity.json"
# One torch thread per server process: the replay shares the cores.
SERVER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ORDERS = ("released", "sorted")
# Thresholds (x median range) whose share of tokens the value-range statistics report.
VRANGE_TAUS = (2.0, 3.0, 4.0, 6.0, 8.0)
N_SINK = 4

# Loop detectors (see the module docstring).
LOOP_NGRAM = 20
LOOP_MIN_COUNT = 3
TAIL_FRACTION = 0.25
TAIL_MAX_PERIOD = 64
TAIL_MIN_REPEATS = 3

DEFAULTS = dict(prompts=8, cont_len=1024, window=32, compressions="2,4,8", seeds=3, policies=None,
                orders=",".join(ORDERS))
QUICK = dict(prompts=1, cont_len=64, window=8, compressions="2,4", seeds=1,
             policies="vase,snapkv,streamingllm,evict-large-v", orders="released")
FULL = "full"


# --------------------------------------------------------------------------------------- prompts

def load_prompts(tokenizer, data_dir: Path, dataset: str, n: int, max_prompt_tokens: int) -> list[dict]:
    """The first ``n`` problems of ``<dataset>.jsonl`` whose chat prompt has <= max_prompt_tokens."""
    path = Path(data_dir) / f"{dataset}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (use --data-dir)")
    out = []
    for line_no, row, question in problems(path):
        ids = chat_ids(tokenizer, question + MATH_SUFFIX)
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
    appends it (physical length prompt + i), computes the logits, then evicts if that length
    triggers. The eviction after step i first affects row i + 1; one after the last row affects
    nothing and is not counted (the engine, whose request ends there, does not run it either):
    exactly the engine's ``Geometry.evictions_in``."""
    from sglang_vase.engine.geometry import Geometry

    geometry = Geometry(budget, window)
    events = geometry.evictions_in(prompt_len, cont_len)
    return (geometry.next_trigger(prompt_len) - prompt_len + 1 if events else cont_len), events


def end_of_sequence_ids(tokenizer, model) -> list[int]:
    """The tokens that would end the answer: the tokenizer's and the generation config's EOS."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


# -------------------------------------------------------------------------------------- policies

def parse_policy_spec(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:k=v[:k=v...]`` -> (name, params); values are read as JSON, else strings."""
    name, *pairs = spec.split(":")
    params = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"policy {spec!r}: parameters are written k=v, got {pair!r}")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return name, params


def build_policy(spec: str, budget: int, window: int, order: str):
    from sglang_vase.policies import get_policy

    name, params = parse_policy_spec(spec)
    return get_policy(name, budget=budget, window=window, sort_kept=order == "sorted", **params)


def is_stochastic(spec: str) -> bool:
    from sglang_vase.policies import POLICIES

    return bool(POLICIES[parse_policy_spec(spec)[0]].stochastic)


# ---------------------------------------------------------------------------------------- replay

def token_metrics(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-row, per-token metrics of ``logits`` ``[rows, T, V]`` against its row 0 (the full cache),
    for the tokens ``targets`` ``[T]``: KL(full || row) (clamped >= 0), top-1 agreement, NLL
    increase; each float64 ``[rows, T]``. Overwrites ``logits``.

    With d = logits_0 - logits_r and s = lse_r - lse_0 (log-sum-exps), log p_0 - log p_r = d + s, so
    KL = p_0 . d + s and the NLL increase is d[target] + s: one product per token over the rows, on
    differences that are exactly 0 where a row equals the full cache.
    """
    top1 = (logits.argmax(-1) == logits[0].argmax(-1)).double()
    lse = logits.logsumexp(dim=-1)  # [rows, T]
    base = logits[0].clone()
    p = (base - lse[0, :, None]).exp()  # full-cache probabilities [T, V]
    d = logits.neg_().add_(base)
    shift = lse - lse[0]
    kl = torch.stack([d[:, t] @ p[t] for t in range(d.shape[1])], dim=1) + shift
    nll = d.gather(-1, targets[None, :, None].expand(d.shape[0], -1, 1))[..., 0] + shift
    return kl.double().clamp_min(0.0), top1, nll.double()


def summarize(kl: torch.Tensor, top1: torch.Tensor, nll: torch.Tensor, first: int) -> dict:
    """Means over all rows and over the rows from ``first`` on (after the first eviction)."""
    t = kl.shape[0]
    out = {"rows": t, "first_affected_row": first, "rows_after": t - first,
           "kl_before_max": float(kl[:first].max()) if first > 0 else 0.0}
    for name, v in (("kl", kl), ("top1", top1), ("nll_increase", nll)):
        out[f"{name}_all"] = float(v.mean())
        out[f"{name}_after"] = float(v[first:].mean()) if first < t else None
    return out


def value_range_stats(values: torch.Tensor) -> dict:
    """Per KV head of one layer's full-cache values ``[H_kv, N, D]`` (the first N_SINK tokens left
    out): the value-range distribution statistics of the module docstring, each a list over heads."""
    vr = values.float().amax(-1) - values.float().amin(-1)
    vr = vr[:, N_SINK:]
    med = vr.median(dim=-1).values
    top = vr.amax(dim=-1)
    mad = (vr - med[:, None]).abs().median(dim=-1).values
    out = {"max_over_median": top / med, "p99_over_median": vr.quantile(0.99, dim=-1) / med,
           "max_robust_z": (top - med) / (1.4826 * mad)}
    out.update({f"share_above_{tau:g}x": (vr > tau * med[:, None]).double().mean(-1) for tau in VRANGE_TAUS})
    return {k: v.tolist() for k, v in out.items()}


def replay_prompt(model, prompt: dict, tokens: list[int], step_logits: torch.Tensor, configs: list[dict],
                  window: int) -> tuple[list[dict], list, float]:
    """Every config (the first one the full cache) teacher-forced on one prompt in one decoder.
    ``step_logits``: the full cache's logits computed token by token when ``tokens`` were generated.
    Returns one run (metrics) per config, the value-range statistics of each layer, and the noise
    floor: the mean KL between the full cache computed in chunks (row 0) and token by token, which
    differ only in the order of float sums."""
    from sglang_vase.reference.replay import EvictingDecoder, Row

    assert configs[0]["policy"] == FULL
    policies: dict[tuple, object] = {}  # one policy object per cell: its seeds select in one call
    rows = []
    for cfg in configs:
        key = (cfg["policy"], cfg["order"], cfg["budget"])
        if cfg["policy"] != FULL and key not in policies:
            policies[key] = build_policy(cfg["policy"], cfg["budget"], window, cfg["order"])
        rows.append(Row(policies.get(key), cfg["seed"]))
    dec = EvictingDecoder(model, rows=rows, record_keeps=False)
    t = len(tokens)
    kl = torch.zeros(len(rows), t, dtype=torch.float64)  # row 0 comes from the prefill: the same for all
    top1 = torch.ones_like(kl)
    nll = torch.zeros_like(kl)
    dec.prefill(prompt["input_ids"])
    targets = torch.tensor(tokens)
    floor = 0.0
    for i in range(1, t, window):  # rows i..i+c-1 come from tokens i-1..i+c-2
        end = min(t, i + window)
        logits = dec.extend(tokens[i - 1:end - 1])
        chunked, stepped = logits[0].log_softmax(-1), step_logits[i:end].log_softmax(-1)
        floor += float((chunked.exp() * (chunked - stepped)).sum(-1, dtype=torch.float64).sum())
        kl[:, i:end], top1[:, i:end], nll[:, i:end] = token_metrics(logits, targets[i:end])
        del logits
    runs = []
    for r, cfg in enumerate(configs):
        if cfg["policy"] == FULL:
            first, events = t, 0
        else:
            first, events = first_affected_row(prompt["prompt_tokens"], t, cfg["budget"], window)
        runs.append({**cfg, "prompt": prompt["index"], **summarize(kl[r], top1[r], nll[r], first),
                     "evictions": events})
    vrange = [value_range_stats(dec.cache(layer, row=0)[1]) for layer in range(dec.n_layers)]
    return runs, vrange, floor / max(1, t - 1)


def partial_path(out: Path) -> Path:
    """Where a run keeps each finished prompt's rows until it writes ``out`` (``replay_part``)."""
    return out.with_name(out.name + ".partial.jsonl")


def _load_partial(path: Path, config: dict) -> dict[int, dict]:
    """The prompts an interrupted run of the same settings finished, by index (none if it differs)."""
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    if not lines or json.loads(lines[0]).get("config") != config:
        return {}
    done = {}
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the interruption
            break
        done[record["index"]] = record
    return done


def replay_part(args, model_path: str, prompts: list[dict], configs: list[dict], tokenizer, result: dict,
                t_start: float, previous: dict | None = None) -> tuple[list[dict], list[list]]:
    """Reference continuations and every teacher-forced replay, prompt by prompt, in this process
    (``previous``: the results an ``--update`` merges into; its references must be these). Each
    finished prompt is appended to ``partial_path(--out)``; a run with the same settings takes the
    prompts found there instead of computing them again (a long run resumes where it stopped)."""
    from sglang_vase.reference.replay import generate, load_model

    model = load_model(model_path, getattr(torch, args.dtype))
    suppress = end_of_sequence_ids(tokenizer, model)
    result["config"]["suppressed_token_ids"] = suppress
    runs, vranges = [], []
    timing = result.setdefault("timing", {"reference_seconds": 0.0, "replay_seconds": 0.0})
    partial = partial_path(Path(args.out))
    done = _load_partial(partial, result["config"])
    if not done:
        partial.write_text(json.dumps({"config": result["config"]}) + "\n")
    for p, rp in zip(prompts, result["prompts"]):
        if p["index"] in done:
            record = done[p["index"]]
            rp.update(record["prompt"])
            runs += record["runs"]
            vranges.append(record["value_ranges"])
            timing["reference_seconds"] += rp["reference_seconds"]
            timing["replay_seconds"] += rp["replay_seconds"]
            print(f"[fidelity] prompt {p['index']}: taken from {partial}", flush=True)
            continue
        t0 = time.time()
        tokens, step_logits = generate(model, p["input_ids"], args.cont_len, suppress_token_ids=suppress,
                                       return_logits=True)
        t1 = time.time()
        rp["continuation_text"] = tokenizer.decode(tokens)
        if previous is not None:
            check_same_reference(previous, rp)
        prompt_runs, vrange, floor = replay_prompt(model, p, tokens, step_logits, configs, args.window)
        t2 = time.time()
        runs += prompt_runs
        vranges.append(vrange)
        rp.update(reference_seconds=t1 - t0, replay_seconds=t2 - t1, noise_floor_kl=floor)
        timing["reference_seconds"] += t1 - t0
        timing["replay_seconds"] += t2 - t1
        with open(partial, "a") as f:
            f.write(json.dumps({"index": p["index"], "prompt": {k: v for k, v in rp.items() if k != "index"},
                                "runs": prompt_runs, "value_ranges": vrange}) + "\n")
        print(f"[fidelity] prompt {p['index']}: reference {t1 - t0:.0f}s, {len(configs)} rows replayed in "
              f"{t2 - t1:.0f}s (elapsed {time.time() - t_start:.0f}s)", flush=True)
    timing["replay_rows"] = len(runs)
    return runs, vranges


def aggregate_vrange(per_prompt: list[list[dict]]) -> list[dict]:
    """Per layer: mean and max over prompts and heads of each value-range statistic."""
    layers = []
    for layer in range(len(per_prompt[0])):
        stats = {}
        for key in per_prompt[0][layer]:
            vals = [v for prompt in per_prompt for v in prompt[layer][key]]
            stats[key] = {"mean": sum(vals) / len(vals), "max": max(vals)}
        layers.append({"layer": layer, **stats})
    return layers


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
    loaded CPU) and its batched decoding overlap the replay. Every config (plain policy name,
    released order, compression, budget, seed) x prompt is one request, all in flight at once (up to
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
            return {**{k: cfg[k] for k in ("policy", "order", "compression", "budget", "seed")}, "prompt": p["index"],
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
    """One row per (policy, kept order, compression): per seed the mean over prompts, then mean/std
    over seeds."""
    cells: dict[tuple, dict] = {}
    for kind, runs in (("replay", replay), ("engine", engine)):
        for r in runs:
            cell = cells.setdefault((r["policy"], r["order"], r["compression"]),
                                    {"budget": r["budget"], "replay": {}, "engine": {}})
            cell[kind].setdefault(r["seed"], []).append(r)
    rows = []
    for (policy, order, compression), cell in sorted(cells.items(), key=lambda kv: (kv[0][0] != FULL, kv[0])):
        row = {"policy": policy, "order": order, "compression": compression, "budget": cell["budget"],
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


def markdown_table(rows: list[dict], order: str) -> str:
    """Policies of one kept order, sorted by KL at the middle budget; per budget KL (± std over
    seeds), top-1 agreement and NLL increase over the rows after the first eviction."""
    sel = {(r["policy"], r["compression"]): r for r in rows if r["order"] == order and r["kl_after"] is not None}
    comps = sorted({c for _, c in sel})
    mid = comps[len(comps) // 2]
    policies = sorted({p for p, _ in sel}, key=lambda p: sel[(p, mid)]["kl_after"] if (p, mid) in sel else math.inf)
    budgets = {c: next(r["budget"] for (_, cc), r in sel.items() if cc == c) for c in comps}
    head = " | ".join(f"B={budgets[c]} KL | top-1 | NLL+" for c in comps)
    lines = [f"Kept order: {order} (KL(full‖evicted), top-1 agreement and NLL increase over the rows after the "
             "first eviction; ± = std over seeds)", "", f"| policy | {head} |", "|---" * (1 + 3 * len(comps)) + "|"]
    for p in policies:
        cells = []
        for c in comps:
            r = sel.get((p, c))
            cells += ([_fmt(r["kl_after"], r["kl_after_std"]), _fmt(r["top1_after"], digits=3),
                       _fmt(r["nll_increase_after"])] if r else ["-"] * 3)
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The adaptive policy against the better of its two parents, per kept order and budget (the fidelity
# issue's goal: never worse beyond seed noise). Lower is better for KL and NLL, higher for top-1.
ADAPTIVE, RIVALS = "vase-adaptive", ("snapkv-sample", "vase")
VERDICT_METRICS = (("kl_after", -1), ("top1_after", 1), ("nll_increase_after", -1))


def adaptive_verdict(rows: list[dict], policy: str = ADAPTIVE, rivals: tuple = RIVALS) -> list[dict]:
    """Per kept order, compression and metric: ``policy``'s mean over seeds against the better
    rival's, and whether it is worse beyond seed noise: by more than two standard errors of the
    difference of the two means, sqrt(s_a^2 / n_a + s_b^2 / n_b) with s the std over seeds (ddof=1)
    and n the seeds (the prompts are the same for every policy, so the seeds are the noise)."""
    sel = {(r["policy"], r["order"], r["compression"]): r for r in rows}
    out = []
    for (pol, order, c), r in sorted(sel.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if pol != policy or r["kl_after"] is None:
            continue
        opponents = [sel[(o, order, c)] for o in rivals if (o, order, c) in sel]
        if not opponents:
            continue
        for key, sign in VERDICT_METRICS:
            best = max(opponents, key=lambda o: sign * o[key])
            n_a, n_b = len(r["replay_seeds"]), len(best["replay_seeds"])
            se = math.sqrt((r[f"{key}_std"] or 0.0) ** 2 / n_a + (best[f"{key}_std"] or 0.0) ** 2 / n_b)
            worse_by = sign * (best[key] - r[key])  # > 0: the policy is worse
            out.append({"order": order, "compression": c, "budget": r["budget"], "metric": key, "policy": r[key],
                        "best_rival": best["policy"], "rival": best[key], "worse_by": worse_by, "two_se": 2 * se,
                        "worse_beyond_noise": worse_by > 2 * se})
    return out


def verdict_table(verdict: list[dict]) -> str:
    lines = [f"{ADAPTIVE} against the better of {' and '.join(RIVALS)} (worse beyond noise: by more than two "
             "standard errors over seeds)", "", "| order | B | metric | adaptive | better rival | worse by | 2 SE | "
             "worse beyond noise |", "|---|---|---|---|---|---|---|---|"]
    for v in verdict:
        lines.append(f"| {v['order']} | {v['budget']} | {v['metric']} | {v['policy']:.4f} | {v['best_rival']} "
                     f"{v['rival']:.4f} | {v['worse_by']:+.4f} | {v['two_se']:.4f} | "
                     f"{'**yes**' if v['worse_beyond_noise'] else 'no'} |")
    return "\n".join(lines)


def value_range_table(vrange: list[dict]) -> str:
    """Per layer: max / median and 99th percentile / median of the value range (mean and max over
    heads and prompts), and the share of tokens above each tau x median (mean over heads)."""
    taus = [k for k in vrange[0] if k.startswith("share_above_")]
    head = " | ".join(f"> {k[len('share_above_'):]}" for k in taus)
    lines = [f"| layer | max/median mean | max/median max | p99/median mean | p99/median max | {head} |",
             "|---" * (5 + len(taus)) + "|"]
    for v in vrange:
        shares = " | ".join(f"{v[k]['mean']:.4f}" for k in taus)
        lines.append(f"| {v['layer']} | {v['max_over_median']['mean']:.2f} | {v['max_over_median']['max']:.2f} | "
                     f"{v['p99_over_median']['mean']:.2f} | {v['p99_over_median']['max']:.2f} | {shares} |")
    return "\n".join(lines)


def render(result: dict, out: Path) -> None:
    """Tables, the adaptive policy's verdict and plots of ``result`` (in place); writes ``out`` and
    prints the tables."""
    rows = result["results"]
    result["tables"] = {order: markdown_table(rows, order) for order in result["config"]["orders"]}
    result["tables"]["value_ranges"] = value_range_table(result["value_ranges"])
    result["adaptive_verdict"] = adaptive_verdict(rows)
    if result["adaptive_verdict"]:
        result["tables"]["adaptive_verdict"] = verdict_table(result["adaptive_verdict"])
    result["plots"] = plot(rows, result["value_ranges"], out)
    out.write_text(json.dumps(result, indent=1))
    for table in result["tables"].values():
        print(table, "\n")


def plot(rows: list[dict], vrange: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orders = sorted({r["order"] for r in rows if r["policy"] != FULL})
    policies = sorted({r["policy"] for r in rows if r["policy"] != FULL})
    specs = [("kl", "kl_after", "KL(full ‖ evicted), rows after the first eviction", True),
             ("top1", "top1_after", "top-1 agreement with the full cache", False),
             ("nll", "nll_increase_after", "NLL increase (nats/token)", True)]
    if any(r.get("repetition_rate") is not None for r in rows):
        specs.append(("repetition", "repetition_rate", "free-generation repetition rate (20-gram x3)", False))
    colors = [plt.get_cmap("tab20")(i) for i in range(20)]
    markers = "os^vD<>pPX*h"
    paths = []
    for suffix, key, ylabel, logy in specs:
        fig, axes = plt.subplots(1, len(orders), figsize=(6.5 * len(orders), 5), squeeze=False, sharey=True)
        for ax, order in zip(axes[0], orders):
            for i, pol in enumerate(policies):
                pts = sorted((r["compression"], r[key], r.get(f"{key}_std")) for r in rows
                             if r["policy"] == pol and r["order"] == order and r[key] is not None)
                if logy:
                    pts = [(c, v, s) for c, v, s in pts if v > 0]
                if not pts:
                    continue
                xs, ys, es = zip(*pts)
                vase_family = pol.startswith("vase")
                ax.errorbar(xs, ys, yerr=[e or 0.0 for e in es], marker=markers[i % len(markers)],
                            linestyle="-" if vase_family else "--", linewidth=2.2 if vase_family else 1.2,
                            capsize=3, color=colors[i % len(colors)], label=pol)
            comps = sorted({r["compression"] for r in rows if r["policy"] != FULL})
            ax.set_xscale("log", base=2)
            ax.set_xticks(comps)
            ax.set_xticklabels([f"{c:g}x" for c in comps])
            if logy:
                ax.set_yscale("log")
            ax.set_title(f"kept order: {order}")
            ax.set_xlabel("compression (continuation length / budget)")
            ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel(ylabel)
        handles, labels = axes[0][0].get_legend_handles_labels()
        if handles:
            axes[0][-1].legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = out.with_name(f"{out.stem}_{suffix}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    if vrange:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        layers = [v["layer"] for v in vrange]
        for key, label, color in (("max_over_median", "max / median", "tab:red"),
                                  ("p99_over_median", "99th percentile / median", "tab:blue")):
            ax.plot(layers, [v[key]["mean"] for v in vrange], color=color, marker="o", label=f"{label} (mean)")
            ax.plot(layers, [v[key]["max"] for v in vrange], color=color, linestyle=":", label=f"{label} (max)")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("value range ratio (per KV head, over heads and prompts)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out.with_name(f"{out.stem}_vrange.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths


# ------------------------------------------------------------------------------------------ main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="HF model folder or named model (default: the embedded SmolLM2-135M)")
    p.add_argument("--outlier-model", action="store_true",
                   help="replay on sglang_vase.models.prepare_outlier_model() (built on first use)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--dataset", default="math", help="<data-dir>/<dataset>.jsonl")
    p.add_argument("--prompts", type=int, default=None, help=f"prompts (default {DEFAULTS['prompts']})")
    p.add_argument("--max-prompt-tokens", type=int, default=192, help="skip problems whose chat prompt is longer")
    p.add_argument("--cont-len", type=int, default=None, help=f"continuation length (default {DEFAULTS['cont_len']})")
    p.add_argument("--compressions", default=None, help=f"comma list (default {DEFAULTS['compressions']})")
    p.add_argument("--window", type=int, default=None, help=f"R (default {DEFAULTS['window']})")
    p.add_argument("--seeds", type=int, default=None, help=f"seeds of stochastic policies (default {DEFAULTS['seeds']})")
    p.add_argument("--policies", default=None,
                   help="comma list, name or name:k=v[:k=v] (default: every registered policy)")
    p.add_argument("--orders", default=None, help=f"kept orders, comma list of {ORDERS} (default both)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads of the replay (default: torch's)")
    p.add_argument("--engine", action="store_true", help="also run the free-generation (server) part")
    p.add_argument("--engine-prompts", type=int, default=None,
                   help="prompts for the free-generation part (default: --prompts; the first ones are shared)")
    p.add_argument("--engine-concurrency", type=int, default=64, help="requests in flight at once")
    p.add_argument("--quick", action="store_true",
                   help="1 prompt, cont_len 64, window 8, compressions 2,4, 1 seed, released order, 4 policies")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--render", action="store_true",
                   help="only rebuild the tables, the adaptive policy's verdict and the plots of --out")
    p.add_argument("--update", action="store_true",
                   help="re-run only --policies and replace their rows in --out, keeping every other row "
                        "(same settings required; the full-cache rows stay those of the original run)")
    args = p.parse_args(argv)
    preset = {**DEFAULTS, **(QUICK if args.quick else {})}
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.model_path and args.outlier_model:
        p.error("--model-path and --outlier-model exclude each other")
    return args


def make_configs(policies: list[str], orders: list[str], budgets: dict, seeds: int) -> list[dict]:
    """The full cache first, then every policy x kept order x compression x seed (seed 0 only for
    deterministic policies)."""
    configs = [{"policy": FULL, "order": "-", "compression": 1, "budget": None, "seed": 0}]
    for pol in policies:
        for order in orders:
            for c, b in budgets.items():
                for s in (range(seeds) if is_stochastic(pol) else [0]):
                    configs.append({"policy": pol, "order": order, "compression": c, "budget": b, "seed": s})
    return configs


def engine_configs(configs: list[dict]) -> list[dict]:
    """What a server can be asked per request: plain policy names in its kept order (released)."""
    return [c for c in configs if c["policy"] == FULL or (c["order"] == "released" and ":" not in c["policy"])]


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.render:
        return render_only(Path(args.out))
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    from transformers import AutoTokenizer

    from sglang_vase.models import prepare_outlier_model, resolve_model
    from sglang_vase.policies import POLICIES

    model_path = prepare_outlier_model() if args.outlier_model else resolve_model(args.model_path)
    policies = [s.strip() for s in args.policies.split(",") if s.strip()] if args.policies else sorted(POLICIES)
    unknown = [p for p in policies if parse_policy_spec(p)[0] not in POLICIES]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; known: {sorted(POLICIES)}")
    orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    if not orders or set(orders) - set(ORDERS):
        raise SystemExit(f"--orders must name some of {ORDERS}, got {args.orders!r}")
    compressions = [float(c) for c in str(args.compressions).split(",") if c.strip()]
    compressions = [int(c) if c.is_integer() else c for c in compressions]
    budgets = {c: budget_for(args.cont_len, c, args.window) for c in compressions}
    for pol in policies:  # fail early on parameter errors
        for b in budgets.values():
            build_policy(pol, b, args.window, orders[0])
    stochastic = {p: is_stochastic(p) for p in policies}

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    engine_prompts = max(args.prompts, args.engine_prompts or args.prompts)
    all_prompts = load_prompts(tokenizer, Path(args.data_dir), args.dataset, engine_prompts, args.max_prompt_tokens)
    prompts = all_prompts[:args.prompts]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    configs = make_configs(policies, orders, budgets, args.seeds)
    print(f"[fidelity] {model_path}: {len(prompts)} prompts ({[p['prompt_tokens'] for p in prompts]} tokens), "
          f"cont_len {args.cont_len}, window {args.window}, budgets {budgets}, orders {orders}, policies {policies}, "
          f"seeds {args.seeds}: {len(configs)} rows per prompt, {args.dtype}, {torch.get_num_threads()} threads",
          flush=True)

    result = {
        "benchmark": "fidelity",
        "config": {"model_path": model_path, "outlier_model": args.outlier_model, "dataset": args.dataset,
                   "data_dir": args.data_dir, "prompts": args.prompts, "engine_prompts": len(all_prompts),
                   "max_prompt_tokens": args.max_prompt_tokens, "cont_len": args.cont_len,
                   "window": args.window, "compressions": compressions,
                   "budgets": {str(c): b for c, b in budgets.items()}, "seeds": args.seeds, "policies": policies,
                   "orders": orders, "stochastic": stochastic, "dtype": args.dtype, "quick": args.quick,
                   "engine": args.engine, "temperature": TEMPERATURE, "top_p": TOP_P,
                   "loop_rule": f"some {LOOP_NGRAM}-gram occurs >= {LOOP_MIN_COUNT} times in the output tokens",
                   "tail_loop_rule": f"last {TAIL_FRACTION:.0%} of the output periodic with period <= "
                                     f"{TAIL_MAX_PERIOD}, >= {TAIL_MIN_REPEATS} repeats",
                   "budget_rule": "B = cont_len / compression rounded to a multiple of window, >= 2 * window",
                   "kl_rule": "KL(full || evicted) per row, clamped at >= 0; 'after' = rows computed "
                              "after the first eviction, 'all' = every row; per-prompt means averaged over prompts; "
                              "mean and std (ddof=1) over seeds"},
        "machine": (machine := machine_info(str(Path(__file__).resolve()), argv)),
        "date": machine["date"],
        "command": machine["command"],
        "prompts": [{k: p[k] for k in ("index", "line", "source_id", "prompt_tokens")} for p in all_prompts],
    }
    for p, rp in zip(prompts, result["prompts"]):
        first = {c: first_affected_row(p["prompt_tokens"], args.cont_len, b, args.window) for c, b in budgets.items()}
        rp["first_affected_row"] = {str(c): f[0] for c, f in first.items()}
        rp["evictions"] = {str(c): f[1] for c, f in first.items()}
        rp["effective_compression"] = {str(c): round((p["prompt_tokens"] + args.cont_len) / b, 2)
                                       for c, b in budgets.items()}

    # --update: refuse an incomparable run before any work (references: as soon as they exist)
    previous = load_previous(out, result) if args.update else None

    # ---- 2 (in the background): free generation in the engine
    engine_run = None
    if args.engine:
        engine_run = EngineRun(args, model_path, all_prompts, engine_configs(configs), t_start)
        engine_run.start()

    # ---- 1: reference continuations, then teacher-forced replay
    try:
        replay, vranges = replay_part(args, model_path, prompts, configs, tokenizer, result, t_start, previous)
    except BaseException:
        if engine_run is not None:
            engine_run.abort()
        raise
    replay.sort(key=row_order)
    result["replay_runs"] = replay
    result["value_ranges"] = aggregate_vrange(vranges)
    result["noise_floor_kl"] = _mean([p.get("noise_floor_kl") for p in result["prompts"]])
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

    # ---- 3: aggregate, plots, tables
    rows = aggregate(replay, engine, stochastic)
    result["results"] = rows
    this_run = result["updates"][-1] if args.update else result
    timing, machine = this_run["timing"], this_run["machine"]
    timing["total_seconds"] = time.time() - t_start
    try:
        machine["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    render(result, out)
    partial_path(out).unlink(missing_ok=True)
    print(f"[fidelity] wrote {out} and {len(result['plots'])} plots in {timing['total_seconds']:.0f}s", flush=True)
    return result


def render_only(out: Path) -> dict:
    """``--render``: rebuild the tables, the verdict and the plots of a results file without a run."""
    result = json.loads(out.read_text())
    render(result, out)
    return result


def row_order(row: dict) -> tuple:
    """The order of replay and engine rows in the results file."""
    return row["policy"], row["order"], row["compression"], row["seed"], row["prompt"]


# Settings an --update run must share with the file it updates, so that its rows are comparable.
UPDATE_KEYS = ("model_path", "dataset", "prompts", "engine_prompts", "max_prompt_tokens", "cont_len", "window",
               "compressions", "seeds", "orders", "dtype", "temperature", "top_p")


def load_previous(out: Path, result: dict) -> dict:
    """The results file an ``--update`` run merges into; exits if its settings differ."""
    old = json.loads(out.read_text())
    diff = {k: (old["config"].get(k), result["config"][k]) for k in UPDATE_KEYS
            if old["config"].get(k) != result["config"][k]}
    if diff:
        raise SystemExit(f"--update: settings differ from {out} (previous, now): {diff}")
    return old


def check_same_reference(old: dict, prompt: dict) -> None:
    """Exit unless this run's greedy reference continuation of ``prompt`` is the previous run's."""
    before = old["prompts"][prompt["index"]]
    if before.get("continuation_text") != prompt.get("continuation_text"):
        raise SystemExit(f"--update: the reference continuation of prompt {prompt['index']} differs from the "
                         f"previous run's (another machine or torch build?): its rows would not be comparable")


def merge_into_previous(result: dict, old: dict, policies: list[str], replay: list[dict],
                        engine: list[dict]) -> tuple[list[dict], list[dict], dict]:
    """Replace ``policies``' rows of the previous run ``old`` by this run's (``--update``; settings
    and references checked by ``load_previous`` and ``check_same_reference``): the full-cache rows
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
    for key in ("date", "command", "timing", "machine", "engine", "value_ranges", "noise_floor_kl"):
        result[key] = old.get(key)
    return merged(old["replay_runs"], replay), merged(old.get("engine_runs", []), engine), stochastic


if __name__ == "__main__":
    main()
