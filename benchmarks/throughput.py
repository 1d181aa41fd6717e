"""Serving throughput at equal KV memory: SGLang with its own defaults vs sglang-vase, on the paper's
workload shape.

Every system gets the same model, ``--max-total-tokens`` (KV pool) and ``--max-running-requests``,
and they run one after the other. Systems (``--systems``):

- ``sglang``: plain SGLang with its own defaults (radix cache and overlap scheduler on): the baseline;
- ``sglang-restricted``: plain SGLang with ``--disable-radix-cache --disable-overlap-schedule``, the
  flags eviction needed before, so that their cost is visible;
- ``sglang-vase``: sglang-vase with SGLang's defaults (``sglang-vase-restricted`` is available too);
- ``sglang-vase-pressure``: the same with ``--vase-mode pressure`` (evicting only when the pool runs short).

Workloads (``--workloads``):

- ``distinct``: short reasoning prompts (MATH-500 / AIME problems in the model's chat template), one
  request each; at each level N of ``--concurrency-levels``, N requests are sent at once. A level may
  be ``limit`` (or ``limit+K``): the physical limit pool // (max(longest prompt, B) + R), the most
  evicting requests that can hold their slot bound at once; sglang-vase should run that many at once
  without retraction.
- ``shared``: ``--samples`` samples (SGLang's ``n``) of each of N / samples questions behind one shared
  ``--system-prompt-tokens``-token system prompt (the paper's protocol draws 8-16 samples a question;
  agents resend long system prompts): the radix cache's workload.

Long outputs with ``ignore_eos``: every request produces exactly ``--output-len`` tokens. The radix
cache is flushed before each level. Reported per (workload, system, level):

- output tokens/s: output tokens of the level / wall time from first send to last finish;
- running requests, max and mean over decode steps (SGLang's ``Decode batch`` log lines, logged at
  every step with ``--decode-log-interval 1``);
- retractions: the sum of ``meta_info.num_retractions`` and SGLang's "KV cache pool is full.
  Retract requests" log lines (events and requests retracted);
- peak KV use: max ``#token`` and ``token usage`` of the decode log lines (slots held, radix-tree
  slots no request locks excluded);
- prefix hit rate: cached prompt tokens / prompt tokens (``meta_info.cached_tokens``);
- TTFT and TPOT p50/p90 (ms), measured by this client from the streamed chunks;
- for sglang-vase, the evictions from ``meta_info.vase``;

and, per level, the ratios of sglang-vase's output tokens/s to each plain system's, from the same run.
A progress bar per level shows requests done, output tokens/s and running requests.

Eviction overhead: on the sglang-vase server, at a fixed concurrency that fits the pool without
eviction, the same requests run once with the server's budget (evicting) and once with a per-request
budget above prompt + output (``custom_params {"vase": {"budget": ...}}``: eviction never triggers,
everything else identical), alternating ``--overhead-repeats`` times. Compared: decode step time at
full concurrency (from the log lines; mean and p50) and output tokens/s.

Plain SGLang admits an ``ignore_eos`` request only when the remaining outputs of the running
requests fit the pool, so on this workload it queues instead of retracting: its concurrency is capped
at the full requests the pool fits. sglang-vase admits by the slot bound.

Defaults (CPU: the embedded SmolLM2-135M-Instruct): 1024-token outputs, B = 256, R = 64, a pool that
fits 8 full-length requests (8 x (longest prompt + output + 4)), distinct levels 8,16,limit,limit+8,
shared level 32 (4 questions x 8 samples behind a 512-token system prompt).
``--quick``: 64-token outputs, B = 32, R = 16, a pool for 2 full requests, levels 2,limit+2, shared 4
(2 questions x 2 samples behind 64 tokens): a smoke test.

The paper's setting (one 80 GB GPU; Qwen3-14B, batch 16, 16K output tokens, B = 4096)::

    python benchmarks/throughput.py --model-path Qwen/Qwen3-14B --output-len 16384 \\
        --budget 4096 --window 64 --concurrency-levels 4,8,16,32 --dataset aime25

Results go to ``--out`` (JSON) and PNGs next to it: ``<stem>_concurrency.png`` (output tokens/s per
level, every system and workload) and ``<stem>_kv_usage.png`` (KV usage and running requests over
time at the highest distinct level).

    python benchmarks/throughput.py [--quick] [--out benchmarks/results/throughput.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import DATA_DIR, MATH_SUFFIX, RESULTS_DIR, TEMPERATURE, TOP_P, chat_ids, machine_info, problems
from sglang_vase.serving import Server

DEFAULT_DATA_DIR = DATA_DIR
DEFAULT_OUT = RESULTS_DIR / "throughput.json"
RESTRICTED = ["--disable-radix-cache", "--disable-overlap-schedule"]
# name -> (sglang-vase?, extra flags)
SYSTEMS = {
    "sglang": (False, []),
    "sglang-restricted": (False, RESTRICTED),
    "sglang-vase": (True, []),
    "sglang-vase-restricted": (True, RESTRICTED),
    "sglang-vase-pressure": (True, ["--vase-mode", "pressure"]),
}
BASELINES = ("sglang", "sglang-restricted")
WORKLOADS = ("distinct", "shared")
# Every decode step logged; streamed chunks carry only new tokens.
MEASURE_FLAGS = ["--decode-log-interval", "1", "--incremental-streaming-output"]
SYSTEM_TEXT = ("You are a meticulous competition mathematician. Restate the problem, list what is known, "
               "try small cases, prove every step, check the arithmetic twice and box the final answer. ")
# SGLang admits an ignore_eos request only if its whole lifetime fits with a token to spare per
# running request (PrefillAdder.add_one_req_ignore_eos); a few slots per request make "fits N full
# requests" hold exactly.
ADMISSION_SLACK = 4

FULL = dict(output_len=1024, budget=256, window=64, full_requests=8, levels="8,16,limit,limit+8", shared_levels="32",
            samples=8, system_prompt_tokens=512, max_prompt_len=256, overhead_repeats=1)
QUICK = dict(output_len=64, budget=32, window=16, full_requests=2, levels="2,limit+2", shared_levels="4", samples=2,
             system_prompt_tokens=64, max_prompt_len=100, overhead_repeats=1)

_TS = r"\[(?P<ts>\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)?)[^\]]*\]\s+"
DECODE_RE = re.compile(
    _TS + r"Decode batch(?: \[\d+\])?, #running-req: (?P<running>\d+), #token: (?P<tokens>\d+), "
    r"token usage: (?P<usage>[0-9.]+),.*?gen throughput \(token/s\): (?P<gen>[0-9.]+), #queue-req: (?P<queue>\d+)")
RETRACT_RE = re.compile(_TS + r"KV cache pool is full\. Retract requests\. #retracted_reqs: (?P<n>\d+)")
POOL_RE = re.compile(r"max_total_num_tokens=(\d+)")
LEVEL_RE = re.compile(r"^limit([+-]\d+)?$")


# ----------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/throughput.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="model folder or named model (sglang_vase.models.NAMED_MODELS) for every server "
                        "(default: the embedded SmolLM2-135M)")
    p.add_argument("--output-len", type=int, default=None, help=f"output tokens per request, ignore_eos "
                   f"(default {FULL['output_len']}; paper: 16384)")
    p.add_argument("--budget", type=int, default=None, help=f"B, --vase-budget (default {FULL['budget']}; paper: 4096)")
    p.add_argument("--window", type=int, default=None, help=f"R, --vase-window (default {FULL['window']})")
    p.add_argument("--policy", default="vase", help="--vase-policy of the sglang-vase servers (default vase)")
    p.add_argument("--pool-tokens", type=int, default=None,
                   help="KV pool, --max-total-tokens of every server (default: --full-requests x "
                        f"(longest prompt + output + {ADMISSION_SLACK}))")
    p.add_argument("--full-requests", type=int, default=None,
                   help=f"full-length requests the default pool fits (default {FULL['full_requests']})")
    p.add_argument("--concurrency-levels", default=None,
                   help=f"distinct workload: requests sent at once per level; 'limit' / 'limit+K' name the "
                        f"physical limit (default {FULL['levels']})")
    p.add_argument("--shared-levels", default=None,
                   help=f"shared workload: requests (questions x samples) per level (default {FULL['shared_levels']})")
    p.add_argument("--samples", type=int, default=None,
                   help=f"shared workload: samples per question, SGLang's n (default {FULL['samples']})")
    p.add_argument("--system-prompt-tokens", type=int, default=None,
                   help=f"shared workload: length of the shared system prompt (default {FULL['system_prompt_tokens']})")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"which workloads (default {','.join(WORKLOADS)})")
    p.add_argument("--max-running-requests", type=int, default=None,
                   help="--max-running-requests of every server (default: the highest level)")
    p.add_argument("--overhead-concurrency", type=int, default=None,
                   help="concurrency of the eviction-overhead runs (default: the full requests the pool fits); "
                        "0 skips them")
    p.add_argument("--overhead-repeats", type=int, default=None,
                   help="alternating (no eviction, eviction) pairs of overhead runs (default 1)")
    p.add_argument("--dataset", default="math", help="prompt file <data-dir>/<dataset>.jsonl (math, aime25, ...)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help=f"default {DEFAULT_DATA_DIR}")
    p.add_argument("--max-prompt-len", type=int, default=None,
                   help=f"skip prompts longer than this many tokens (default {FULL['max_prompt_len']})")
    p.add_argument("--no-ignore-eos", action="store_true",
                   help="let requests stop at EOS (output lengths vary; plain SGLang then admits by its "
                        "new-token-ratio estimate and may retract)")
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--top-p", type=float, default=TOP_P)
    p.add_argument("--systems", default="sglang,sglang-restricted,sglang-vase",
                   help=f"which systems to run, of {', '.join(SYSTEMS)} (default: all but sglang-vase-restricted)")
    p.add_argument("--server-args", default="", help="extra flags for every server, one quoted string")
    p.add_argument("--start-timeout", type=float, default=900, help="seconds to wait for a server to start")
    p.add_argument("--log-dir", type=Path, default=None, help="keep the server logs here (default: a temp dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: output 64, B=32, R=16, pool for 2 full requests, small levels")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name in ("output_len", "budget", "window", "full_requests", "max_prompt_len", "overhead_repeats", "samples",
                 "system_prompt_tokens"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    args.level_specs = _split(args.concurrency_levels or preset["levels"])
    args.shared = [int(x) for x in _split(args.shared_levels or preset["shared_levels"])]
    for spec in args.level_specs:
        if not (spec.isdigit() or LEVEL_RE.match(spec)):
            p.error(f"--concurrency-levels: {spec!r} is neither a count nor limit[+-K]")
    if any(n < args.samples or n % args.samples for n in args.shared):
        p.error("--shared-levels must be multiples of --samples")
    args.systems = _split(args.systems)
    args.workloads = _split(args.workloads)
    if not set(args.systems) <= set(SYSTEMS):
        p.error(f"--systems: choose from {list(SYSTEMS)}")
    if not set(args.workloads) <= set(WORKLOADS):
        p.error(f"--workloads: choose from {WORKLOADS}")
    if args.budget <= args.window or args.budget % args.window:
        p.error("--budget must be a multiple of --window and larger than it")
    return args


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def resolve_levels(specs: list[str], limit: int) -> list[int]:
    """Counts for level specs such as ``8``, ``limit``, ``limit+8`` (sorted, distinct, >= 1)."""
    levels = set()
    for spec in specs:
        m = LEVEL_RE.match(spec)
        levels.add(max(1, limit + int(m.group(1) or 0)) if m else int(spec))
    return sorted(levels)


# -------------------------------------------------------------------------------------- prompts


def load_prompts(path: Path, tokenizer, n: int, max_len: int, system: str | None = None) -> list[list[int]]:
    """The first ``n`` problems of a JSONL file whose chat-formatted prompt fits ``max_len`` tokens
    (counting the tokens after ``system``, when given)."""
    base = len(chat_ids(tokenizer, "", system)) if system else 0
    out = []
    for _, _, question in problems(path):
        ids = chat_ids(tokenizer, question + MATH_SUFFIX, system)
        if len(ids) - base <= max_len:
            out.append(ids)
        if len(out) == n:
            return out
    if not out:
        raise ValueError(f"no prompt in {path} fits {max_len} tokens")
    return [out[i % len(out)] for i in range(n)]  # fewer problems than requests: reuse them


def system_prompt(tokenizer, tokens: int) -> str:
    """A system prompt of about ``tokens`` tokens."""
    per = max(1, len(tokenizer(SYSTEM_TEXT)["input_ids"]))
    return SYSTEM_TEXT * max(1, round(tokens / per))


# --------------------------------------------------------------------------------------- client


class Progress:
    """Requests done, output tokens/s and running requests of one level, on a tqdm bar (stderr)."""

    def __init__(self, label: str, total: int, server: Server, enabled: bool):
        self.server, self.start, self.tokens = server, time.time(), {}
        self.offset = server.log_offset()
        self.running = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="req", file=sys.stderr, mininterval=1, leave=True)

    def tokens_of(self, key, count: int) -> None:
        self.tokens[key] = count

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def refresh(self) -> None:
        if self.bar is None:
            return
        text = self.server.log(self.offset)
        self.offset += len(text.encode())
        lines = DECODE_RE.findall(text)
        if lines:
            self.running = int(lines[-1][1])
        elapsed = max(time.time() - self.start, 1e-6)
        self.bar.set_postfix(tok_s=f"{sum(self.tokens.values()) / elapsed:.1f}", running=self.running)

    def close(self) -> None:
        if self.bar is not None:
            self.refresh()
            self.bar.close()


async def _stream_one(session, url: str, input_ids: list[int], sampling: dict, t0: float, progress: Progress,
                      key) -> list[dict]:
    """One streaming /generate request (``sampling["n"]`` samples): per sample, send / first-chunk /
    last-chunk times, tokens and meta_info."""
    body = {"input_ids": input_ids, "sampling_params": sampling, "stream": True}
    sent = time.time()
    samples: dict[int, dict] = {}
    async with session.post(f"{url}/generate", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"/generate returned {resp.status}: {(await resp.text())[:500]}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            now = time.time()
            data = json.loads(payload)
            meta, index = data["meta_info"], data.get("index", 0)
            s = samples.setdefault(index, {"first": now, "first_tokens": meta.get("completion_tokens", 1)})
            s["last"], s["meta"] = now, meta
            progress.tokens_of((key, index), meta.get("completion_tokens", 0))
            if meta.get("finish_reason"):
                progress.done()
    if not samples:
        raise RuntimeError("empty stream")
    recs = []
    for s in samples.values():
        meta = s["meta"]
        if isinstance(meta.get("finish_reason"), dict) and meta["finish_reason"].get("type") == "abort":
            raise RuntimeError(f"request aborted: {meta['finish_reason']}")
        tokens = meta.get("completion_tokens", 0)
        recs.append({
            "send_s": sent - t0, "first_s": s["first"] - t0, "end_s": s["last"] - t0,
            "ttft_ms": (s["first"] - sent) * 1e3,
            "tpot_ms": (s["last"] - s["first"]) * 1e3 / (tokens - s["first_tokens"]) if tokens > s["first_tokens"] else None,
            "prompt_tokens": meta.get("prompt_tokens"), "cached_tokens": meta.get("cached_tokens", 0) or 0,
            "output_tokens": tokens, "num_retractions": meta.get("num_retractions", 0) or 0, "vase": meta.get("vase"),
        })
    return recs


async def _run_batch(url: str, prompts: list[list[int]], sampling: dict, progress: Progress) -> tuple[float, list[dict]]:
    import aiohttp

    async def tick():
        while True:
            progress.refresh()
            await asyncio.sleep(2)

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=3600)
    connector = aiohttp.TCPConnector(limit=0)
    ticker = asyncio.create_task(tick())
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            t0 = time.time()
            recs = await asyncio.gather(*(_stream_one(session, url, p, sampling, t0, progress, i)
                                          for i, p in enumerate(prompts)))
    finally:
        ticker.cancel()
    return t0, [r for rs in recs for r in rs]


def run_batch(url: str, prompts: list[list[int]], sampling: dict, progress: Progress) -> tuple[float, list[dict]]:
    try:
        return asyncio.run(_run_batch(url, prompts, sampling, progress))
    finally:
        progress.close()


# ------------------------------------------------------------------------------------ log parse


def _epoch(ts: str) -> float:
    fmt = "%Y-%m-%d %H:%M:%S.%f" if "." in ts else "%Y-%m-%d %H:%M:%S"
    return dt.datetime.strptime(ts, fmt).timestamp()  # the server logs local time, as time.time() reads it


def parse_log(text: str) -> tuple[list[dict], list[dict]]:
    """Decode-step records and retraction events from a server log segment."""
    steps = [{"t": _epoch(m["ts"]), "running": int(m["running"]), "tokens": int(m["tokens"]),
              "usage": float(m["usage"]), "gen_tps": float(m["gen"]), "queue": int(m["queue"])}
             for m in DECODE_RE.finditer(text)]
    retracts = [{"t": _epoch(m["ts"]), "n": int(m["n"])} for m in RETRACT_RE.finditer(text)]
    return steps, retracts


def pct(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    k = (len(v) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _r(x, nd=3):
    return None if x is None else round(x, nd)


def step_times_ms(steps: list[dict], running: int) -> list[float]:
    """Decode step time at exactly ``running`` requests: #running / gen throughput of that log line
    (each line covers one step with --decode-log-interval 1; no prefill runs once all are admitted)."""
    return [s["running"] / s["gen_tps"] * 1e3 for s in steps if s["running"] == running and s["gen_tps"] > 0]


def summarize(t0: float, recs: list[dict], steps: list[dict], retracts: list[dict]) -> dict:
    wall = max(r["end_s"] for r in recs) - min(r["send_s"] for r in recs)
    out_tokens = sum(r["output_tokens"] for r in recs)
    running = [s["running"] for s in steps]
    evictions = [r["vase"]["evictions"] for r in recs if r.get("vase")]
    prompt_tokens = sum(r["prompt_tokens"] or 0 for r in recs)
    res = {
        "requests": len(recs),
        "output_tokens": out_tokens,
        "wall_s": _r(wall),
        "output_tok_s": _r(out_tokens / wall if wall > 0 else None),
        "decode_steps": len(steps),
        "max_running_requests": max(running, default=0),
        "mean_running_requests": _r(statistics.fmean(running) if running else None),
        "retractions_meta_info": sum(r["num_retractions"] for r in recs),
        "retraction_events_log": len(retracts),
        "retracted_requests_log": sum(e["n"] for e in retracts),
        "peak_kv_tokens": max((s["tokens"] for s in steps), default=0),
        "peak_token_usage": max((s["usage"] for s in steps), default=0.0),
        "mean_token_usage": _r(statistics.fmean(s["usage"] for s in steps) if steps else None),
        "prefix_hit_rate": _r(sum(r["cached_tokens"] for r in recs) / prompt_tokens if prompt_tokens else None),
        "ttft_ms": {"p50": _r(pct([r["ttft_ms"] for r in recs], 50), 1),
                    "p90": _r(pct([r["ttft_ms"] for r in recs], 90), 1)},
        "tpot_ms": {"p50": _r(pct([r["tpot_ms"] for r in recs], 50), 2),
                    "p90": _r(pct([r["tpot_ms"] for r in recs], 90), 2)},
        "all_outputs_full_length": all(r["output_tokens"] == recs[0]["output_tokens"] for r in recs),
    }
    if evictions:
        res["vase"] = {
            "evictions_total": sum(evictions),
            "evicted_tokens_total": sum(r["vase"].get("evicted_tokens", 0) for r in recs if r.get("vase")),
            "forced_evictions_total": sum(r["vase"].get("forced_evictions", 0) for r in recs if r.get("vase")),
            "peak_kv_len_max": max(r["vase"].get("peak_kv_len", 0) for r in recs if r.get("vase")),
        }
    res["trace"] = {  # KV use over time, seconds since the level's first request
        "t_s": [_r(s["t"] - t0, 3) for s in steps],
        "running": running,
        "kv_tokens": [s["tokens"] for s in steps],
        "token_usage": [s["usage"] for s in steps],
    }
    return res


# ------------------------------------------------------------------------------------ benchmark


def sampling(args, **extra) -> dict:
    return {"max_new_tokens": args.output_len, "ignore_eos": not args.no_ignore_eos,
            "temperature": args.temperature, "top_p": args.top_p, **extra}


def run_level(server: Server, label: str, prompts, samp: dict, progress: bool) -> dict:
    import requests

    requests.post(f"{server.url}/flush_cache", timeout=60)  # every level starts with an empty radix tree
    start = server.log_offset()
    bar = Progress(label, len(prompts) * samp.get("n", 1), server, progress)
    t0, recs = run_batch(server.url, prompts, samp, bar)
    time.sleep(0.5)  # let the last decode line reach the log
    steps, retracts = parse_log(server.log(start))
    return summarize(t0, recs, steps, retracts)


def run_overhead(server: Server, args, prompts, no_evict_budget: int) -> dict:
    """Decode step time and tok/s on one sglang-vase server: evicting (server budget) vs never evicting.

    The two settings alternate ``--overhead-repeats`` times (so that load drifting on a shared machine
    hits both alike); step times are pooled over the repeats, tok/s averaged.
    """
    c = len(prompts)
    settings = (("no_eviction", {"custom_params": {"vase": {"budget": no_evict_budget}}}), ("eviction", {}))
    runs = {name: [] for name, _ in settings}
    steps_ms = {name: [] for name, _ in settings}
    for _ in range(args.overhead_repeats):
        for name, extra in settings:
            start = server.log_offset()
            bar = Progress(f"overhead {name} @ {c}", c, server, not args.no_progress)
            t0, recs = run_batch(server.url, prompts, sampling(args, **extra), bar)
            time.sleep(0.5)
            steps, retracts = parse_log(server.log(start))
            res = summarize(t0, recs, steps, retracts)
            del res["trace"]
            steps_ms[name] += step_times_ms(steps, c)
            runs[name].append(res)
    out = {"concurrency": c, "repeats": args.overhead_repeats, "no_eviction_budget": no_evict_budget,
           "no_eviction_evictions": sum(r.get("vase", {}).get("evictions_total", 0) for r in runs["no_eviction"]),
           "eviction_evictions": sum(r.get("vase", {}).get("evictions_total", 0) for r in runs["eviction"])}
    for name, _ in settings:
        st = steps_ms[name]
        out[name] = {"output_tok_s": _r(statistics.fmean(r["output_tok_s"] for r in runs[name])),
                     "tpot_ms_p50": _r(statistics.fmean(r["tpot_ms"]["p50"] for r in runs[name]), 2),
                     "step_ms": {"n": len(st), "mean": _r(statistics.fmean(st) if st else None),
                                 "p50": _r(pct(st, 50)), "p90": _r(pct(st, 90))}}
    a, b = out["eviction"], out["no_eviction"]
    out["step_time_ratio_mean"] = _ratio(a["step_ms"]["mean"], b["step_ms"]["mean"])
    out["step_time_ratio_p50"] = _ratio(a["step_ms"]["p50"], b["step_ms"]["p50"])
    out["step_time_overhead_pct"] = (_r((out["step_time_ratio_mean"] - 1) * 100, 2)
                                     if out["step_time_ratio_mean"] else None)
    out["tok_s_ratio_evict_vs_none"] = _ratio(a["output_tok_s"], b["output_tok_s"])
    out["runs"] = runs
    out["note"] = ("step time = #running-req / gen throughput of each decode log line at full concurrency; "
                   "the evicting run also attends over at most B + R tokens instead of the full length")
    return out


def _ratio(x, y):
    return _r(x / y) if x and y else None


def ratios(systems: dict) -> dict:
    """Per baseline and level: sglang-vase output tok/s / the baseline's."""
    vase = systems.get("sglang-vase", {}).get("levels", {})
    return {base: {n: _ratio(vase[n]["output_tok_s"], systems[base]["levels"][n]["output_tok_s"])
                   for n in vase if n in systems[base]["levels"]}
            for base in BASELINES if base in systems and vase}


