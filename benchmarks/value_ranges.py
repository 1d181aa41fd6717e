"""Value ranges of a model's KV cache on the MATH-500 solutions it writes: does it have the abnormal
value outliers VaSE builds on (VASE_SPEC: a few tokens whose value vectors span far more than the
others'), and which tokens carry them?

1. Greedy solutions: plain SGLang serves ``--model-path`` (a folder or a named model) and answers the
   first ``--prompts`` problems of math.jsonl whose chat prompt fits (fidelity.py's prompts and
   prompt format), ``--max-new-tokens`` each, all at once.
2. One fp32 forward of each prompt + solution through the Hugging Face model, keeping every
   layer's values (``v_proj``'s output, per KV head; values carry no RoPE).
3. Per layer and KV head, the value range max_d V - min_d V of every token:
   - fidelity.py's distribution statistics over the tokens past the first N_SINK: max/median,
     p99/median, robust z of the maximum, the share above tau x median;
   - which tokens carry the largest ranges: each token gets one class (``sink``: the first N_SINK
     positions; ``newline``: its text holds a newline; ``punctuation``: only punctuation, spaces or
     math symbols; ``digit``; ``word``); per class, its share of all tokens and of the top 1% of
     ranges of each (layer, head), and their ratio (``lift``: 1 = no preference).

Writes ``--out`` (default benchmarks/results/value_ranges_<model>.json) and ``<stem>.png`` (the
statistics per layer, mean and max over heads and prompts), and prints a table.

    python benchmarks/value_ranges.py --model-path qwen2.5-coder-1.5b [--prompts 8] [--max-new-tokens 512]
"""

from __future__ import annotations

import argparse
import json
import string
import time
from collections import Counter
from pathlib import Path

import torch

import fidelity_configs
import fidelity_replay
import fidelity_report
from common import DATA_DIR, RESULTS_DIR, machine_info
from sglang_vase.models import resolve_model
from sglang_vase.serving import Server

TOP_SHARE = 0.01  # "the largest ranges": the top 1% of one (layer, head)'s tokens
CLASSES = ("sink", "newline", "punctuation", "digit", "word")
_SYMBOLS = set(string.punctuation) | set(" \t") | set("×÷−±≤≥≠√π∞")


def token_class(text: str, position: int) -> str:
    if position < fidelity_replay.N_SINK:
        return "sink"
    if "\n" in text:
        return "newline"
    if text and all(c in _SYMBOLS for c in text):
        return "punctuation"
    if any(c.isdigit() for c in text) and not any(c.isalpha() for c in text):
        return "digit"
    return "word"


def values_per_layer(model, ids: list[int]) -> list[torch.Tensor]:
    """``[H_kv, N, D]`` values of every layer for one forward over ``ids``."""
    config = model.config
    h_kv = config.num_key_value_heads
    out, hooks = [], []
    for layer in model.model.layers:
        hooks.append(layer.self_attn.v_proj.register_forward_hook(
            lambda module, args, v: out.append(v[0].detach().view(v.shape[1], h_kv, -1).transpose(0, 1).float())))
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return out


def top_token_classes(values: list[torch.Tensor], classes: list[str]) -> dict:
    """Per class: tokens of the class among all, and among the top TOP_SHARE ranges of each (layer, head)."""
    n = len(classes)
    k = max(1, round(TOP_SHARE * n))
    top = Counter()
    for v in values:
        ranges = v.amax(-1) - v.amin(-1)  # [H_kv, N]
        for head in ranges:
            top.update(classes[i] for i in head.topk(k).indices.tolist())
    return {"all": Counter(classes), "top": top, "top_total": k * len(values) * values[0].shape[0]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default="qwen2.5-coder-1.5b", help="model folder or named model")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-prompt-tokens", type=int, default=192)
    p.add_argument("--data-dir", default=str(DATA_DIR))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    folder = resolve_model(args.model_path, verbose=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = fidelity_configs.load_prompts(tokenizer, Path(args.data_dir), "math", args.prompts,
                                            args.max_prompt_tokens)
    server = Server(["--model-path", folder, "--max-running-requests", str(len(prompts))], vase=False)
    try:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(lambda pr: server.generate(None, max_new_tokens=args.max_new_tokens,
                                                               input_ids=pr["input_ids"], timeout=7200), prompts))
    finally:
        server.stop()
    t_generate = time.time() - t0

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    per_prompt, all_classes, top_classes, top_total = [], Counter(), Counter(), 0
    for prompt, answer in zip(prompts, answers):
        ids = prompt["input_ids"] + answer["output_ids"]
        values = values_per_layer(model, ids)
        per_prompt.append([fidelity_replay.value_range_stats(v) for v in values])
        classes = [token_class(tokenizer.decode([t]), i) for i, t in enumerate(ids)]
        counts = top_token_classes(values, classes)
        all_classes.update(counts["all"])
        top_classes.update(counts["top"])
        top_total += counts["top_total"]
    tokens = sum(all_classes.values())
    attribution = {c: {"share_of_tokens": all_classes[c] / tokens, "share_of_top": top_classes[c] / top_total,
                       "lift": (top_classes[c] / top_total) / (all_classes[c] / tokens) if all_classes[c] else None}
                   for c in CLASSES}
    layers = fidelity_report.aggregate_vrange(per_prompt)
    config = model.config
    result = {
        "benchmark": "value_ranges", "model": args.model_path, "folder": folder,
        "architecture": {"layers": config.num_hidden_layers, "kv_heads": config.num_key_value_heads,
                         "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads},
        "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
        "tokens": tokens, "output_tokens": [len(a["output_ids"]) for a in answers],
        "n_sink": fidelity_replay.N_SINK, "top_share": TOP_SHARE, "token_classes": attribution, "layers": layers,
        "summary": {key: {"mean_over_layers": sum(l[key]["mean"] for l in layers) / len(layers),
                          "max": max(l[key]["max"] for l in layers)}
                    for key in ("max_over_median", "p99_over_median", "share_above_4x")},
        "seconds": {"generate": round(t_generate, 1), "total": round(time.time() - t0, 1)},
        "machine": machine_info(),
    }
    name = Path(args.model_path).name
    out = Path(args.out or RESULTS_DIR / f"value_ranges_{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(fidelity_report.value_range_table(layers))
    print("\n| class | share of tokens | share of the top 1% ranges | lift |\n|---|---|---|---|")
    for c, a in attribution.items():
        print(f"| {c} | {a['share_of_tokens']:.3f} | {a['share_of_top']:.3f} | "
              f"{a['lift']:.1f} |" if a["lift"] is not None else f"| {c} | 0 | 0 | - |")
    print(f"wrote {out}")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    x = [l["layer"] for l in layers]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("max_over_median", "p99_over_median", "share_above_2x"),
                              ("max / median range", "p99 / median range", "share of tokens above 2x median")):
        ax.plot(x, [l[key]["mean"] for l in layers], marker="o", label="mean over heads and prompts")
        ax.plot(x, [l[key]["max"] for l in layers], marker="x", label="max")
        ax.set_xlabel("layer")
        ax.set_title(title)
        if key != "share_above_2x":
            ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle(f"Value ranges of {result['model']} on {result['prompts']} MATH-500 solutions "
                 f"({result['tokens']} tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
