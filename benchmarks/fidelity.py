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
   physical length) and over all rows ("all"). A policy spec ``name:late=L`` evicts as pressure
   mode does when the pool runs short after L continuation tokens: the full cache until then, one
   eviction to B there, then the static schedule (``name`` alone: every R tokens past B + R), so
   the cost of compressing late and at once is measured beside the gradual schedule;
   ``name:regrow=L`` evicts there again each time it grows back to that length (pressure mode
   growing again after every forced eviction). Per (policy, kept order, compression, seed) the
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
SmolLM2-135M). ``--outlier-model`` replays on ``outlier_model.prepare_outlier_model()`` (benchmarks/outlier_model.py) instead.
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
rest; the file is removed once ``--out`` is written. ``--shard K/N`` splits the prompts between N processes
(a core each) that share that file; the last one to finish writes ``--out``.

This file parses the arguments and runs the parts; the rest lives next to it: ``fidelity_configs.py``
(prompts, budgets, policy specs, the configs), ``fidelity_replay.py`` (1), ``fidelity_engine.py``
(2), ``fidelity_report.py`` (aggregation, tables, verdict, plots), ``fidelity_update.py``
(``--update``).

    python benchmarks/fidelity.py [--quick] [--outlier-model] [--prompts 8] [--cont-len 1024]
        [--compressions 2,4,8] [--window 32] [--seeds 3] [--orders sorted,released]
        [--policies vase,snapkv,vase-adaptive:tau=3,vase:late=512,...] [--engine]
    python benchmarks/fidelity.py --render --out benchmarks/results/fidelity.json
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a machine whose cores other processes share, two
# spinning threads made the replay 40x slower here. libgomp reads it once, when torch loads it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import DATA_DIR, RESULTS_DIR, TEMPERATURE, TOP_P, machine_info, shard_arg
from fidelity_configs import (ORDERS, budget_for, build_policy, engine_configs, first_affected_row, is_stochastic,
                              load_prompts, make_configs, parse_policy_spec, row_order, schedule_of)
from fidelity_engine import LOOP_MIN_COUNT, LOOP_NGRAM, TAIL_FRACTION, TAIL_MAX_PERIOD, TAIL_MIN_REPEATS, EngineRun
from fidelity_replay import partial_path, replay_part
from fidelity_report import aggregate, aggregate_vrange, mean_known, render, render_only
from fidelity_update import load_previous, merge_into_previous

DEFAULT_DATA_DIR = DATA_DIR
DEFAULT_OUT = RESULTS_DIR / "fidelity.json"
DEFAULTS = dict(prompts=8, cont_len=1024, window=32, compressions="2,4,8", seeds=3, policies=None,
                orders=",".join(ORDERS))
QUICK = dict(prompts=1, cont_len=64, window=8, compressions="2,4", seeds=1,
             policies="vase,snapkv,streamingllm,evict-large-v", orders="released")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="HF model folder or named model (default: the embedded SmolLM2-135M)")
    p.add_argument("--outlier-model", action="store_true",
                   help="replay on the outlier model (benchmarks/outlier_model.py; built on first use)")
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
    p.add_argument("--shard", type=shard_arg, default=(0, 1),
                   help="K/N: replay only the prompts at positions K, K+N, ... (N processes share one run's "
                        "per-prompt file; the last to finish writes --out)")
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
    if args.shard[1] > 1 and (args.engine or args.update):
        p.error("--shard splits the replay only: run --engine and --update unsharded")
    return args


@dataclass
class Plan:
    """What a run measures, resolved from its arguments."""
    model_path: str
    out: Path
    policies: list[str]
    orders: list[str]
    compressions: list
    budgets: dict
    stochastic: dict[str, bool]
    tokenizer: object
    all_prompts: list[dict]  # the engine part's; the replay takes the first --prompts of them
    prompts: list[dict]
    configs: list[dict]


def plan_run(args: argparse.Namespace) -> Plan:
    """Resolve the model, policies, kept orders and budgets (failing before any work on a bad one),
    load the prompts, create --out's folder and print what the run will replay."""
    from transformers import AutoTokenizer

    from outlier_model import prepare_outlier_model

    from sglang_vase.models import resolve_model
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
        late, regrow = schedule_of(pol)
        for b in budgets.values():
            build_policy(pol, b, args.window, orders[0])
            if late is not None:  # a one-token prompt is the hardest case
                first_affected_row(1, args.cont_len, b, args.window, late, regrow)
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
    return Plan(model_path=model_path, out=out, policies=policies, orders=orders, compressions=compressions,
                budgets=budgets, stochastic=stochastic, tokenizer=tokenizer, all_prompts=all_prompts,
                prompts=prompts, configs=configs)


