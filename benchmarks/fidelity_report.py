"""The results of benchmarks/fidelity.py: per-cell aggregation over prompts and seeds, the markdown
tables, the adaptive policy's verdict and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

from fidelity_configs import FULL


def mean_known(xs):
    """The mean of the values that are not None (None if there are none)."""
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def std_known(xs):
    """The sample std (ddof=1) of the values that are not None (None if fewer than two)."""
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
            per_seed[seed] = {k: mean_known([r[k] for r in runs]) for k in REPLAY_KEYS}
            per_seed[seed]["kl_before_max"] = max(r["kl_before_max"] for r in runs)
            per_seed[seed]["evictions"] = mean_known([r["evictions"] for r in runs])
        for seed, outs in cell["engine"].items():
            d = per_seed.setdefault(seed, {})
            d["repetition_rate"] = mean_known([float(o["loop"]) for o in outs])
            d["tail_loop_rate"] = mean_known([float(o["tail_loop"]) for o in outs])
            d["distinct4"] = mean_known([o["distinct4"] for o in outs])
            d["engine_evictions"] = mean_known([o["evictions"] for o in outs])
        for k in REPLAY_KEYS + ENGINE_KEYS:
            vals = [d.get(k) for d in per_seed.values()]
            row[k] = mean_known(vals)
            row[f"{k}_std"] = std_known(vals)
        row["replay_seeds"] = sorted(cell["replay"])
        row["engine_seeds"] = sorted(cell["engine"])
        row["kl_before_max"] = max((d.get("kl_before_max", 0.0) for d in per_seed.values()), default=None)
        row["evictions"] = mean_known([d.get("evictions") for d in per_seed.values()])
        row["engine_evictions"] = mean_known([d.get("engine_evictions") for d in per_seed.values()])
        row["per_seed"] = {str(s): d for s, d in sorted(per_seed.items())}
        rows.append(row)
    return rows


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


def render_only(out: Path) -> dict:
    """``--render``: rebuild the tables, the verdict and the plots of a results file without a run."""
    result = json.loads(out.read_text())
    render(result, out)
    return result


def plot(rows: list[dict], vrange: list[dict], out: Path) -> list[str]:
    """The PNGs next to ``out``: one per metric over compression (the repetition rate only with the
    engine part) and the value ranges per layer; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = [("kl", "kl_after", "KL(full ‖ evicted), rows after the first eviction", True),
             ("top1", "top1_after", "top-1 agreement with the full cache", False),
             ("nll", "nll_increase_after", "NLL increase (nats/token)", True)]
    if any(r.get("repetition_rate") is not None for r in rows):
        specs.append(("repetition", "repetition_rate", "free-generation repetition rate (20-gram x3)", False))
    paths = [plot_metric(plt, rows, out, *spec) for spec in specs]
    if vrange:
        paths.append(plot_value_ranges(plt, vrange, out))
    return paths


def plot_metric(plt, rows: list[dict], out: Path, suffix: str, key: str, ylabel: str, logy: bool) -> str:
    """``<stem>_<suffix>.png``: ``key`` over compression, per policy (mean ± std over seeds), one
    panel per kept order."""
    orders = sorted({r["order"] for r in rows if r["policy"] != FULL})
    policies = sorted({r["policy"] for r in rows if r["policy"] != FULL})
    colors = [plt.get_cmap("tab20")(i) for i in range(20)]
    markers = "os^vD<>pPX*h"
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
    return str(path)


def plot_value_ranges(plt, vrange: list[dict], out: Path) -> str:
    """``<stem>_vrange.png``: max / median and p99 / median of the value range per layer."""
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
    return str(path)
