"""Chain-of-thought accuracy of eviction policies at equal KV memory, with the loops counted.

Every system of the grid is one setting of ``custom_params.vase`` on ONE sglang-vase server: the
full cache (``{"vase": false}``) or a policy at a budget B with window R (``--window``, 32). All
systems answer the same questions with the same sampling seeds (benchmarks/accuracy.py: chat
route, T 0.6, top-p 0.95, one request per sample, graded from the last ``\\boxed{}``); a
stochastic policy draws its eviction with the sample's seed, so a rerun draws the same.

Equal memory: the server's KV pool holds ``--pool-requests`` (8) full-length requests (longest
prompt + --max-tokens each), whatever the system; eviction lets more requests into it.

The work is cut in phases: a block of ``--block`` questions for one system (more for a system
with fewer samples per question, so every phase sends about as many requests), systems in turn,
blocks in question order, so an interrupted grid covers the same first questions for every
system. Each system's first whole phase runs alone and measures its served throughput (output tokens /
wall, running requests and retractions from the server's decode log); the remaining phases then
run as one stream in that order with ``--concurrency`` requests in flight. ``--shard K/N`` runs every
N-th block from K, so N processes pinned to their own cores share the work and its files. Samples land in
``results/partial/accuracy_<task>_<label>.jsonl`` (resumed by any later run with the same
settings), phases in ``results/partial/accuracy_grid_<tag>_phases.jsonl``.

``--report`` (also run at the end of a grid) reads those files only: per system pass@1 +- SE over
the questions every started system has all its samples of (a partial grid compares like with
like; each system's pass@1 over all it answered is in the JSON too), the paired difference to the
full cache with a 95% interval, mean output tokens, the share that hit
--max-tokens, the share that end in a repetition loop (benchmarks/accuracy_stats.py) with an
example, and served tok/s; writes ``results/accuracy_grid_<tag>.json``, the markdown table, a plot
of pass@1 against budget per policy and one of pass@1 against throughput at equal memory.

    python benchmarks/accuracy_grid.py --model-path qwen2.5-coder-0.5b --tag qwen0.5b --levels 1 \\
        --systems full:4,vase@96:4,snapkv@96:4,rkv@96:2 [--block 8] [--concurrency 32] [--report]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import time
from functools import lru_cache
from pathlib import Path

import accuracy
import accuracy_stats
from common import RESULTS_DIR, TEMPERATURE, TOP_P, chat_ids, git_commit, machine_info, shard_arg
from throughput import parse_log

FULL = "full"
STREAM = "stream"  # the phases file's label for the work streamed after the measured phases
SYSTEM_RE = re.compile(r"^(?P<policy>[a-z0-9-]+)(?:@(?P<budget>\d+))?(?:/(?P<mode>pressure))?:(?P<n>\d+)$")


@dataclasses.dataclass(frozen=True)
class System:
    policy: str            # a registered policy name, or "full" (eviction off)
    budget: int | None     # B, None for the full cache
    n: int                 # samples per question
    mode: str = "static"   # or "pressure": evict only when the pool runs short

    def label(self, tag: str) -> str:
        if self.policy == FULL:
            return f"{tag}-{FULL}"
        return f"{tag}-{self.policy}-b{self.budget}" + ("-pressure" if self.mode == "pressure" else "")

    def vase(self, window: int) -> dict | bool:
        if self.policy == FULL:
            return False
        vase = {"policy": self.policy, "budget": self.budget, "window": window}
        return {**vase, "mode": self.mode} if self.mode != "static" else vase


def parse_systems(spec: str) -> list[System]:
    """``full:4,vase@128:4,snapkv@128:2,vase@128/pressure:4``: policy, budget (not for full), mode
    (static unless ``/pressure``) and samples per question."""
    systems = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        m = SYSTEM_RE.match(part)
        if not m:
            raise ValueError(f"--systems: {part!r} is not policy@budget:n (or full:n)")
        budget = int(m["budget"]) if m["budget"] else None
        if (m["policy"] == FULL) != (budget is None):
            raise ValueError(f"--systems: {part!r}: the full cache takes no budget, a policy needs one")
        systems.append(System(m["policy"], budget, int(m["n"]), m["mode"] or "static"))
    if len({(s.policy, s.budget, s.mode) for s in systems}) != len(systems):
        raise ValueError("--systems: a system is listed twice")
    return systems


def pool_tokens(longest_prompt: int, max_tokens: int, requests: int) -> int:
    """KV slots for ``requests`` full-length requests: the equal memory every system gets."""
    return requests * (longest_prompt + max_tokens)


# ----------------------------------------------------------------------------------------- run


def start_server(args, systems: list[System], pool: int):
    from sglang_vase.serving import Server

    budget = max((s.budget for s in systems if s.budget), default=args.window)
    flags = ["--model-path", args.model_path, "--max-total-tokens", str(pool),
             "--max-running-requests", str(args.concurrency), "--vase-budget", str(budget),
             "--vase-window", str(args.window), "--decode-log-interval", "1"]
    shard, shards = args.shard
    suffix = f"_shard{shard}of{shards}" if shards > 1 else ""
    log = Path(args.out_dir) / "partial" / f"accuracy_grid_{args.tag}_server{suffix}.log"
    return Server(flags, log_path=log, timeout=900)


@lru_cache(maxsize=2)
def _tokenizer(model_path: str):
    from transformers import AutoTokenizer

    from sglang_vase.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model_path))


def longest_prompt_tokens(model_path: str, items: list[dict]) -> int:
    tok = _tokenizer(model_path)
    return max(len(chat_ids(tok, it["prompt"])) for it in items)


def phase_stats(server, start: int) -> dict:
    """Running requests and retractions from the server's decode log since offset ``start``."""
    if server is None:
        return {}
    time.sleep(0.5)  # let the last decode line reach the log
    steps, retracts = parse_log(server.log(start))
    running = [s["running"] for s in steps]
    return {"max_running": max(running, default=0),
            "mean_running": round(statistics.fmean(running), 2) if running else None,
            "retractions": sum(e["n"] for e in retracts), "peak_kv_tokens": max((s["tokens"] for s in steps), default=0)}


