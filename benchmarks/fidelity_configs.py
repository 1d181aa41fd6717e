"""What a fidelity run (benchmarks/fidelity.py) measures: its prompts, the budget of each compression,
the policy specs, and the configs (policy x kept order x compression x seed) replayed on every prompt."""

from __future__ import annotations

import json
from pathlib import Path

from common import MATH_SUFFIX, chat_ids, problems

ORDERS = ("released", "sorted")
FULL = "full"
# ``name:late=L``: pressure mode's schedule, no eviction until L continuation tokens, one eviction
# there (to B), then the static schedule; ``name:regrow=L``: the same first eviction, then again each
# time it grows back to that length (pressure mode growing again after every forced eviction, under a
# steady shortage); ``name`` alone evicts gradually, every R tokens past B + R.
LATE, REGROW = "late", "regrow"


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


def first_affected_row(prompt_len: int, cont_len: int, budget: int, window: int,
                       late: int | None = None, regrow: bool = False) -> tuple[int, int]:
    """(first row computed after an eviction, evictions that affect a row), from the engine trigger.

    Row 0 comes from the prefill; row i >= 1 from the decode step of continuation token i-1, which
    appends it (physical length prompt + i), computes the logits, then evicts if that length
    triggers. The eviction after step i first affects row i + 1; one after the last row affects
    nothing and is not counted (the engine, whose request ends there, does not run it either):
    exactly the engine's ``Geometry.evictions_in``. With ``late`` L the first eviction is after
    step L, leaving B slots, and the triggers follow from there (with ``regrow``: every
    prompt + L - B steps, when it is back at its length after step L)."""
    from sglang_vase.engine.geometry import Geometry

    geometry = Geometry(budget, window)
    if late is not None:
        if prompt_len + late <= budget or late > cont_len - 2:
            raise ValueError(f"{REGROW if regrow else LATE}={late}: the eviction must fall past B={budget} "
                             f"(prompt {prompt_len} tokens) and before the last row ({cont_len} rows)")
        if regrow:
            return late + 1, 1 + (cont_len - 2 - late) // (prompt_len + late - budget)
        return late + 1, 1 + geometry.evictions_in(budget, cont_len - late)
    events = geometry.evictions_in(prompt_len, cont_len)
    return (geometry.next_trigger(prompt_len) - prompt_len + 1 if events else cont_len), events


def schedule_of(spec: str) -> tuple[int | None, bool]:
    """(L, regrow) of a ``name:late=L`` or ``name:regrow=L`` spec; (None, False): the static schedule."""
    params = parse_policy_spec(spec)[1]
    if LATE in params and REGROW in params:
        raise ValueError(f"policy {spec!r}: late and regrow exclude each other")
    regrow = REGROW in params
    late = params.get(REGROW if regrow else LATE)
    if late is not None and (isinstance(late, bool) or not isinstance(late, int) or late < 1):
        raise ValueError(f"policy {spec!r}: {REGROW if regrow else LATE} must be a positive number of "
                         f"continuation tokens")
    return late, regrow


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
    params.pop(LATE, None), params.pop(REGROW, None)  # the schedule, not policy parameters
    return get_policy(name, budget=budget, window=window, sort_kept=order == "sorted", **params)


def is_stochastic(spec: str) -> bool:
    from sglang_vase.policies import POLICIES

    return bool(POLICIES[parse_policy_spec(spec)[0]].stochastic)


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


def row_order(row: dict) -> tuple:
    """The order of replay and engine rows in the results file."""
    return row["policy"], row["order"], row["compression"], row["seed"], row["prompt"]
