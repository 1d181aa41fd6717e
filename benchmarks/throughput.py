"""Serving throughput at equal KV memory: plain SGLang vs sglang-vase, on the paper's workload shape.

Both servers get the same model, ``--max-total-tokens`` (KV pool), ``--max-running-requests`` and
scheduler flags, and run one after the other. The workload is the paper's: short reasoning prompts
(MATH-500 / AIME problems in the model's chat template) and long outputs with ``ignore_eos``, so every
request produces exactly ``--output-len`` tokens. At each level N of ``--concurrency-levels``, N
streaming requests are sent at once and the level ends when all have finished. Reported per
(system, level):

- output tokens/s: output tokens of the level / wall time from first send to last finish;
- running requests, max and mean over decode steps (SGLang's ``Decode batch`` log lines, logged at
  every step with ``--decode-log-interval 1``);
- retractions: the sum of ``meta_info.num_retractions`` and SGLang's "KV cache pool is full.
  Retract requests" log lines (events and requests retracted);
- peak KV use: max ``#token`` and ``token usage`` from the decode log lines;
- TTFT and TPOT p50/p90 (ms), measured by this client from the streamed chunks;
- for sglang-vase, the evictions from ``meta_info.vase``;

and, per level, the ratio of sglang-vase to plain SGLang output tokens/s from the same run.

Eviction overhead: on the sglang-vase server, at a fixed concurrency that fits the pool without
eviction, the same requests run once with the server's budget (evicting) and once with a per-request
budget above prompt + output (``custom_params {"vase": {"budget": ...}}``: eviction never triggers,
everything else identical), alternating ``--overhead-repeats`` times. Compared: decode step time at
full concurrency (from the log lines; mean and p50) and output tokens/s. The evicting run also
attends over at most B + R tokens instead of the full length, so the difference is the eviction cost
net of the smaller attention.

Plain SGLang admits an ``ignore_eos`` request only when the whole remaining lifetimes of all running
requests fit the pool (``PrefillAdder.add_one_req_ignore_eos``), so on this workload it queues
instead of retracting: its retraction count is expected to be 0, and its concurrency is capped at
the full requests the pool fits. sglang-vase admits by the slot bound max(prompt, B) + R.
Running requests are averaged over decode steps, not over time.

Defaults (CPU: the embedded SmolLM2-135M-Instruct): 1024-token outputs, B = 256, R = 64, a pool that
fits 8 full-length requests (8 x (longest prompt + output + 4)), levels 4,8,16.
``--quick``: 64-token outputs, B = 32, R = 16, a pool for 2 full requests, levels 2,4 (a smoke test).

The paper's setting (one 80 GB GPU; Qwen3-14B, batch 16, 16K output tokens, B = 4096)::

    python benchmarks/throughput.py --model-path Qwen/Qwen3-14B --output-len 16384 \\
        --budget 4096 --window 64 --concurrency-levels 4,8,16,32 --dataset aime25

(the pool then defaults to 8 x (prompt + 16384) tokens; ``--pool-tokens`` sets it, e.g. to what the
GPU holds). Results go to ``--out`` (JSON) and two PNGs next to it: ``<stem>_concurrency.png``
(output tokens/s per level, both systems) and ``<stem>_kv_usage.png`` (KV usage and running requests
over time at the highest level, both systems).

    python benchmarks/throughput.py [--quick] [--out benchmarks/results/throughput.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sglang_vase.serving import Server

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "reasoning"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "throughput.json"
SYSTEMS = ("sglang", "sglang-vase")
# Flags sglang-vase adds for eviction; plain SGLang gets them too, so that only eviction differs.
SHARED_FLAGS = ["--disable-radix-cache", "--disable-overlap-schedule", "--page-size", "1",
                "--decode-log-interval", "1", "--incremental-streaming-output"]
PROMPT_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
# SGLang admits an ignore_eos request only if its whole lifetime fits with a token to spare per
# running request (PrefillAdder.add_one_req_ignore_eos); a few slots per request make "fits N full
# requests" hold exactly.
ADMISSION_SLACK = 4

FULL = dict(output_len=1024, budget=256, window=64, full_requests=8, levels="4,8,16", max_prompt_len=256,
            overhead_repeats=2)
QUICK = dict(output_len=64, budget=32, window=16, full_requests=2, levels="2,4", max_prompt_len=128,
             overhead_repeats=1)

_TS = r"\[(?P<ts>\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)?)[^\]]*\]\s+"
DECODE_RE = re.compile(
    _TS + r"Decode batch(?: \[\d+\])?, #running-req: (?P<running>\d+), #token: (?P<tokens>\d+), "
    r"token usage: (?P<usage>[0-9.]+),.*?gen throughput \(token/s\): (?P<gen>[0-9.]+), #queue-req: (?P<queue>\d+)")
RETRACT_RE = re.compile(_TS + r"KV cache pool is full\. Retract requests\. #retracted_reqs: (?P<n>\d+)")
POOL_RE = re.compile(r"max_total_num_tokens=(\d+)")


# ----------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/throughput.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="model for both servers (default: the embedded SmolLM2-135M)")
    p.add_argument("--output-len", type=int, default=None, help=f"output tokens per request, ignore_eos "
                   f"(default {FULL['output_len']}; paper: 16384)")
    p.add_argument("--budget", type=int, default=None, help=f"B, --vase-budget (default {FULL['budget']}; paper: 4096)")
    p.add_argument("--window", type=int, default=None, help=f"R, --vase-window (default {FULL['window']})")
    p.add_argument("--policy", default="vase", help="--vase-policy of the sglang-vase server (default vase)")
    p.add_argument("--pool-tokens", type=int, default=None,
                   help="KV pool, --max-total-tokens of both servers (default: --full-requests x "
                        f"(longest prompt + output + {ADMISSION_SLACK}))")
    p.add_argument("--full-requests", type=int, default=None,
                   help=f"full-length requests the default pool fits (default {FULL['full_requests']})")
    p.add_argument("--concurrency-levels", default=None,
                   help=f"requests sent at once per level (default {FULL['levels']})")
    p.add_argument("--max-running-requests", type=int, default=None,
                   help="--max-running-requests of both servers (default: the highest level)")
    p.add_argument("--overhead-concurrency", type=int, default=None,
                   help="concurrency of the eviction-overhead runs (default: the full requests the pool fits, "
                        "at most the highest level); 0 skips them")
    p.add_argument("--overhead-repeats", type=int, default=None,
                   help="alternating (no eviction, eviction) pairs of overhead runs (default 2; --quick 1)")
    p.add_argument("--dataset", default="math", help="prompt file <data-dir>/<dataset>.jsonl (math, aime25, ...)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help=f"default {DEFAULT_DATA_DIR}")
    p.add_argument("--max-prompt-len", type=int, default=None,
                   help=f"skip prompts longer than this many tokens (default {FULL['max_prompt_len']})")
    p.add_argument("--no-ignore-eos", action="store_true",
                   help="let requests stop at EOS (output lengths vary; plain SGLang then admits by its "
                        "new-token-ratio estimate and may retract)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--systems", default=",".join(SYSTEMS), help="which systems to run (default both)")
    p.add_argument("--server-args", default="", help="extra flags for both servers, one quoted string")
    p.add_argument("--start-timeout", type=float, default=900, help="seconds to wait for a server to start")
    p.add_argument("--log-dir", type=Path, default=None, help="keep the server logs here (default: a temp dir)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: output 64, B=32, R=16, pool for 2 full requests, levels 2,4")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name in ("output_len", "budget", "window", "full_requests", "max_prompt_len", "overhead_repeats"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    args.levels = [int(x) for x in (args.concurrency_levels or preset["levels"]).split(",") if x.strip()]
    if not args.levels or min(args.levels) < 1:
        p.error("--concurrency-levels needs positive integers")
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not set(args.systems) <= set(SYSTEMS):
        p.error(f"--systems: choose from {SYSTEMS}")
    if args.budget <= args.window or args.budget % args.window:
        p.error("--budget must be a multiple of --window and larger than it")
    return args


# -------------------------------------------------------------------------------------- prompts


def load_prompts(path: Path, tokenizer, n: int, max_len: int) -> list[list[int]]:
    """The first ``n`` problems of a JSONL file whose chat-formatted prompt fits ``max_len`` tokens."""
    out = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            text = (row.get("problem") or row.get("question") or "") + PROMPT_SUFFIX
            if getattr(tokenizer, "chat_template", None):
                ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                    add_generation_prompt=True)
                if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                    ids = ids["input_ids"]
            else:
                ids = tokenizer(text)["input_ids"]
            ids = list(ids)
            if len(ids) <= max_len:
                out.append(ids)
            if len(out) == n:
                return out
    if not out:
        raise ValueError(f"no prompt in {path} fits {max_len} tokens")
    return [out[i % len(out)] for i in range(n)]  # fewer problems than requests: reuse them


# --------------------------------------------------------------------------------------- client


async def _stream_one(session, url: str, input_ids: list[int], sampling: dict, t0: float) -> dict:
    """One streaming /generate request: send, first-chunk and last-chunk times, tokens, meta_info."""
    body = {"input_ids": input_ids, "sampling_params": sampling, "stream": True}
    sent = time.time()
    first = last = None
    first_tokens, last_data = 0, None
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
            if first is None:
                first = now
                first_tokens = json.loads(payload)["meta_info"].get("completion_tokens", 1)
            last, last_data = now, payload
    if last_data is None:
        raise RuntimeError("empty stream")
    meta = json.loads(last_data)["meta_info"]
    if isinstance(meta.get("finish_reason"), dict) and meta["finish_reason"].get("type") == "abort":
        raise RuntimeError(f"request aborted: {meta['finish_reason']}")
    tokens = meta.get("completion_tokens", 0)
    return {
        "send_s": sent - t0, "first_s": first - t0, "end_s": last - t0,
        "ttft_ms": (first - sent) * 1e3,
        "tpot_ms": (last - first) * 1e3 / (tokens - first_tokens) if tokens > first_tokens else None,
        "prompt_tokens": meta.get("prompt_tokens"), "output_tokens": tokens,
        "num_retractions": meta.get("num_retractions", 0) or 0, "vase": meta.get("vase"),
    }


async def _run_batch(url: str, prompts: list[list[int]], sampling: dict) -> tuple[float, list[dict]]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=3600)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.time()
        recs = await asyncio.gather(*(_stream_one(session, url, p, sampling, t0) for p in prompts))
    return t0, list(recs)


def run_batch(url: str, prompts: list[list[int]], sampling: dict) -> tuple[float, list[dict]]:
    return asyncio.run(_run_batch(url, prompts, sampling))


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


def machine_info(cuda: bool, argv: list[str] | None) -> dict:
    import torch

    cmd = [sys.executable, *sys.argv] if argv is None else [sys.executable, str(Path(__file__)), *argv]
    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in cmd),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    }
    try:
        from importlib.metadata import version

        info["sglang"] = version("sglang")
    except Exception:  # noqa: BLE001 -- informational only
        info["sglang"] = None
    return info


def sampling(args, **extra) -> dict:
    return {"max_new_tokens": args.output_len, "ignore_eos": not args.no_ignore_eos,
            "temperature": args.temperature, "top_p": args.top_p, **extra}


def run_level(server: Server, prompts, samp: dict) -> dict:
    start = server.log_offset()
    t0, recs = run_batch(server.url, prompts, samp)
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
            t0, recs = run_batch(server.url, prompts, sampling(args, **extra))
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

    def ratio(x, y):
        return _r(x / y) if x and y else None

    out["step_time_ratio_mean"] = ratio(a["step_ms"]["mean"], b["step_ms"]["mean"])
    out["step_time_ratio_p50"] = ratio(a["step_ms"]["p50"], b["step_ms"]["p50"])
    out["step_time_overhead_pct"] = (_r((out["step_time_ratio_mean"] - 1) * 100, 2)
                                     if out["step_time_ratio_mean"] else None)
    out["tok_s_ratio_evict_vs_none"] = ratio(a["output_tok_s"], b["output_tok_s"])
    out["runs"] = runs
    out["note"] = ("step time = #running-req / gen throughput of each decode log line at full concurrency; "
                   "the evicting run also attends over at most B + R tokens instead of the full length")
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    cuda = torch.cuda.is_available()
    t_start = time.time()
    model_path = args.model_path
    if model_path is None:
        from sglang_vase.models import prepare_default_model

        model_path = prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data_file = args.data_dir / f"{args.dataset}.jsonl"
    n_prompts = max(args.levels)
    prompts = load_prompts(data_file, tokenizer, n_prompts, args.max_prompt_len)
    longest = max(len(p) for p in prompts)
    full_len = longest + args.output_len + ADMISSION_SLACK
    pool = args.pool_tokens or args.full_requests * full_len
    max_running = args.max_running_requests or max(args.levels)
    fits = pool // full_len
    oc = args.overhead_concurrency if args.overhead_concurrency is not None else min(fits, max(args.levels))
    # A budget at or above prompt + output never triggers; sglang-vase refuses requests whose slot
    # bound (max(prompt, B) + R) exceeds the pool, so take the smallest such multiple of R.
    no_evict_budget = args.window * math.ceil(full_len / args.window)
    if oc and no_evict_budget + args.window > pool:
        print(f"[throughput] overhead runs skipped: no-eviction budget {no_evict_budget} + R exceeds the pool",
              flush=True)
        oc = 0

    common = ["--model-path", model_path, "--max-total-tokens", str(pool),
              "--max-running-requests", str(max(max_running, oc)), *SHARED_FLAGS, *shlex.split(args.server_args)]
    vase_flags = ["--vase-budget", str(args.budget), "--vase-window", str(args.window), "--vase-policy", args.policy]
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="vase-throughput-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    result = {
        "benchmark": "throughput",
        "machine": machine_info(cuda, argv),
        "settings": {
            "model_path": model_path, "dataset": str(data_file), "output_len": args.output_len,
            "budget": args.budget, "window": args.window, "policy": args.policy, "pool_tokens": pool,
            "full_requests_pool_fits": fits, "longest_prompt_tokens": longest,
            "prompt_tokens": [len(p) for p in prompts], "concurrency_levels": args.levels,
            "max_running_requests": max(max_running, oc), "temperature": args.temperature, "top_p": args.top_p,
            "ignore_eos": not args.no_ignore_eos, "quick": args.quick, "shared_server_flags": common[2:],
            "vase_flags": vase_flags,
        },
        "systems": {},
    }
    for system in args.systems:
        flags = common + (vase_flags if system == "sglang-vase" else [])
        # Plain SGLang gets the CPU route from serving.Server when no GPU is visible.
        server = Server(flags, vase=system == "sglang-vase", env={"SGLANG_LOG_MS": "1"},
                        log_path=log_dir / f"{system}.log", cuda=cuda, wait=False)
        try:
            startup = server.wait_ready(args.start_timeout)
            m = POOL_RE.search(server.log())
            entry = {"command": " ".join(shlex.quote(c) for c in server.cmd), "startup_s": round(startup, 1),
                     "log": str(server.log_path), "pool_tokens_reported": int(m.group(1)) if m else None,
                     "levels": {}}
            result["systems"][system] = entry
            run_batch(server.url, prompts[:1], {**sampling(args), "max_new_tokens": 4})  # warm-up
            for n in args.levels:
                print(f"[throughput] {system}: {n} requests x {args.output_len} tokens", flush=True)
                res = run_level(server, prompts[:n], sampling(args))
                entry["levels"][str(n)] = res
                print(f"[throughput] {system} @ {n}: {res['output_tok_s']} tok/s, running max "
                      f"{res['max_running_requests']} mean {res['mean_running_requests']}, retractions "
                      f"{res['retractions_meta_info']}, peak KV {res['peak_kv_tokens']}", flush=True)
            if system == "sglang-vase" and oc > 0:
                print(f"[throughput] eviction overhead at {oc} requests", flush=True)
                try:
                    entry["overhead"] = oh = run_overhead(server, args, prompts[:oc], no_evict_budget)
                    print(f"[throughput] eviction vs none at {oc} requests: step time x{oh['step_time_ratio_mean']} "
                          f"(mean) x{oh['step_time_ratio_p50']} (p50), tok/s x{oh['tok_s_ratio_evict_vs_none']}",
                          flush=True)
                except Exception as e:  # noqa: BLE001 -- keep the levels' results; the error is reported
                    entry["overhead"] = {"error": f"{type(e).__name__}: {e}"}
                    print(f"[throughput] overhead run failed: {e}", flush=True)
        finally:
            server.stop()

    if set(SYSTEMS) <= set(result["systems"]):
        base, vase = (result["systems"][s]["levels"] for s in SYSTEMS)
        result["ratio_vase_vs_sglang_tok_s"] = {
            n: _r(vase[n]["output_tok_s"] / base[n]["output_tok_s"]) if base[n]["output_tok_s"] else None
            for n in base}
        print(f"[throughput] sglang-vase / sglang output tok/s: {result['ratio_vase_vs_sglang_tok_s']}", flush=True)
    result["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["runtime_s"] = round(time.time() - t_start, 1)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result["plots"] = plot(result, args.out)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"[throughput] wrote {args.out} ({result['runtime_s']} s)", flush=True)
    return result


# ---------------------------------------------------------------------------------------- plots


def plot(result: dict, out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    title = (f"{Path(s['model_path']).name}, {s['output_len']} output tokens, pool {s['pool_tokens']} tokens, "
             f"B={s['budget']} R={s['window']}")
    paths = {}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for system, entry in result["systems"].items():
        levels = sorted(entry["levels"], key=int)
        ax.plot([int(n) for n in levels], [entry["levels"][n]["output_tok_s"] for n in levels], "o-", label=system)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=8)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths["concurrency"] = str(out.with_name(f"{out.stem}_concurrency.png"))
    fig.savefig(paths["concurrency"], dpi=120)
    plt.close(fig)

    top = str(max(s["concurrency_levels"]))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6.4, 5.6), sharex=True)
    for system, entry in result["systems"].items():
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
    ax1.legend()
    for a in (ax1, ax2):
        a.grid(alpha=0.3)
    fig.tight_layout()
    paths["kv_usage"] = str(out.with_name(f"{out.stem}_kv_usage.png"))
    fig.savefig(paths["kv_usage"], dpi=120)
    plt.close(fig)
    return paths


if __name__ == "__main__":
    main()
