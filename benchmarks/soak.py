"""Soak test: many seeded, mixed requests from concurrent clients against one sglang-vase server
with SGLang's strict memory checks on and forced retractions.

    python benchmarks/soak.py                          # 1,000 requests -> benchmarks/results/soak.json
    python benchmarks/soak.py --requests 150 --out /tmp/soak.json

The mix (drawn from ``--seed``): random valid policy / budget / window / n_large / seed / keep_prompt /
mode (a quarter in pressure mode);
about 10% invalid requests (every 400 case the server promises, in turn); n > 1; logprobs; stop
strings; regex constraints; prompts longer than the budget; prompts behind a shared prefix (radix
cache hits); eviction-disabled requests; client aborts (a client timeout mid-generation). The server
runs with SGLang's defaults (radix cache, overlap scheduler). SGLANG_TEST_RETRACT retracts the running batch every
``--retract-interval`` steps.

The report says: server deaths, a 4xx naming the field for every invalid request, every valid
request complete (its length, its constraint, its logprobs) with peak KV <= its bound, KV slots in
use back to 0 when idle, retractions and evictions. ``ok`` is true only if all of that holds; the
exit status is 1 otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import platform
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sglang_vase.engine.geometry import Geometry
from sglang_vase.policies import POLICIES, policy_params
from sglang_vase.serving import Server

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "soak.json"
SERVER_BUDGET, SERVER_WINDOW = 64, 16
BUDGETS = (32, 48, 64, 96, 128)
WINDOWS = (8, 16)
PROMPTS = (
    "Question: what is 17 * 23? Think step by step.\nAnswer:",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "List the first ten prime numbers and explain how you found them.",
    "Explain, step by step, why the sum of two odd numbers is even.",
    "Translate to French: The weather is nice today and we are going to the beach.",
)
SHARED_PREFIX = ("System: you are a careful assistant. Answer in full sentences, show your reasoning and "
                 "check every number you use before you give the final answer.\n") * 4
LONG_TEXT = ("The history of mathematics spans many cultures, from Babylonian tablets to Greek proofs, "
             "Indian numerals, Islamic algebra and the calculus of Newton and Leibniz. ")
REGEX = r"(yes|no)"

# Every request the server must answer with a 400, and the text the answer must contain.
INVALID = (
    ({"custom_params": {"vase": {"policy": "evict-large-v", "budget": 64, "window": 16, "n_large": 17}}},
     {}, "n_large"),
    ({"custom_params": "vase"}, {}, "custom_params"),
    ({"custom_params": {"vase": "on"}}, {}, "custom_params.vase"),
    ({"beam_width": 2}, {}, "beam_width"),
    ({}, {"custom_params": {"vase": {"budget": 32}}}, "sampling_params.custom_params"),
    ({"custom_params": {"vase": {"policy": "no-such-policy"}}}, {}, "policy"),
    ({"custom_params": {"vase": {"budget": 40, "window": 16}}}, {}, "multiple"),
    ({"custom_params": {"vase": {"budget": 16, "window": 16}}}, {}, "budget"),
    ({"custom_params": {"vase": {"window": 32}}}, {}, "window"),
    ({"custom_params": {"vase": {"seed": -1}}}, {}, "seed"),
    ({"custom_params": {"vase": {"budget": "64"}}}, {}, "budget"),
    ({"custom_params": {"vase": {"policy": "snapkv", "n_large": 4}}}, {}, "n_large"),
    ({"custom_params": {"vase": {"colour": "blue"}}}, {}, "colour"),
    ({"custom_params": {"vase": {"policy": "vase", "budget": 64, "window": 16, "n_large": 49}}}, {}, "n_large"),
)


@dataclass
class Case:
    """One request and what its answer must satisfy."""

    index: int
    kind: str  # "valid", "invalid" or "abort"
    body: dict
    expect_field: str | None = None  # invalid: the text the 400 must contain
    timeout: float = 900
    budget: int = SERVER_BUDGET
    window: int = SERVER_WINDOW
    features: list[str] = field(default_factory=list)

    @property
    def keep_prompt(self) -> bool:
        return "keep_prompt" in self.features


def _vase_params(rng: random.Random) -> dict:
    policy = rng.choice(sorted(POLICIES))
    window = rng.choice(WINDOWS)
    budget = rng.choice([b for b in BUDGETS if b > window and b % window == 0])
    vase = {"policy": policy, "budget": budget, "window": window}
    if "n_large" in policy_params(POLICIES[policy]) and rng.random() < 0.5:
        vase["n_large"] = rng.randint(0, window if policy == "evict-large-v" else budget - window)
    if rng.random() < 0.5:
        vase["seed"] = rng.randrange(2**31)
    if rng.random() < 0.2:
        vase["keep_prompt"] = True
    if rng.random() < 0.25:
        vase["mode"] = "pressure"
    return vase


def make_case(index: int, rng: random.Random, invalid_share: float, abort_share: float,
              max_new_tokens: int) -> Case:
    text = rng.choice(PROMPTS) + f" (#{index})"
    sampling = {"max_new_tokens": rng.randint(8, max_new_tokens), "temperature": rng.choice([0.0, 0.7, 1.0])}
    r = rng.random()
    if r < invalid_share:
        extra_sampling, extra_body, expect = INVALID[index % len(INVALID)]
        body = {"text": text, "sampling_params": {**sampling, **extra_sampling}, **extra_body}
        return Case(index, "invalid", body, expect_field=expect, features=["invalid"])
    features: list[str] = []
    body: dict = {"text": text, "sampling_params": sampling}
    if rng.random() < 0.1:
        body["sampling_params"]["custom_params"] = {"vase": False}
        budget, window = SERVER_BUDGET, SERVER_WINDOW
        features.append("disabled")
    else:
        vase = _vase_params(rng)
        body["sampling_params"]["custom_params"] = {"vase": vase}
        budget, window = vase["budget"], vase["window"]
        if vase.get("keep_prompt"):
            features.append("keep_prompt")
        if vase.get("mode") == "pressure":
            features.append("pressure")
    u = rng.random()
    if u < 0.12:
        body["text"] = LONG_TEXT * rng.randint(6, 12) + text  # ~170-340 tokens: longer than most budgets
        features.append("long_prompt")
    elif u < 0.3:
        body["text"] = SHARED_PREFIX + text  # read from the radix tree by every request after the first
        features.append("shared_prefix")
    if r < invalid_share + abort_share:
        body["sampling_params"].update(max_new_tokens=400, ignore_eos=True)
        return Case(index, "abort", body, timeout=rng.uniform(0.5, 4.0), budget=budget, window=window,
                    features=features + ["abort"])
    u = rng.random()
    if u < 0.15:
        body["sampling_params"]["n"] = rng.randint(2, 4)
        features.append("n>1")
    elif u < 0.25:
        body["sampling_params"]["stop"] = [".", "\n"]
        features.append("stop")
    elif u < 0.32:
        body["sampling_params"].update(regex=REGEX, max_new_tokens=16)
        body["text"] += " Answer yes or no:"
        features.append("regex")
    elif u < 0.60:
        body["sampling_params"]["ignore_eos"] = True
        features.append("ignore_eos")
    if rng.random() < 0.15:
        body.update(return_logprob=True, top_logprobs_num=2)
        features.append("logprobs")
    return Case(index, "valid", body, budget=budget, window=window, features=features)


def check_valid(case: Case, outputs: list[dict]) -> list[str]:
    """What is wrong with a valid request's answer (empty when nothing is)."""
    sp = case.body["sampling_params"]
    problems = []
    if len(outputs) != sp.get("n", 1):
        problems.append(f"{len(outputs)} outputs for n={sp.get('n', 1)}")
    for out in outputs:
        meta = out["meta_info"]
        done, prompt = meta["completion_tokens"], meta["prompt_tokens"]
        reason = (meta.get("finish_reason") or {}).get("type")
        if reason not in ("length", "stop"):
            problems.append(f"finish_reason {meta.get('finish_reason')}")
        if done > sp["max_new_tokens"] or (sp.get("ignore_eos") and done != sp["max_new_tokens"]):
            problems.append(f"{done} tokens for max_new_tokens={sp['max_new_tokens']}")
        if "regex" in sp and reason == "stop" and not re.fullmatch(REGEX, out["text"].strip()):
            problems.append(f"regex output {out['text']!r}")
        if "stop" in sp and any(s in out["text"] for s in sp["stop"]):
            problems.append(f"stop string in output {out['text'][-40:]!r}")
        if case.body.get("return_logprob") and len(meta.get("output_token_logprobs") or []) != done:
            problems.append("output_token_logprobs do not cover the output")
        stats = meta.get("vase")
        if "disabled" in case.features:
            if stats and stats.get("evictions"):
                problems.append(f"eviction-disabled request evicted: {stats}")
            continue
        if stats is None:
            problems.append("no vase stats")
            continue
        retracted = bool(meta.get("num_retractions"))
        kept_prompt = prompt if case.keep_prompt else 0
        geometry = Geometry(case.budget, case.window, kept_prompt)
        if "pressure" in case.features:
            # Its evictions depend on the load: every one forced (none on the static triggers), never
            # more KV than the full cache, and none at all unless it grew past q + B.
            if stats["forced_evictions"] != stats["evictions"]:
                problems.append(f"{stats['evictions']} evictions, {stats['forced_evictions']} of them forced")
            if stats["peak_kv_len"] > prompt + done:
                problems.append(f"peak KV {stats['peak_kv_len']} > the full cache's {prompt + done}")
            if stats["evictions"] and prompt + done <= geometry.evicted_length:
                problems.append(f"{stats['evictions']} evictions of a request never past q + B")
            continue
        expected = geometry.evictions_in(prompt, done)
        if not retracted and stats["evictions"] != expected:
            problems.append(f"{stats['evictions']} evictions, expected {expected} (prompt {prompt}, output {done})")
        # A retracted request is re-prefilled whole (prompt + what it had generated): its bound
        # restarts from that length.
        longest_prefill = prompt + (done if retracted else 0)
        bound = geometry.slot_bound(longest_prefill)
        if stats["peak_kv_len"] > bound:
            problems.append(f"peak KV {stats['peak_kv_len']} > bound {bound}")
    return problems


