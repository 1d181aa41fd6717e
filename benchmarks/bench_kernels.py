"""Time one eviction's kernels (scoring + compaction over all layers) against the torch references.

Shapes are Qwen3-4B (36 layers, 32 q / 8 kv heads, D 128) and Qwen3-14B (40 layers, 40 q / 8 kv
heads, D 128) at budgets B = 1024, 2048, 4096 and window R = 64: at an eviction a request holds
n = B + R slots, N = B candidates are scored and K = B - R kept. Each layer has its own buffers in a
pool larger than the batch, so slot ids are scattered and nothing stays in L2 between layers.

Bandwidth: ``bytes_min`` is the traffic an eviction cannot avoid (scoring: read candidate K and V
once, the queries, write the scores; compaction: read and write the kept K and V rows);
``bytes_issued`` is what these kernels move (scoring reads K twice for its two-pass softmax;
compaction goes through a temporary). GB/s are bytes_min / time, compared with the device's
measured copy bandwidth (bytes read + written).

On CPU only the torch references are timed, on small shapes: the Triton interpreter is a
correctness tool, and its timings mean nothing.

    python benchmarks/bench_kernels.py [--quick] [--out benchmarks/results/bench_kernels.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import triton

from sglang_vase.kernels import compact_, compact_reference_, score_candidates, score_candidates_reference

MODELS = {
    "Qwen3-4B": dict(layers=36, h_q=32, h_kv=8, d=128),
    "Qwen3-14B": dict(layers=40, h_q=40, h_kv=8, d=128),
}
WINDOW = 64
NOMINAL_COPY_TBPS = {"H100": 3.0, "H200": 4.3}  # SGLANG_NOTES.md, for comparison with the measured value
DTYPE = torch.bfloat16
CPU_NOTE = "CPU: only the torch references are timed; the Triton interpreter is not a timing target"


def timer(device: torch.device):
    """Median wall time in ms of ``fn`` over ``reps`` runs after ``warmup``."""

    def run(fn, reps: int, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return run


def copy_bandwidth_gbps(device: torch.device, run) -> float:
    """Device-to-device copy rate, counting bytes read and written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = run(lambda: dst.copy_(src), reps=10, warmup=3)
    return 2 * src.numel() / ms / 1e6


def make_case(model: dict, budget: int, bq: int, device: torch.device, seed: int = 0):
    """Per-layer K/V pools, the batch's slot ids, per-layer query views and one keep set."""
    g = torch.Generator(device=device).manual_seed(seed)
    n, h_kv, d, layers = budget, model["h_kv"], model["d"], model["layers"]
    pool = (bq * (budget + WINDOW) * 5) // 4
    kv = [
        (torch.randn(pool, h_kv, d, generator=g, device=device, dtype=DTYPE),
         torch.randn(pool, h_kv, d, generator=g, device=device, dtype=DTYPE))
        for _ in range(layers)
    ]
    table = torch.randperm(pool, generator=g, device=device)[: bq * (n + WINDOW)].view(bq, n + WINDOW)
    slots = table.to(torch.int32)[:, :n]  # candidates: a strided view, like req_to_token[rows, :n-R]
    ring = torch.randn(bq, layers, WINDOW, model["h_q"], d, generator=g, device=device, dtype=DTYPE)
    keep = torch.rand(bq, h_kv, n, generator=g, device=device).argsort(dim=-1)[..., : budget - WINDOW]
    return kv, slots, ring, keep


def traffic(model: dict, budget: int, bq: int) -> dict:
    elt = DTYPE.itemsize
    n, k, h_kv, d = budget, budget - WINDOW, model["h_kv"], model["d"]
    rows = bq * h_kv * n * d * elt  # one of K or V over all candidates
    queries = bq * WINDOW * model["h_q"] * d * elt
    scores = bq * h_kv * n * 4  # one fp32 output
    kept = bq * h_kv * k * d * elt  # one of K or V over the kept rows
    per_layer = {
        "score_min": 2 * rows + queries + bq * n * 4 + 2 * scores,
        # pass 1 and 2 both read K and the queries; smoothing rereads and rewrites the raw score
        "score_issued": 3 * rows + 2 * queries + 2 * bq * n * 4 + 4 * scores,
        "compact_min": 2 * 2 * kept + bq * h_kv * k * 8,
        "compact_issued": 2 * 4 * kept + bq * h_kv * k * (8 + 2 * 4),
    }
    return {key: v * model["layers"] for key, v in per_layer.items()}