def spans(systems: list[System], block: int) -> dict[System, int]:
    """Questions per phase of each system: ``block`` for those with the most samples per question,
    proportionally more for the others, so that every phase sends about as many requests."""
    most = max(s.n for s in systems)
    return {s: block * max(1, most // s.n) for s in systems}


@dataclasses.dataclass
class Phase:
    system: System
    block: int                              # index of its first block of --block questions
    qids: list[str]
    work: list[tuple[accuracy.Job, dict, int]]


def plan(systems: list[System], jobs: dict[System, accuracy.Job], block_size: int, shard: tuple[int, int],
         measured: set[str]) -> tuple[list[Phase], list[tuple[accuracy.Job, dict, int]]]:
    """What is left of this shard's phases, in phase order, split into the phases to run alone and
    measure (each system's first whole one, unless ``measured`` names its label already: a phase a
    past run left partly done would run few requests) and the work to stream after them."""
    qids = [it["qid"] for it in next(iter(jobs.values())).items]
    k, shards = shard
    span = spans(systems, block_size)
    alone, stream, measured = [], [], set(measured)
    for b in range(0, len(qids), block_size):
        for system in systems:
            if b % span[system] or (b // span[system]) % shards != k:
                continue
            block = qids[b:b + span[system]]
            job = jobs[system]
            work = [(job, it, s) for it, s in job.todo(set(block))]
            if job.label in measured or len(work) < len(block) * job.n:
                stream += work
            else:
                measured.add(job.label)
                alone.append(Phase(system, b // block_size, sorted(block, key=int), work))
    return alone, stream


def measured_labels(phases: list[dict], pool: int | None, concurrency: int) -> set[str]:
    """Systems a past phase measured at these settings, every request finished (the stream's
    record names no system)."""
    return {p["label"] for p in phases if p["label"] != STREAM and p["finished"] == p["requests"]
            and (p["pool_tokens"], p["concurrency"]) == (pool, concurrency)}


def run_grid(args, endpoint: str, server, systems: list[System], jobs: dict[System, accuracy.Job],
             phases_path: Path, pool: int | None) -> None:
    """Each system's first whole phase runs alone and is measured (the served tok/s at equal
    memory); the rest runs as one stream in phase order, ``--concurrency`` requests always in
    flight, so no phase waits on its slowest sample (a phase alone kept 4-10 of 32 running)."""
    measured = measured_labels(_read_phases(phases_path), pool, args.concurrency)
    alone, stream = plan(systems, jobs, args.block, args.shard, measured)
    for ph in alone:
        phase = _run_phase(args, endpoint, server, ph.work, pool)
        phase.update(label=jobs[ph.system].label, block=ph.block, qids=ph.qids)
        accuracy.append_line(phases_path, phase)
        print(f"[grid] block {phase['block']} {phase['label']}: {phase['finished']}/{len(ph.work)} samples, "
              f"{phase['output_tokens']} tokens in {phase['wall_s']:.0f}s ({phase['output_tok_s']} tok/s), "
              f"running max {phase.get('max_running')}, retractions {phase.get('retractions')}", flush=True)
    if stream:
        labels = sorted({j.label for j, _, _ in stream})
        print(f"[grid] stream: {len(stream)} samples of {len(labels)} systems", flush=True)
        phase = _run_phase(args, endpoint, server, stream, pool, progress=True)
        phase.update(label=STREAM, systems=labels)
        accuracy.append_line(phases_path, phase)
        print(f"[grid] stream: {phase['finished']}/{len(stream)} samples, {phase['output_tokens']} tokens in "
              f"{phase['wall_s']:.0f}s ({phase['output_tok_s']} tok/s)", flush=True)


def _run_phase(args, endpoint: str, server, work: list, pool: int | None, progress: bool = False) -> dict:
    shard, shards = args.shard
    start = server.log_offset() if server is not None else 0
    t0 = time.time()
    new, errors = accuracy.execute(endpoint, work, args.concurrency, progress=progress)
    wall = time.time() - t0
    tokens = sum(r["completion_tokens"] or 0 for r in new)
    return {"requests": len(work), "finished": len(new), "errors": errors[:5],
            "output_tokens": tokens, "wall_s": round(wall, 2),
            "output_tok_s": round(tokens / wall, 3) if wall > 0 else None,
            "pool_tokens": pool, "concurrency": args.concurrency, "shard": f"{shard}/{shards}",
            **phase_stats(server, start), "commit": git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _read_phases(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


# -------------------------------------------------------------------------------------- report


def common_questions(jobs: list[accuracy.Job]) -> set[str]:
    """Questions every system (with any sample yet) has all its samples of: the table's pass@1s are
    over these, so the systems of a partial grid are compared on the same questions."""
    started = [j for j in jobs if j.done]
    if not started:
        return set()
    return set.intersection(*({it["qid"] for it in j.items if all((it["qid"], s) in j.done for s in range(j.n))}
                              for j in started))


def system_row(system: System, job: accuracy.Job, full: accuracy.Job | None, phases: list[dict], tok,
               full_sequence: float | None, common: set[str]) -> dict:
    recs = [r for r in job.done.values() if r["qid"] in common]
    s = accuracy.summarize([it for it in job.items if it["qid"] in common], job.done, job.n)
    answered = accuracy.summarize(job.items, job.done, job.n)
    loops = []
    for r in recs:
        text = accuracy._graded_text(r)
        if accuracy_stats.is_loop(tok(text, add_special_tokens=False)["input_ids"]):
            loops.append(r)
    mine = [p for p in phases if p["label"] == job.label and p["finished"]]
    name = system.policy + ("/pressure" if system.mode == "pressure" else "")
    row = {"label": job.label, "system": name, "policy": system.policy, "mode": system.mode,
           "budget": system.budget, "n_per_question": job.n,
           "compression": round(full_sequence / system.budget, 2) if system.budget and full_sequence else None,
           **{k: s[k] for k in ("pass@1", "se", "n_questions", "n_samples", "mean_output_tokens",
                                "share_max_tokens", "share_no_answer")},
           "answered": {k: answered[k] for k in ("pass@1", "se", "n_questions", "n_samples")},
           "share_loops": len(loops) / len(recs) if recs else float("nan"),
           "loop_example": (accuracy._graded_text(loops[0])[-600:] if loops else None),
           "evicting_samples": sum(bool(r.get("vase_stats") and r["vase_stats"].get("evictions")) for r in recs),
           "served": _served(mine)}
    if full is not None and job is not full:
        row["vs_full"] = accuracy_stats.paired_difference(recs, [r for r in full.done.values() if r["qid"] in common])
    return row


def _served(phases: list[dict]) -> dict | None:
    if not phases:
        return None
    wall = sum(p["wall_s"] for p in phases)
    tokens = sum(p["output_tokens"] for p in phases)
    return {"phases": len(phases), "blocks": [p["block"] for p in phases], "output_tokens": tokens,
            "wall_s": round(wall, 1), "output_tok_s": round(tokens / wall, 2) if wall else None,
            "max_running": max((p.get("max_running") or 0 for p in phases), default=None),
            "mean_running": _mean([p.get("mean_running") for p in phases]),
            "retractions": sum(p.get("retractions") or 0 for p in phases)}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.fmean(xs), 2) if xs else None


def _fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(rows: list[dict]) -> str:
    out = ["| system | B | compression | pass@1 ± SE | diff to full [95% CI] | mean output tokens | "
           "at max tokens | loops | served tok/s | running max (mean) | retractions |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r.get("vs_full")
        diff = f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "-"
        sv = r["served"] or {}
        compression = f"{r['compression']:.1f}x" if r["compression"] else "-"
        out.append(f"| {r['system']} | {r['budget'] or '-'} | {compression} | "
                   f"{r['pass@1']:.3f} ± {r['se']:.3f} ({r['n_questions']} q × {r['n_per_question']}) | {diff} | "
                   f"{r['mean_output_tokens']:.0f} | {r['share_max_tokens']:.1%} | {r['share_loops']:.1%} | "
                   f"{_fmt(sv.get('output_tok_s'), '.1f')} | {sv.get('max_running', '-')} ({sv.get('mean_running', '-')}) "
                   f"| {sv.get('retractions', '-')} |")
    return "\n".join(out)


def plot(rows: list[dict], out: Path, title: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    full = next((r for r in rows if r["policy"] == FULL), None)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name in dict.fromkeys(r["system"] for r in rows if r["policy"] != FULL):
        pts = sorted((r["budget"], r["pass@1"], r["se"]) for r in rows if r["system"] == name)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=name)
    if full:
        ax.axhline(full["pass@1"], color="k", ls="--", lw=1, label="full cache")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV budget B (tokens, + window)")
    ax.set_ylabel("pass@1 ± SE")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(str(out.with_name(out.stem + "_budget.png")))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    served = [r for r in rows if r["served"] and r["served"]["output_tok_s"]]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for r in served:
        name = r["system"] if r["policy"] == FULL else f"{r['system']} B={r['budget']}"
        ax.errorbar(r["served"]["output_tok_s"], r["pass@1"], yerr=r["se"], marker="o", capsize=3)
        ax.annotate(name, (r["served"]["output_tok_s"], r["pass@1"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("served output tok/s at equal KV memory")
    ax.set_ylabel("pass@1 ± SE")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    paths.append(str(out.with_name(out.stem + "_throughput.png")))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def report(args, systems: list[System], jobs: dict[System, accuracy.Job], phases_path: Path) -> dict:
    phases = _read_phases(phases_path)
    full_sys = next((s for s in systems if s.policy == FULL), None)
    full = jobs.get(full_sys)
    full_sequence = None
    if full is not None and full.done:
        full_sequence = statistics.fmean((r["prompt_tokens"] or 0) + (r["completion_tokens"] or 0)
                                         for r in full.done.values())
    tok = _tokenizer(args.model_path)
    common = common_questions([jobs[s] for s in systems])
    rows = [system_row(s, jobs[s], full, phases, tok, full_sequence, common) for s in systems if jobs[s].done]
    out = Path(args.out_dir) / f"accuracy_grid_{args.tag}.json"
    some = next(iter(jobs.values()))
    result = {"benchmark": "accuracy_grid", "task": args.task, "levels": args.levels, "model": some.model,
              "max_tokens": args.max_tokens, "window": args.window, "temperature": args.temperature,
              "top_p": args.top_p, "seed": args.seed, "full_mean_sequence_tokens": full_sequence,
              "common_questions": len(common),
              "loop_definition": {"tail": accuracy_stats.LOOP_TAIL, "ngram": accuracy_stats.LOOP_NGRAM,
                                  "times": accuracy_stats.LOOP_TIMES, "cover": accuracy_stats.LOOP_COVER},
              "machine": machine_info(), "rows": rows, "table": markdown(rows)}
    title = (f"{some.model}: {args.task} levels {args.levels}, T {args.temperature}, "
             f"max {args.max_tokens} tokens, R {args.window}")
    result["plots"] = [accuracy._rel(Path(p)) for p in plot(rows, out, title)]
    accuracy._write_json(out, result)
    print(result["table"])
    return result


# ----------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True, help="a folder or a named model (qwen2.5-coder-0.5b)")
    p.add_argument("--tag", required=True, help="names the result files (e.g. qwen0.5b)")
    p.add_argument("--systems", required=True, help="full:4,vase@128:4,snapkv@128:2,... (policy@B:samples)")
    p.add_argument("--task", default="math", choices=sorted(accuracy.TASKS))
    p.add_argument("--levels", default="1,2", help="MATH difficulty levels")
    p.add_argument("--limit", type=int, help="only the first K questions")
    p.add_argument("--window", type=int, default=32, help="R, for every policy")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--pool-requests", type=int, default=8, help="the KV pool holds this many full-length requests")
    p.add_argument("--block", type=int, default=8, help="questions per phase")
    p.add_argument("--shard", type=shard_arg, default=(0, 1),
                   help="K/N: run blocks K, K+N, ... only (N processes, each with its own server and cores, "
                        "share one grid's files)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--top-p", type=float, default=TOP_P)
    p.add_argument("--endpoint", help="use this running sglang-vase server (no log stats) instead of starting one")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--report", action="store_true", help="only the report, from the files")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    systems = parse_systems(args.systems)
    levels = {int(x) for x in args.levels.split(",")} if args.levels else None
    out_dir = Path(args.out_dir)
    phases_path = out_dir / "partial" / f"accuracy_grid_{args.tag}_phases.jsonl"
    # The served name (part of every sample's resume key): a named model is served under its name,
    # a folder under its path; another server is asked.
    model = None if args.endpoint else args.model_path
    jobs = {s: accuracy.prepare(args.endpoint, args.task, s.label(args.tag), s.n, args.max_tokens, args.limit,
                                levels, s.vase(args.window), args.seed, args.temperature, args.top_p,
                                out_dir=out_dir, vase_seed="sample" if s.policy != FULL else None, model=model)
            for s in systems}
    if not args.report and any(job.todo() for job in jobs.values()):
        server, pool = None, None
        if not args.endpoint:
            items = next(iter(jobs.values())).items
            pool = pool_tokens(longest_prompt_tokens(args.model_path, items), args.max_tokens, args.pool_requests)
            server = start_server(args, systems, pool)
        try:
            run_grid(args, args.endpoint or server.url, server, systems, jobs, phases_path, pool)
        finally:
            if server is not None:
                server.stop()
    return report(args, systems, jobs, phases_path)


if __name__ == "__main__":
    main()