def run_case(server: Server, case: Case) -> dict:
    import requests

    rec = {"index": case.index, "kind": case.kind, "features": case.features}
    t0 = time.time()
    try:
        r = requests.post(f"{server.url}/generate", json=case.body, timeout=case.timeout)
    except requests.Timeout:
        rec.update(status="client-timeout", ok=case.kind == "abort")
        if not rec["ok"]:
            rec["problems"] = ["client timeout"]
        return rec
    except requests.RequestException as e:
        rec.update(status="connection-error", ok=False, problems=[repr(e)])
        return rec
    rec.update(status=r.status_code, seconds=round(time.time() - t0, 2))
    if case.kind == "invalid":
        rec["ok"] = 400 <= r.status_code < 500 and case.expect_field in r.text
        if not rec["ok"]:
            rec["problems"] = [f"expected a 4xx naming {case.expect_field!r}, got {r.status_code}: {r.text[:300]}"]
        return rec
    if r.status_code != 200:
        rec.update(ok=False, problems=[r.text[:500]])
        return rec
    data = r.json()
    outputs = data if isinstance(data, list) else [data]
    problems = check_valid(case, outputs) if case.kind == "valid" else []
    metas = [o["meta_info"] for o in outputs]
    rec.update(ok=not problems, completion_tokens=sum(m["completion_tokens"] for m in metas),
               retractions=sum(m.get("num_retractions") or 0 for m in metas),
               evictions=sum((m.get("vase") or {}).get("evictions", 0) for m in metas))
    if problems:
        rec["problems"] = problems
    return rec