def limit_check(levels: dict, limit: int) -> dict:
    """At and past the physical limit: does sglang-vase run within 5% of it at once, unretracted?"""
    out = {}
    for n, res in levels.items():
        if int(n) >= limit:
            out[n] = {"max_running": res["max_running_requests"],
                      "within_5pct": res["max_running_requests"] >= 0.95 * limit,
                      "retractions": res["retractions_meta_info"] + res["retraction_events_log"]}
    return out


@dataclass
class Plan:
    """What a run measures, sized from its arguments and the dataset's prompts."""
    model_path: str
    data_file: Path
    longest: int
    pool: int
    fits: int
    limit: int
    levels: dict[str, list[int]]
    prompts: dict[str, list[list[int]]]
    system_prompt_tokens: int
    overhead_concurrency: int
    no_evict_budget: int
    max_running: int
    common: list[str]
    vase_flags: list[str]


def plan_run(args: argparse.Namespace, model_path: str, tokenizer) -> Plan:
    """Size the KV pool and the physical limit, resolve the levels, load their prompts and build the
    server flags every system shares."""
    data_file = args.data_dir / f"{args.dataset}.jsonl"
    # The pool and the limit come from the distinct workload's prompts (at most its largest count).
    probe = load_prompts(data_file, tokenizer, 64, args.max_prompt_len)
    longest = max(len(p) for p in probe)
    full_len = longest + args.output_len + ADMISSION_SLACK
    pool = args.pool_tokens or args.full_requests * full_len
    limit = pool // (max(longest, args.budget) + args.window)
    levels = {"distinct": resolve_levels(args.level_specs, limit) if "distinct" in args.workloads else [],
              "shared": args.shared if "shared" in args.workloads else []}
    top = max(max(v) for v in levels.values() if v)
    prompts = {"distinct": load_prompts(data_file, tokenizer, max(levels["distinct"], default=1), args.max_prompt_len)}
    system = system_prompt(tokenizer, args.system_prompt_tokens)
    prompts["shared"] = load_prompts(data_file, tokenizer, max(levels["shared"], default=args.samples) // args.samples,
                                     args.max_prompt_len, system=system)
    fits = pool // full_len
    oc = args.overhead_concurrency if args.overhead_concurrency is not None else fits
    # A budget at or above prompt + output never triggers; sglang-vase refuses requests whose slot
    # bound (max(prompt, B) + R) exceeds the pool, so take the smallest such multiple of R.
    no_evict_budget = args.window * math.ceil(full_len / args.window)
    if oc and no_evict_budget + args.window > pool:
        print(f"[throughput] overhead runs skipped: no-eviction budget {no_evict_budget} + R exceeds the pool",
              flush=True)
        oc = 0
    max_running = args.max_running_requests or max(top, oc)
    common = ["--model-path", model_path, "--max-total-tokens", str(pool), "--max-running-requests", str(max_running),
              *MEASURE_FLAGS, *shlex.split(args.server_args)]
    vase_flags = ["--vase-budget", str(args.budget), "--vase-window", str(args.window), "--vase-policy", args.policy]
    return Plan(model_path=model_path, data_file=data_file, longest=longest, pool=pool, fits=fits, limit=limit,
                levels=levels, prompts=prompts, system_prompt_tokens=len(chat_ids(tokenizer, "", system)),
                overhead_concurrency=oc, no_evict_budget=no_evict_budget, max_running=max_running,
                common=common, vase_flags=vase_flags)


