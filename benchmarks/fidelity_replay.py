"""The teacher-forced replay of benchmarks/fidelity.py (part 1 of its docstring): the full cache's
greedy continuation of each prompt replayed under every config as the rows of one batched decoder,
the per-row metrics against the full cache, the value-range statistics of the full cache, and the
per-prompt file that lets an interrupted run resume."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from fidelity_configs import FULL, build_policy, first_affected_row, schedule_of
from fidelity_update import check_same_reference

# Thresholds (x median range) whose share of tokens the value-range statistics report.
VRANGE_TAUS = (2.0, 3.0, 4.0, 6.0, 8.0)
N_SINK = 4


def end_of_sequence_ids(tokenizer, model) -> list[int]:
    """The tokens that would end the answer: the tokenizer's and the generation config's EOS."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


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
    out): the value-range distribution statistics of fidelity.py's docstring, each a list over heads."""
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
        late, regrow = schedule_of(cfg["policy"]) if cfg["policy"] != FULL else (None, False)
        at = None if late is None else prompt["prompt_tokens"] + late
        rows.append(Row(policies.get(key), cfg["seed"], first_eviction_at=at, regrow=regrow))
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
            first, events = first_affected_row(prompt["prompt_tokens"], t, cfg["budget"], window,
                                               *schedule_of(cfg["policy"]))
        runs.append({**cfg, "prompt": prompt["index"], **summarize(kl[r], top1[r], nll[r], first),
                     "evictions": events})
    vrange = [value_range_stats(dec.cache(layer, row=0)[1]) for layer in range(dec.n_layers)]
    return runs, vrange, floor / max(1, t - 1)


def partial_path(out: Path) -> Path:
    """Where a run keeps each finished prompt's rows until it writes ``out`` (``replay_part``)."""
    return out.with_name(out.name + ".partial.jsonl")


def _same_settings(a: dict, b: dict) -> bool:
    """Equal configs, the policies' order aside (the rows are named by policy)."""
    return {**a, "policies": sorted(a.get("policies", []))} == {**b, "policies": sorted(b.get("policies", []))}


def _load_partial(path: Path, config: dict) -> dict[int, dict] | None:
    """The prompts an interrupted run of the same settings finished, by index; None when the file
    is missing or holds only another settings' header. A file holding finished prompts of other
    settings is refused, never overwritten: hours of replay are in it."""
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    saved = json.loads(lines[0]).get("config") if lines else None
    if saved is None or not _same_settings(saved, config):
        if len(lines) > 1:
            differ = sorted(k for k in set(saved or {}) | set(config) if (saved or {}).get(k) != config.get(k))
            raise SystemExit(f"{path} holds {len(lines) - 1} finished prompt(s) of other settings (differing: "
                             f"{differ}); resume with those settings, or move the file away to start over")
        return None
    done = {}
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the interruption
            break
        done[record["index"]] = record
    return done


def _append_record(path: Path, record: dict) -> None:
    """One finished prompt as one line in ONE write on an append-mode descriptor: shards of a run
    (``--shard``) append to the same file, and their lines must not interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def replay_part(args, model_path: str, prompts: list[dict], configs: list[dict], tokenizer, result: dict,
                t_start: float, previous: dict | None = None) -> tuple[list[dict], list[list]]:
    """Reference continuations and every teacher-forced replay, prompt by prompt, in this process
    (``previous``: the results an ``--update`` merges into; its references must be these). Each
    finished prompt is appended to ``partial_path(--out)``; a run with the same settings takes the
    prompts found there instead of computing them again (a long run resumes where it stopped).
    ``--shard K/N`` computes only the prompts at positions K, K + N, ... and takes the others from
    that file, written by the other shards; while any is missing there it stops (SystemExit) after
    its own, and the last shard to finish (or any later run) writes the results."""
    from sglang_vase.reference.replay import generate, load_model

    model = load_model(model_path, getattr(torch, args.dtype))
    suppress = end_of_sequence_ids(tokenizer, model)
    result["config"]["suppressed_token_ids"] = suppress
    timing = result.setdefault("timing", {"reference_seconds": 0.0, "replay_seconds": 0.0})
    partial = partial_path(Path(args.out))
    done = _load_partial(partial, result["config"])
    if done is None:
        partial.write_text(json.dumps({"config": result["config"]}) + "\n")
        done = {}
    shard, shards = getattr(args, "shard", (0, 1))
    per_prompt: dict[int, tuple[list[dict], list[dict]]] = {}

    def take(record: dict, rp: dict) -> None:
        rp.update(record["prompt"])
        per_prompt[record["index"]] = record["runs"], record["value_ranges"]
        timing["reference_seconds"] += rp["reference_seconds"]
        timing["replay_seconds"] += rp["replay_seconds"]
        print(f"[fidelity] prompt {record['index']}: taken from {partial}", flush=True)

    for position, (p, rp) in enumerate(zip(prompts, result["prompts"])):
        if p["index"] in done:
            take(done[p["index"]], rp)
            continue
        if position % shards != shard:
            continue  # another shard's: taken from the file below once it is there
        t0 = time.time()
        tokens, step_logits = generate(model, p["input_ids"], args.cont_len, suppress_token_ids=suppress,
                                       return_logits=True)
        t1 = time.time()
        rp["continuation_text"] = tokenizer.decode(tokens)
        if previous is not None:
            check_same_reference(previous, rp)
        prompt_runs, vrange, floor = replay_prompt(model, p, tokens, step_logits, configs, args.window)
        t2 = time.time()
        per_prompt[p["index"]] = prompt_runs, vrange
        rp.update(reference_seconds=t1 - t0, replay_seconds=t2 - t1, noise_floor_kl=floor)
        timing["reference_seconds"] += t1 - t0
        timing["replay_seconds"] += t2 - t1
        _append_record(partial, {"index": p["index"], "prompt": {k: v for k, v in rp.items() if k != "index"},
                                 "runs": prompt_runs, "value_ranges": vrange})
        print(f"[fidelity] prompt {p['index']}: reference {t1 - t0:.0f}s, {len(configs)} rows replayed in "
              f"{t2 - t1:.0f}s (elapsed {time.time() - t_start:.0f}s)", flush=True)

    missing = [(p, rp) for p, rp in zip(prompts, result["prompts"]) if p["index"] not in per_prompt]
    if missing:
        done = _load_partial(partial, result["config"]) or {}
        for p, rp in missing:
            if p["index"] in done:
                take(done[p["index"]], rp)
        waiting = [p["index"] for p, _ in missing if p["index"] not in done]
        if waiting:
            raise SystemExit(f"[fidelity] shard {shard}/{shards} finished its prompts; prompts {waiting} are other "
                             f"shards' and not in {partial} yet: the last shard to finish (or the same command "
                             f"run again) writes {args.out}")
    runs = [row for p in prompts for row in per_prompt[p["index"]][0]]
    vranges = [per_prompt[p["index"]][1] for p in prompts]
    timing["replay_rows"] = len(runs)
    return runs, vranges