def wait_idle_used_tokens(server: Server, timeout: float = 120) -> float:
    """KV slots in use once the server is idle (aborted requests may still be draining)."""
    deadline = time.time() + timeout
    used = server.used_tokens()
    while used != 0 and time.time() < deadline:
        time.sleep(2)
        used = server.used_tokens()
    return used


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=12, help="concurrent client threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--invalid-share", type=float, default=0.10)
    ap.add_argument("--abort-share", type=float, default=0.04)
    ap.add_argument("--max-new-tokens", type=int, default=96, help="output lengths are drawn from 8..this")
    ap.add_argument("--retract-interval", type=int, default=60, help="forced retraction every N scheduler steps")
    ap.add_argument("--max-total-tokens", type=int, default=6144)
    ap.add_argument("--max-running-requests", type=int, default=16)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    cases = [make_case(i, rng, args.invalid_share, args.abort_share, args.max_new_tokens) for i in range(args.requests)]
    flags = ["--max-total-tokens", str(args.max_total_tokens), "--max-running-requests",
             str(args.max_running_requests), "--enable-metrics", "--vase-budget", str(SERVER_BUDGET),
             "--vase-window", str(SERVER_WINDOW), "--random-seed", str(args.seed)]
    env = {"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": str(args.retract_interval)}
    t0 = time.time()
    server = Server(flags, env=env, strict_memory=True, timeout=600)
    records: list[dict] = []
    try:
        with cf.ThreadPoolExecutor(args.clients) as pool:
            for i, rec in enumerate(pool.map(lambda c: run_case(server, c), cases), 1):
                records.append(rec)
                if not rec["ok"]:
                    print(f"[soak] wrong: {json.dumps(rec)}", flush=True)
                if i % 50 == 0 or i == len(cases):
                    bad = sum(not r["ok"] for r in records)
                    print(f"[soak] {i}/{len(cases)} answered, {bad} wrong, {time.time() - t0:.0f}s", flush=True)
        alive = server.alive()
        used_idle = wait_idle_used_tokens(server) if alive else None
        still_serving = alive and server.generate("ok?", max_new_tokens=4)["meta_info"]["completion_tokens"] > 0
        log = server.log()
    finally:
        server.stop()

    by_kind = {k: [r for r in records if r["kind"] == k] for k in ("valid", "invalid", "abort")}
    features = sorted({f for c in cases for f in c.features})
    report = {
        "command": " ".join(sys.argv) if argv is None else f"soak.py {' '.join(argv)}",
        "server_cmd": " ".join(server.cmd),
        "machine": platform.platform(),
        "seed": args.seed, "clients": args.clients, "max_new_tokens": args.max_new_tokens, "retract_interval": args.retract_interval,
        "requests": len(records), "seconds": round(time.time() - t0, 1),
        "server_deaths": 0 if alive else 1,
        "still_serving": still_serving,
        "used_tokens_idle": used_idle,
        "invalid": {"sent": len(by_kind["invalid"]), "answered_4xx_naming_field": sum(r["ok"] for r in by_kind["invalid"])},
        "valid": {"sent": len(by_kind["valid"]), "complete_within_bound": sum(r["ok"] for r in by_kind["valid"])},
        "aborts": {"sent": len(by_kind["abort"]), "client_timeouts": sum(r["status"] == "client-timeout"
                                                                        for r in by_kind["abort"])},
        "features": {f: sum(f in c.features for c in cases) for f in features},
        "retractions": sum(r.get("retractions", 0) for r in records),
        "retracted_in_log": sum(int(n) for n in re.findall(r"#retracted_reqs: (\d+)", log)),
        "evictions": sum(r.get("evictions", 0) for r in records),
        # pressure mode's depend on the load; the static requests' are each checked exactly above
        "static_evictions": sum(r.get("evictions", 0) for r in records if "pressure" not in r["features"]),
        "memory_check_failures": log.count("memory leak detected"),
        "failures": [r for r in records if not r["ok"]][:50],
    }
    report["ok"] = (report["server_deaths"] == 0 and still_serving and used_idle == 0
                    and report["memory_check_failures"] == 0 and not report["failures"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "failures"}, indent=2))
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