def result_header(args: argparse.Namespace, argv: list[str] | None, plan: Plan) -> dict:
    """The results file before any measurement: the machine and every setting the numbers depend on."""
    return {
        "benchmark": "throughput",
        "machine": machine_info(str(Path(__file__)), argv),
        "settings": {
            "model_path": plan.model_path, "dataset": str(plan.data_file), "output_len": args.output_len,
            "budget": args.budget, "window": args.window, "policy": args.policy, "pool_tokens": plan.pool,
            "full_requests_pool_fits": plan.fits, "longest_prompt_tokens": plan.longest,
            "physical_limit": plan.limit, "physical_limit_formula": "pool // (max(longest prompt, B) + R)",
            "distinct_prompt_tokens": [len(p) for p in plan.prompts["distinct"]],
            "shared_prompt_tokens": [len(p) for p in plan.prompts["shared"]], "samples": args.samples,
            "system_prompt_tokens": plan.system_prompt_tokens,
            "levels": plan.levels, "max_running_requests": plan.max_running, "temperature": args.temperature,
            "top_p": args.top_p, "ignore_eos": not args.no_ignore_eos, "quick": args.quick,
            "common_server_flags": plan.common[2:], "vase_flags": plan.vase_flags,
            "system_flags": {s: SYSTEMS[s][1] for s in args.systems},
        },
        "servers": {},
        "workloads": {w: {"systems": {}} for w in args.workloads},
    }


