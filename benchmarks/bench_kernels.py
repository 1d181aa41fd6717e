"""Time one eviction's kernels against the torch references, and count what one eviction round issues.

Kernels (default): shapes are Qwen3-4B (36 layers, 32 q / 8 kv heads, D 128) and Qwen3-14B (40 layers,
40 q / 8 kv heads, D 128) at budgets B = 1024, 2048, 4096 and window R = 64: at an eviction a request
holds n = B + R slots, N = B candidates are scored and K = B - R kept. Each layer has its own
buffers in a pool larger than the batch, so slot ids are scattered and nothing stays in L2 between
layers. The kernels cover every layer in one call; the references run layer by layer.

Bandwidth: ``bytes_min`` is the traffic an eviction cannot avoid (scoring: read candidate K and V
once, the queries, write the scores; compaction: read and write the kept K and V rows);
``bytes_issued`` is what these kernels move (scoring reads K twice for its two-pass softmax;
compaction goes through a scratch area). GB/s are bytes_min / time, compared with the device's
measured copy bandwidth (bytes read + written).

Rounds (``--rounds``): one whole eviction round (``engine.evictor.evict``: scoring, selection,
compaction, row rewrite) of 1, 8 and 32 requests at Qwen3-14B shapes and at the embedded model's
(SmolLM2-135M: 30 layers, 9 q / 3 kv heads, D 64), counted with the torch profiler:
- on CUDA, the kernels the device runs (launches, copies included), the host time to issue the
  round and the device time, at B = 4096 (14B) / 128 (SmolLM2), and how many Triton kernels get
  compiled by rounds of new lengths and batch sizes after the startup warm-up (none should);
- on CPU, at a small N (B = 128), the route a GPU takes (the Triton kernels under the interpreter:
  torch ops that run a kernel, i.e. the profiler's leaf ops that are not views or allocations, plus
  Triton launches; the interpreter's own work excluded) and the CPU route (the torch references:
  op count and CPU time per round).

On CPU only the torch references are timed, on small shapes: the Triton interpreter is a
correctness tool, and its timings mean nothing.

    python benchmarks/bench_kernels.py [--quick] [--out benchmarks/results/bench_kernels.json]
    python benchmarks/bench_kernels.py --rounds [--requests 1,8,32] [--out benchmarks/results/eviction_rounds.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS = {
    "Qwen3-4B": dict(layers=36, h_q=32, h_kv=8, d=128),
    "Qwen3-14B": dict(layers=40, h_q=40, h_kv=8, d=128),
}
# Rounds: the shapes (Qwen3-14B at B = 4096, R = 64) and the embedded model's defaults.
ROUND_MODELS = {
    "Qwen3-14B": dict(MODELS["Qwen3-14B"], budget=4096, window=64, cpu_budget=128),
    "SmolLM2-135M": dict(layers=30, h_q=9, h_kv=3, d=64, budget=128, window=32, cpu_budget=128),
}
ROUND_REQUESTS = (1, 8, 32)
ROUND_POLICY = "vase"
LAUNCH_GOAL = 150  # kernel launches per round (the correctness issue's goal)
WINDOW = 64
NOMINAL_COPY_TBPS = {"H100": 3.0, "H200": 4.3}  # SGLANG_NOTES.md, for comparison with the measured value
DTYPE = torch.bfloat16
CPU_NOTE = "CPU: only the torch references are timed; the Triton interpreter is not a timing target"
RESULTS = Path(__file__).parent / "results"
# Profiler ops that run no kernel: views and allocations (a conversion counts when it copies).
NO_KERNEL = {
    "aten::view", "aten::expand", "aten::as_strided", "aten::slice", "aten::select", "aten::permute",
    "aten::transpose", "aten::unsqueeze", "aten::reshape", "aten::t", "aten::alias", "aten::detach", "aten::detach_",
    "aten::unbind", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::lift_fresh", "aten::to",
    "aten::resolve_conj", "aten::resolve_neg", "aten::_unsafe_view", "aten::squeeze", "aten::split", "aten::chunk",
    "aten::narrow", "aten::expand_as", "aten::view_as", "aten::contiguous", "aten::flatten", "aten::result_type",
    "aten::_reshape_alias", "aten::size", "aten::stride", "aten::broadcast_tensors", "aten::new_empty",
    "aten::set_", "aten::record_stream",
}


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
    """Per-layer K/V pools, the batch's slot ids, the query source with its indices, one keep set."""
    g = torch.Generator(device=device).manual_seed(seed)
    n, h_kv, d, layers = budget, model["h_kv"], model["d"], model["layers"]
    pool = (bq * (budget + WINDOW) * 5) // 4
    k_layers = [torch.randn(pool, h_kv, d, generator=g, device=device, dtype=DTYPE) for _ in range(layers)]
    v_layers = [torch.randn(pool, h_kv, d, generator=g, device=device, dtype=DTYPE) for _ in range(layers)]
    table = torch.randperm(pool, generator=g, device=device)[: bq * (n + WINDOW)].view(bq, n + WINDOW)
    slots = table.to(torch.int32)[:, :n]  # candidates: a strided view, like req_to_token[rows, :n-R]
    ring = torch.randn(bq, layers, WINDOW, model["h_q"], d, generator=g, device=device, dtype=DTYPE)
    rows = torch.arange(bq, device=device)
    positions = torch.arange(WINDOW, device=device).expand(bq, WINDOW)
    keep = torch.rand(bq, layers, h_kv, n, generator=g, device=device).argsort(dim=-1)[..., : budget - WINDOW]
    return k_layers, v_layers, slots, (ring, rows, positions), keep


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