def result_header(args: argparse.Namespace, argv: list[str], plan: Plan) -> dict:
    """The results file before any measurement: the settings and rules, the machine, and per prompt
    where its evictions start under each budget."""
    budgets = plan.budgets
    result = {
        "benchmark": "fidelity",
        "config": {"model_path": plan.model_path, "outlier_model": args.outlier_model, "dataset": args.dataset,
                   "data_dir": args.data_dir, "prompts": args.prompts, "engine_prompts": len(plan.all_prompts),
                   "max_prompt_tokens": args.max_prompt_tokens, "cont_len": args.cont_len,
                   "window": args.window, "compressions": plan.compressions,
                   "budgets": {str(c): b for c, b in budgets.items()}, "seeds": args.seeds,
                   "policies": plan.policies, "orders": plan.orders, "stochastic": plan.stochastic,
                   "dtype": args.dtype, "quick": args.quick,
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
        "prompts": [{k: p[k] for k in ("index", "line", "source_id", "prompt_tokens")} for p in plan.all_prompts],
    }
    for p, rp in zip(plan.prompts, result["prompts"]):
        first = {c: first_affected_row(p["prompt_tokens"], args.cont_len, b, args.window) for c, b in budgets.items()}
        rp["first_affected_row"] = {str(c): f[0] for c, f in first.items()}
        rp["evictions"] = {str(c): f[1] for c, f in first.items()}
        rp["effective_compression"] = {str(c): round((p["prompt_tokens"] + args.cont_len) / b, 2)
                                       for c, b in budgets.items()}
    return result


def run_parts(args: argparse.Namespace, plan: Plan, result: dict, t_start: float,
              previous: dict | None) -> tuple[list[dict], list[dict]]:
    """The replay here while the engine part (``--engine``) runs in the background; both parts' rows
    go into ``result``. The replay's results are written as soon as they exist, while the engine
    part may still be running (not for an ``--update``: its file is replaced only once merged)."""
    engine_run = None
    if args.engine:
        engine_run = EngineRun(args, plan.model_path, plan.all_prompts, engine_configs(plan.configs), t_start)
        engine_run.start()
    try:
        replay, vranges = replay_part(args, plan.model_path, plan.prompts, plan.configs, plan.tokenizer, result,
                                      t_start, previous)
    except BaseException:
        if engine_run is not None:
            engine_run.abort()
        raise
    replay.sort(key=row_order)
    result["replay_runs"] = replay
    result["value_ranges"] = aggregate_vrange(vranges)
    result["noise_floor_kl"] = mean_known([p.get("noise_floor_kl") for p in result["prompts"]])
    result["results"] = aggregate(replay, [], plan.stochastic)
    if not args.update:
        plan.out.write_text(json.dumps(result, indent=1))  # partial: replay only
    engine = wait_for_engine(engine_run, result) if engine_run is not None else []
    return replay, engine


def wait_for_engine(engine_run: EngineRun, result: dict) -> list[dict]:
    """The engine part's rows once its thread ends; an interrupt while waiting kills its server."""
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
    return engine


def finish(args: argparse.Namespace, plan: Plan, result: dict, replay: list[dict], engine: list[dict],
           previous: dict | None, t_start: float) -> dict:
    """Merge an ``--update`` into the previous results, aggregate, time the run, write the results
    file with its tables and plots, and drop the per-prompt file the run no longer needs."""
    stochastic = plan.stochastic
    if args.update:
        replay, engine, stochastic = merge_into_previous(result, previous, plan.policies, replay, engine)
        result["replay_runs"], result["engine_runs"] = replay, engine
    result["results"] = aggregate(replay, engine, stochastic)
    this_run = result["updates"][-1] if args.update else result
    timing, machine = this_run["timing"], this_run["machine"]
    timing["total_seconds"] = time.time() - t_start
    try:
        machine["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    render(result, plan.out)
    partial_path(plan.out).unlink(missing_ok=True)
    print(f"[fidelity] wrote {plan.out} and {len(result['plots'])} plots in {timing['total_seconds']:.0f}s",
          flush=True)
    return result


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.render:
        return render_only(Path(args.out))
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    plan = plan_run(args)
    result = result_header(args, argv, plan)
    # --update: refuse an incomparable run before any work (references: as soon as they exist)
    previous = load_previous(plan.out, result) if args.update else None
    replay, engine = run_parts(args, plan, result, t_start, previous)
    return finish(args, plan, result, replay, engine, previous, t_start)


if __name__ == "__main__":
    main()