def run_system(args: argparse.Namespace, plan: Plan, system_name: str, result: dict, log_dir: Path,
               cuda: bool) -> None:
    """One system's server: every workload's levels, then (sglang-vase) the eviction overhead; the
    results go into ``result``."""
    is_vase, extra = SYSTEMS[system_name]
    flags = plan.common + extra + (plan.vase_flags if is_vase else [])
    # Plain SGLang gets the CPU route from serving.Server when no GPU is visible.
    server = Server(flags, vase=is_vase, env={"SGLANG_LOG_MS": "1"}, log_path=log_dir / f"{system_name}.log",
                    cuda=cuda, wait=False)
    try:
        startup = server.wait_ready(args.start_timeout)
        m = POOL_RE.search(server.log())
        result["servers"][system_name] = {
            "command": " ".join(shlex.quote(c) for c in server.cmd), "startup_s": round(startup, 1),
            "log": str(server.log_path), "pool_tokens_reported": int(m.group(1)) if m else None}
        warm = Progress("warm-up", 1, server, False)
        run_batch(server.url, plan.prompts["distinct"][:1], {**sampling(args), "max_new_tokens": 4}, warm)
        run_levels(args, plan, server, system_name, result)
        oc = plan.overhead_concurrency
        if system_name == "sglang-vase" and oc > 0:
            try:
                oh = result["servers"][system_name]["overhead"] = run_overhead(
                    server, args, plan.prompts["distinct"][:oc], plan.no_evict_budget)
                print(f"[throughput] eviction vs none at {oc} requests: step time x{oh['step_time_ratio_mean']} "
                      f"(mean) x{oh['step_time_ratio_p50']} (p50), tok/s x{oh['tok_s_ratio_evict_vs_none']}",
                      flush=True)
            except Exception as e:  # noqa: BLE001 -- keep the levels' results; the error is reported
                result["servers"][system_name]["overhead"] = {"error": f"{type(e).__name__}: {e}"}
                print(f"[throughput] overhead run failed: {e}", flush=True)
    finally:
        server.stop()