def parity(k_layers, v_layers, slots, queries, keep) -> dict:
    """Largest kernel-vs-reference differences on the first two layers, so timings are of correct code."""
    from sglang_vase.kernels import compact_, compact_reference_, score_candidates, score_candidates_reference

    k2, v2, q2 = k_layers[:2], v_layers[:2], (queries[0][:, :2], *queries[1:])
    attn, vrange = score_candidates(k2, v2, slots, *q2)
    ref_attn, ref_vrange = score_candidates_reference(k2, v2, slots, *q2)
    k1, v1 = [t.clone() for t in k2], [t.clone() for t in v2]
    kr, vr = [t.clone() for t in k2], [t.clone() for t in v2]
    compact_(k1, v1, slots, keep[:, :2])
    compact_reference_(kr, vr, slots, keep[:, :2])
    return {
        "attn_max_abs_err": (attn - ref_attn).abs().max().item(),
        "attn_max": ref_attn.abs().max().item(),
        "vrange_equal": torch.equal(vrange, ref_vrange),
        "compaction_equal": all(torch.equal(a, b) for a, b in zip(k1 + v1, kr + vr)),
    }


def bench_case(name, model, budget, bq, device, run, reps, kernels: bool) -> dict:
    from sglang_vase.kernels import compact_, compact_reference_, score_candidates, score_candidates_reference

    k_layers, v_layers, slots, queries, keep = make_case(model, budget, bq, device)
    ring, rows, positions = queries
    layers = range(len(k_layers))

    def ref_score():  # layer by layer: the reference gathers a layer's K, V and queries at once
        return [score_candidates_reference(k_layers[l : l + 1], v_layers[l : l + 1], slots, ring[:, l : l + 1],
                                           rows, positions) for l in layers]

    def ref_compact():
        return [compact_reference_(k_layers[l : l + 1], v_layers[l : l + 1], slots, keep[:, l : l + 1])
                for l in layers]

    row = dict(model=name, budget=budget, window=WINDOW, batch=bq, candidates=budget, kept=budget - WINDOW,
               **model, **traffic(model, budget, bq))
    row["ref_score_ms"] = run(ref_score, reps, warmup=1)
    row["ref_compact_ms"] = run(ref_compact, reps, warmup=1)
    if kernels:
        row.update(parity(k_layers, v_layers, slots, queries, keep))
        row["score_ms"] = run(lambda: score_candidates(k_layers, v_layers, slots, *queries), reps, warmup=3)
        row["compact_ms"] = run(lambda: compact_(k_layers, v_layers, slots, keep), reps, warmup=3)
    del k_layers, v_layers, ring
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# --- eviction rounds ----------------------------------------------------------------------------


