"""``--update`` of benchmarks/fidelity.py: re-run some policies and replace only their rows in an
existing results file, once its settings and reference continuations are known to be this run's."""

from __future__ import annotations

import json
from pathlib import Path

from fidelity_configs import row_order

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