def run_levels(args: argparse.Namespace, plan: Plan, server: Server, system_name: str, result: dict) -> None:
    """Every workload's concurrency levels on one system's server."""
    for workload in args.workloads:
        entry = result["workloads"][workload]["systems"].setdefault(system_name, {"levels": {}})
        for n in plan.levels[workload]:
            if workload == "shared":
                batch, samp = plan.prompts["shared"][: n // args.samples], sampling(args, n=args.samples)
            else:
                batch, samp = plan.prompts["distinct"][:n], sampling(args)
            label = f"{system_name} {workload} {n}"
            res = entry["levels"][str(n)] = run_level(server, label, batch, samp, not args.no_progress)
            print(f"[throughput] {label}: {res['output_tok_s']} tok/s, running max "
                  f"{res['max_running_requests']} mean {res['mean_running_requests']}, retractions "
                  f"{res['retractions_meta_info']}, peak KV {res['peak_kv_tokens']}, prefix hits "
                  f"{res['prefix_hit_rate']}", flush=True)


def finish(args: argparse.Namespace, result: dict, limit: int, t_start: float) -> dict:
    """The ratios to the baselines and the check at the physical limit, then the plots and the file."""
    for workload, data in result["workloads"].items():
        data["ratio_vase_vs"] = ratios(data["systems"])
        print(f"[throughput] {workload}: sglang-vase / baseline output tok/s: {data['ratio_vase_vs']}", flush=True)
    if "sglang-vase" in result["workloads"].get("distinct", {}).get("systems", {}):
        check = limit_check(result["workloads"]["distinct"]["systems"]["sglang-vase"]["levels"], limit)
        result["workloads"]["distinct"]["at_physical_limit"] = check
        print(f"[throughput] at the physical limit ({limit}): {check}", flush=True)
    result["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["runtime_s"] = round(time.time() - t_start, 1)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result["plots"] = plot(result, args.out)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"[throughput] wrote {args.out} ({result['runtime_s']} s)", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    cuda = torch.cuda.is_available()
    t_start = time.time()
    from sglang_vase.models import resolve_model

    model_path = resolve_model(args.model_path)
    plan = plan_run(args, model_path, AutoTokenizer.from_pretrained(model_path))
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="vase-throughput-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    result = result_header(args, argv, plan)
    for system_name in args.systems:
        run_system(args, plan, system_name, result, log_dir, cuda)
    return finish(args, result, plan.limit, t_start)


# ---------------------------------------------------------------------------------------- plots


def plot(result: dict, out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    title = (f"{Path(s['model_path']).name}, {s['output_len']} output tokens, pool {s['pool_tokens']} tokens, "
             f"B={s['budget']} R={s['window']}")
    paths = {}
    workloads = result["workloads"]
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.4 * len(workloads), 4.2), squeeze=False)
    for ax, (workload, data) in zip(axes[0], workloads.items()):
        for system, entry in data["systems"].items():
            levels = sorted(entry["levels"], key=int)
            ax.plot([int(n) for n in levels], [entry["levels"][n]["output_tok_s"] for n in levels], "o-",
                    label=system)
        if workload == "distinct":
            ax.axvline(s["physical_limit"], color="grey", ls=":", label="physical limit")
        ax.set_xlabel("concurrent requests" + (f" ({s['samples']} samples a question)" if workload == "shared" else ""))
        ax.set_ylabel("output tokens/s")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{workload} prompts; {title}", fontsize=8)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths["concurrency"] = str(out.with_name(f"{out.stem}_concurrency.png"))
    fig.savefig(paths["concurrency"], dpi=120)
    plt.close(fig)

    distinct = workloads.get("distinct") or next(iter(workloads.values()))
    top = str(max(int(n) for entry in distinct["systems"].values() for n in entry["levels"]))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6.4, 5.6), sharex=True)
    for system, entry in distinct["systems"].items():
        tr = entry["levels"].get(top, {}).get("trace")
        if not tr:
            continue
        ax1.plot(tr["t_s"], tr["token_usage"], label=system)
        ax2.plot(tr["t_s"], tr["running"], label=system)
    ax1.set_ylabel("KV token usage (of the pool)")
    ax1.set_ylim(0, 1.05)
    ax2.set_ylabel("running requests")
    ax2.set_xlabel("seconds since the first request")
    ax1.set_title(f"{top} requests; {title}", fontsize=8)
    ax1.legend(fontsize=8)
    for a in (ax1, ax2):
        a.grid(alpha=0.3)
    fig.tight_layout()
    paths["kv_usage"] = str(out.with_name(f"{out.stem}_kv_usage.png"))
    fig.savefig(paths["kv_usage"], dpi=120)
    plt.close(fig)
    return paths


if __name__ == "__main__":
    main()