def build_round(model: dict, bq: int, budget: int, device, policy: str = ROUND_POLICY, seed: int = 0):
    """A pool holding ``bq`` requests at their trigger (n = B + R), each with its ring row: the
    arguments of ``evict`` for one round."""
    from sglang_vase.config import VaseParams
    from sglang_vase.engine.evictor import Eviction
    from sglang_vase.engine.state import DeviceState, RequestState

    g = torch.Generator(device=device).manual_seed(seed)
    layers, h_kv, h_q, d, window = (model[k] for k in ("layers", "h_kv", "h_q", "d", "window"))
    n = budget + window
    pool = bq * n + 16
    k_layers = [torch.randn(pool, h_kv, d, generator=g, device=device, dtype=DTYPE) for _ in range(layers)]
    v_layers = [torch.randn(pool, h_kv, d, generator=g, device=device, dtype=DTYPE) for _ in range(layers)]
    req_to_token = torch.zeros(bq + 1, n + 8, dtype=torch.int32, device=device)
    req_to_token[1:, :n] = (torch.randperm(pool - 1, generator=g, device=device)[: bq * n] + 1).view(bq, n).int()
    state = DeviceState(bq + 1, bq, layers, window, h_q, d, DTYPE, device)
    state.ring.buffer.normal_(generator=g)
    params = VaseParams(policy=policy, budget=budget, window=window)
    due = [Eviction(row=i + 1, length=n, state=RequestState(params, seed=1000 + i, rid=f"r{i}", prefill_len=n - 1,
                                                             ring_row=state.ring.bind(i + 1)))
           for i in range(bq)]
    return due, req_to_token, k_layers, v_layers, state