def parity(kv, slots, ring, keep) -> dict:
    """Largest kernel-vs-reference differences on layer 0, so timings are of correct code."""
    k_buf, v_buf = kv[0]
    attn, vrange = score_candidates(k_buf, v_buf, slots, ring[:, 0])
    ref_attn, ref_vrange = score_candidates_reference(k_buf, v_buf, slots, ring[:, 0])
    k1, v1, k2, v2 = k_buf.clone(), v_buf.clone(), k_buf.clone(), v_buf.clone()
    compact_(k1, v1, slots, keep)
    compact_reference_(k2, v2, slots, keep)
    return {
        "attn_max_abs_err": (attn - ref_attn).abs().max().item(),
        "attn_max": ref_attn.abs().max().item(),
        "vrange_equal": torch.equal(vrange, ref_vrange),
        "compaction_equal": torch.equal(k1, k2) and torch.equal(v1, v2),
    }


def bench_case(name, model, budget, bq, device, run, reps, kernels: bool) -> dict:
    kv, slots, ring, keep = make_case(model, budget, bq, device)

    def all_layers(score_fn, compact_fn):
        return (
            lambda: [score_fn(k, v, slots, ring[:, i]) for i, (k, v) in enumerate(kv)],
            lambda: [compact_fn(k, v, slots, keep) for k, v in kv],
        )

    row = dict(model=name, budget=budget, window=WINDOW, batch=bq, candidates=budget, kept=budget - WINDOW,
               **model, **traffic(model, budget, bq))
    ref_score, ref_compact = all_layers(score_candidates_reference, compact_reference_)
    row["ref_score_ms"] = run(ref_score, reps, warmup=1)
    row["ref_compact_ms"] = run(ref_compact, reps, warmup=1)
    if kernels:
        row.update(parity(kv, slots, ring, keep))
        score, compact = all_layers(score_candidates, compact_)
        row["score_ms"] = run(score, reps, warmup=3)
        row["compact_ms"] = run(compact, reps, warmup=3)
    del kv, ring
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_kernels.json"))
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    run = timer(device)
    if cuda:
        models = {"Qwen3-14B": MODELS["Qwen3-14B"]} if args.quick else MODELS
        budgets = [4096] if args.quick else [1024, 2048, 4096]
        batches = [1] if args.quick else [1, 16]
        reps = 5 if args.quick else 20
    else:
        # Head layout of Qwen3-4B with a few layers: enough to time the references, small for CPU.
        models = {"Qwen3-4B (4 layers)": dict(MODELS["Qwen3-4B"], layers=4)}
        budgets = [1024] if args.quick else [1024, 2048]
        batches = [1]
        reps = 3

    dev_name = torch.cuda.get_device_name() if cuda else "cpu"
    copy_gbps = copy_bandwidth_gbps(device, run) if cuda else None
    result = {
        "device": dev_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": str(DTYPE),
        "quick": args.quick,
        "copy_bandwidth_gbps": copy_gbps,
        "nominal_copy_tbps": next((v for k, v in NOMINAL_COPY_TBPS.items() if k in dev_name), None),
        "kernels_timed": cuda,
        "note": None if cuda else CPU_NOTE,
        "rows": [],
    }
    if result["note"]:
        print(result["note"])
    print(f"device: {dev_name}  torch {torch.__version__}  triton {triton.__version__}"
          + (f"  copy {copy_gbps:.0f} GB/s" if cuda else ""))

    print(f"{'model':<20} {'B':>5} {'Bq':>3} {'op':<8} {'ref ms':>9} "
          f"{'kernel ms':>9} {'speedup':>7} {'GB/s':>7} {'of copy':>7}")
    for name, model in models.items():
        for budget in budgets:
            for bq in batches:
                row = bench_case(name, model, budget, bq, device, run, reps, kernels=cuda)
                result["rows"].append(row)
                for op in ("score", "compact"):
                    line = f"{name:<20} {budget:>5} {bq:>3} {op:<8} {row[f'ref_{op}_ms']:>9.3f}"
                    if cuda:
                        ms = row[f"{op}_ms"]
                        gbps = row[f"{op}_min"] / ms / 1e6
                        row[f"{op}_gbps"] = gbps
                        row[f"{op}_fraction_of_copy"] = gbps / copy_gbps
                        line += (f" {ms:>9.3f} {row[f'ref_{op}_ms'] / ms:>6.1f}x {gbps:>7.0f} "
                                 f"{gbps / copy_gbps:>7.1%}")
                    print(line)
                if cuda:
                    print(f"{'':<20} parity: attn max abs err {row['attn_max_abs_err']:.2e} "
                          f"(max {row['attn_max']:.2e}), "
                          f"vrange equal {row['vrange_equal']}, compaction equal {row['compaction_equal']}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