def _count_cpu(prof) -> dict:
    """Torch ops that run a kernel, and Triton launches, inside the profiled round: each top-level
    op (one called by the round's own code, not by another op or by the Triton interpreter) that
    is not a view or an allocation, a conversion counting only when it copies."""
    ops, launches = {}, 0
    for e in prof.events():
        if e.name.startswith("triton::"):
            launches += 1
            continue
        if not e.name.startswith("aten::"):
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith(("aten::", "triton::")):
            parent = parent.cpu_parent
        if parent is not None:
            continue
        copies = e.name == "aten::to" and any(c.name.startswith("aten::") for c in e.cpu_children)
        if e.name not in NO_KERNEL or copies:
            ops[e.name] = ops.get(e.name, 0) + 1
    return {"torch_kernel_ops": sum(ops.values()), "triton_launches": launches,
            "launches": sum(ops.values()) + launches, "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}


def profile_round(model_name: str, bq: int, device: torch.device, policy: str = ROUND_POLICY) -> dict:
    """Count and time one eviction round (see the module docstring)."""
    import triton
    from torch.profiler import ProfilerActivity, profile, record_function

    from sglang_vase.engine.evictor import evict, warm_up
    from sglang_vase.kernels._dispatch import interpreting

    model = ROUND_MODELS[model_name]
    cuda = device.type == "cuda"
    budget = model["budget"] if cuda else model["cpu_budget"]
    row = dict(model=model_name, requests=bq, policy=policy, budget=budget, window=model["window"],
               layers=model["layers"], h_kv=model["h_kv"], h_q=model["h_q"], d=model["d"],
               route="cuda" if cuda else ("triton-interpreter" if interpreting() else "torch"))
    if interpreting() or cuda:  # name each Triton launch in the profile
        cls = triton.runtime.interpreter.InterpretedFunction if interpreting() else triton.runtime.jit.JITFunction
        original = cls.run

        def run(self, *args, **kwargs):
            with record_function("triton::" + getattr(self, "fn", self).__name__):
                return original(self, *args, **kwargs)

        cls.run = run
    try:
        if cuda:  # the server compiles at startup; what follows must not compile again
            due, req_to_token, k_layers, v_layers, state = build_round(model, 1, budget, device, policy)
            row["warm_up_s"] = warm_up(k_layers, v_layers, state, due[0].state.params)
            compiled = compiled_kernels()
            del due, req_to_token, k_layers, v_layers, state
        due, req_to_token, k_layers, v_layers, state = build_round(model, bq, budget, device, policy)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            evict(due, req_to_token, k_layers, v_layers, state)
            if cuda:
                torch.cuda.synchronize()
        if cuda:
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            row["device_kernels"] = len(kernels)
            row["device_kernel_names"] = sorted({e.name for e in kernels})
            row.update({k: v for k, v in _count_cpu(prof).items() if k != "ops"})
            row["launches"] = row["device_kernels"]
        else:
            row.update(_count_cpu(prof))
        row["meets_goal"] = row["launches"] < LAUNCH_GOAL
        if not interpreting():  # time fresh rounds (the interpreter's times mean nothing)
            host, device_ms = [], []
            for seed in range(3):
                args = build_round(model, bq, budget, device, policy, seed=seed + 1)
                if cuda:
                    torch.cuda.synchronize()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                t0 = time.perf_counter()
                evict(*args)
                host.append((time.perf_counter() - t0) * 1e3)
                if cuda:
                    end.record()
                    end.synchronize()
                    device_ms.append(start.elapsed_time(end))
                del args
            row["host_ms_per_round"] = statistics.median(host)
            if cuda:
                row["device_ms_per_round"] = statistics.median(device_ms)
        if cuda:
            # New lengths and batch sizes (another budget, a longer first eviction) compile nothing.
            for other in (budget // 2, budget + 3 * model["window"]):
                evict(*build_round(model, max(1, bq // 2), other, device, policy, seed=9))
            torch.cuda.synchronize()
            row["compiled_after_warm_up"] = compiled_kernels() - compiled
    finally:
        if interpreting() or cuda:
            cls.run = original
    return row


def compiled_kernels() -> int:
    """Compiled variants of this package's Triton kernels (every device, every specialisation)."""
    from sglang_vase.kernels import compaction, noise, scoring

    count = 0
    for module in (scoring, compaction, noise):
        for value in vars(module).values():
            for cache in getattr(value, "device_caches", {}).values():
                count += len(cache[0] if isinstance(cache, (tuple, list)) else cache)
    return count


def rounds(out: Path, requests: tuple[int, ...] = ROUND_REQUESTS) -> dict:
    """Every (route, model, requests) round; on CPU each in its own process (the interpreter flag is
    read when the kernels are defined). Rows are written to ``out`` as they finish, and rows already
    there for this device are kept, not run again: an interrupted run resumes."""
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    result = {"device": device, "torch": torch.__version__, "policy": ROUND_POLICY,
              "goal": f"launches per round < {LAUNCH_GOAL}, independent of the layer count", "rows": []}
    if out.exists():
        previous = json.loads(out.read_text())
        if previous.get("device") == device and previous.get("policy") == ROUND_POLICY:
            result["rows"] = previous["rows"]
    done = {(r["route"], r["model"], r["requests"]) for r in result["rows"]}
    routes = ["cuda"] if cuda else ["triton-interpreter", "torch"]
    for route in routes:
        for name in ROUND_MODELS:
            for bq in requests:
                if (route, name, bq) in done:
                    continue
                if route == "cuda":
                    row = profile_round(name, bq, torch.device("cuda"))
                else:
                    env = dict(os.environ, TRITON_INTERPRET="1" if route == "triton-interpreter" else "0")
                    proc = subprocess.run([sys.executable, __file__, "--one-round", name, str(bq)], env=env,
                                          capture_output=True, text=True, check=True)
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                result["rows"].append(row)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=2) + "\n")
                print(f"{row['route']:<19} {name:<13} {bq:>3} requests: {row['launches']:>5} launches "
                      f"({row.get('torch_kernel_ops', '-')} torch ops + {row.get('triton_launches', '-')} Triton)"
                      + (f", {row['host_ms_per_round']:.1f} ms host" if "host_ms_per_round" in row else "")
                      + (f", {row['device_ms_per_round']:.2f} ms device" if "device_ms_per_round" in row else ""),
                      flush=True)
    print(f"wrote {out}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--rounds", action="store_true", help="count and time whole eviction rounds")
    parser.add_argument("--requests", default=",".join(map(str, ROUND_REQUESTS)),
                        help="with --rounds: requests per round, comma list")
    parser.add_argument("--one-round", nargs=2, metavar=("MODEL", "REQUESTS"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.one_round:  # a child of --rounds on CPU: one row as JSON
        print(json.dumps(profile_round(args.one_round[0], int(args.one_round[1]), torch.device("cpu"))))
        return
    if args.rounds:
        rounds(Path(args.out or RESULTS / "eviction_rounds.json"), tuple(int(x) for x in args.requests.split(",")))
        return
    kernels(args)


def kernels(args) -> None:
    import triton

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

    out = Path(args.out or RESULTS / "bench_kernels.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
