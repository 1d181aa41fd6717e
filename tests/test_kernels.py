"""Parity of the Triton kernels (sglang_vase.kernels) with their torch references.

On a machine without CUDA the kernels run under the Triton interpreter on CPU tensors (shapes are
kept small for it); with CUDA the same tests run the compiled kernels on the GPU. Every test draws
fresh data; the seed is in the failure message, and VASE_TEST_SEED=<seed> replays it.
"""

import os
import subprocess
import sys

import pytest
import torch

from sglang_vase.kernels import compact_, compact_reference_, score_candidates, score_candidates_reference
from sglang_vase.kernels._dispatch import triton_loads

# On CPU, conftest.py has set TRITON_INTERPRET=1 before the kernels were defined.

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def seed():
    return int(os.environ.get("VASE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def make_layers(seed, *, bq, n, h_kv, group, d, w, dtype, layers=2, extra=37, device=DEVICE):
    """``layers`` per-layer buffers of a pool shared with other requests (separate allocations, as
    SGLang's); the batch's slots are scattered through it. Queries come from a ring-like source
    ``[rows, L, P, H_q, D]`` (not contiguous per request: rows in shuffled order, P > W)."""
    g = torch.Generator().manual_seed(seed)
    pool = bq * n + extra
    k_layers, v_layers = [], []
    for _ in range(layers):
        k_layers.append(torch.randn(pool, h_kv, d, generator=g).to(dtype).to(device))
        v = torch.randn(pool, h_kv, d, generator=g)
        v[torch.randint(pool, (pool // 10,), generator=g)] *= 8  # a few large-range values
        v_layers.append(v.to(dtype).to(device))
    # A strided view of a wider req_to_token-like table, int32 like SGLang's.
    table = torch.randperm(pool, generator=g)[: bq * (n + 3)].view(bq, n + 3).to(torch.int32)
    depth = w + 3
    ring = 3 * torch.randn(bq + 2, layers, depth, h_kv * group, d, generator=g)
    rows = torch.stack([torch.randperm(bq + 2, generator=g)[:bq]] * 3, dim=1)[:, 1]  # strided, like the engine's
    positions = torch.stack([torch.randperm(depth, generator=g)[:w] for _ in range(bq)])
    return (k_layers, v_layers, table.to(device)[:, :n], ring.to(dtype).to(device), rows.to(device),
            positions.to(device))


SCORE_CASES = [
    # bq, n, h_kv, group, d, w, dtype
    (3, 100, 2, 1, 64, 8, torch.float32),
    (2, 150, 2, 3, 64, 8, torch.bfloat16),
    (2, 70, 1, 4, 128, 8, torch.float32),
    (1, 201, 2, 4, 128, 8, torch.bfloat16),
    (2, 37, 2, 3, 128, 5, torch.float16),
    (1, 130, 2, 4, 128, 64, torch.bfloat16),  # the paper's window R = 64
    (2, 75, 1, 5, 64, 64, torch.float32),  # Qwen3-14B's group of 5
]
if DEVICE == "cuda":  # the real shapes at an eviction (N = B candidates): too slow for the interpreter
    SCORE_CASES += [
        (4, 4096, 8, 4, 128, 64, torch.bfloat16),  # Qwen3-4B per rank, B = 4096
        (4, 4096, 8, 5, 128, 64, torch.bfloat16),  # Qwen3-14B
        (1, 16384, 8, 5, 128, 64, torch.bfloat16),  # a long prompt's first eviction
        (8, 1024, 4, 5, 128, 64, torch.float32),  # Qwen3-14B at TP 2, B = 1024, fp32
    ]


def check_scores(seed, case, **opts):
    k_layers, v_layers, slots, ring, rows, positions = case
    attn, vrange = score_candidates(k_layers, v_layers, slots, ring, rows, positions, **opts)
    opts.pop("num_splits", None)
    ref_attn, ref_vrange = score_candidates_reference(k_layers, v_layers, slots, ring, rows, positions, **opts)
    assert attn.shape == vrange.shape == (slots.shape[0], len(k_layers), k_layers[0].shape[1], slots.shape[1])
    assert attn.dtype == torch.float32
    torch.testing.assert_close(attn, ref_attn, rtol=1e-4, atol=1e-7, msg=lambda m: f"seed={seed}: {m}")
    assert torch.equal(vrange, ref_vrange), f"seed={seed}"
    return attn, vrange


@pytest.mark.parametrize("bq,n,h_kv,group,d,w,dtype", SCORE_CASES)
@pytest.mark.parametrize("splits", [None, 2])
def test_score_matches_reference(seed, bq, n, h_kv, group, d, w, dtype, splits):
    case = make_layers(seed, bq=bq, n=n, h_kv=h_kv, group=group, d=d, w=w, dtype=dtype)
    _, vrange = check_scores(seed, case, num_splits=splits)
    assert torch.isinf(vrange[..., :4]).all()


@pytest.mark.parametrize("temperature,n_sink,smoothing", [(0.5, 0, 1), (2.0, 7, 3), (1.0, 4, 5)])
def test_score_options(seed, temperature, n_sink, smoothing):
    case = make_layers(seed, bq=2, n=90, h_kv=2, group=2, d=64, w=8, dtype=torch.float32)
    check_scores(seed, case, num_splits=2, temperature=temperature, n_sink=n_sink, smoothing=smoothing)


def test_score_single_partial_tile(seed):
    """Fewer candidates than one tile, and more splits asked for than there are tiles."""
    check_scores(seed, make_layers(seed, bq=2, n=3, h_kv=1, group=2, d=64, w=8, dtype=torch.float32), num_splits=4)


def test_every_layer_scores_as_it_does_alone(seed):
    """One launch over L layers gives each layer exactly the scores of a launch over it alone."""
    case = make_layers(seed, bq=2, n=60, h_kv=2, group=2, d=64, w=8, dtype=torch.float32, layers=3)
    k_layers, v_layers, slots, ring, rows, positions = case
    attn, vrange = score_candidates(k_layers, v_layers, slots, ring, rows, positions)
    for layer in range(3):
        one = score_candidates(k_layers[layer : layer + 1], v_layers[layer : layer + 1], slots,
                               ring[:, layer : layer + 1], rows, positions)
        assert torch.equal(attn[:, layer : layer + 1], one[0]) and torch.equal(vrange[:, layer : layer + 1], one[1])


def random_keep(seed, bq, layers, h_kv, n, k, device=DEVICE):
    """Distinct indices per (request, layer, head) in no particular order, like [large ++ sampled]."""
    g = torch.Generator().manual_seed(seed + 1)
    keep = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(bq * layers * h_kv)])
    return keep.view(bq, layers, h_kv, k).to(device)


COMPACT_CASES = [
    (3, 100, 2, 64, 40, torch.bfloat16, torch.int32),
    (2, 77, 3, 128, 76, torch.float32, torch.int64),
    (1, 50, 1, 64, 1, torch.float16, torch.int32),
]
if DEVICE == "cuda":
    COMPACT_CASES += [(4, 4096, 8, 128, 4032, torch.bfloat16, torch.int32), (2, 2048, 8, 128, 1984, torch.int16, torch.int32)]


@pytest.mark.parametrize("bq,n,h_kv,d,k,dtype,slot_dtype", COMPACT_CASES)
@pytest.mark.parametrize("scratch_budget", [None, 1])
def test_compaction_matches_semantics(seed, bq, n, h_kv, d, k, dtype, slot_dtype, scratch_budget):
    layers = 3
    k_layers, v_layers, slots, *_ = make_layers(seed, bq=bq, n=n, h_kv=h_kv, group=1, d=d, w=1, dtype=dtype,
                                                layers=layers)
    slots = slots.to(slot_dtype)
    keep = random_keep(seed, bq, layers, h_kv, n, k)
    keep[0, 0, 0] = torch.arange(k, device=keep.device)  # a head that keeps its first K in place must not change
    old_k, old_v = [t.clone() for t in k_layers], [t.clone() for t in v_layers]

    compact_(k_layers, v_layers, slots, keep, scratch_budget)  # 1 byte: a single program does every row

    exp_k, exp_v = [t.clone() for t in old_k], [t.clone() for t in old_v]
    compact_reference_(exp_k, exp_v, slots, keep)
    for layer in range(layers):
        assert torch.equal(k_layers[layer], exp_k[layer]) and torch.equal(v_layers[layer], exp_v[layer]), f"seed={seed}"
    # The reference itself against the definition, row by row.
    for b in range(bq):
        for layer in range(layers):
            for h in range(h_kv):
                src = slots[b, keep[b, layer, h]].long()
                dst = slots[b, :k].long()
                assert torch.equal(exp_k[layer][dst, h], old_k[layer][src, h]), f"seed={seed}"
                assert torch.equal(exp_v[layer][dst, h], old_v[layer][src, h]), f"seed={seed}"
    # Only the batch's first K slots are written: the rest of its rows and the other requests' slots
    # (the pool outside the batch) keep their contents.
    written = torch.zeros(k_layers[0].shape[0], dtype=torch.bool, device=k_layers[0].device)
    written[slots[:, :k].long().flatten()] = True
    for layer in range(layers):
        assert torch.equal(k_layers[layer][~written], old_k[layer][~written]), f"seed={seed}"
        assert torch.equal(v_layers[layer][~written], old_v[layer][~written]), f"seed={seed}"
    assert torch.equal(k_layers[0][slots[0].long(), 0], old_k[0][slots[0].long(), 0]), f"seed={seed}"


def test_fallback_is_reference(seed, monkeypatch):
    """CPU tensors without the interpreter take the torch path, bit for bit the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = make_layers(seed, bq=2, n=90, h_kv=2, group=3, d=64, w=8, dtype=torch.bfloat16, device="cpu")
    got = score_candidates(*case)
    want = score_candidates_reference(*case)
    assert all(torch.equal(a, b) for a, b in zip(got, want)), f"seed={seed}"

    k_layers, v_layers, slots = case[:3]
    keep = random_keep(seed, 2, 2, 2, 90, 30, device="cpu")
    k1, v1 = [t.clone() for t in k_layers], [t.clone() for t in v_layers]
    compact_(k1, v1, slots, keep)
    compact_reference_(k_layers, v_layers, slots, keep)
    assert all(torch.equal(a, b) for a, b in zip(k1 + v1, k_layers + v_layers)), f"seed={seed}"


def test_fp8_kv_below_compute_capability_8_9_takes_the_torch_path():
    """Triton cannot compile fp8 e4m3 loads below 8.9 (``check_fp8_boundary`` compiles for each
    capability): such a KV cache is scored by the torch path, which handles it."""
    assert not triton_loads(torch.float8_e4m3fn, (8, 0)) and not triton_loads(torch.float8_e4m3fn, (8, 6))
    assert triton_loads(torch.float8_e4m3fn, (8, 9)) and triton_loads(torch.float8_e4m3fn, (9, 0))
    assert triton_loads(torch.float8_e5m2, (8, 0)) and triton_loads(torch.bfloat16, (7, 5))
    k_layers, v_layers, *rest = make_layers(0, bq=1, n=40, h_kv=2, group=2, d=64, w=4, dtype=torch.float32,
                                            device="cpu")
    attn, vrange = score_candidates_reference([t.to(torch.float8_e4m3fn) for t in k_layers],
                                              [t.to(torch.float8_e4m3fn) for t in v_layers], *rest)
    assert attn.dtype == torch.float32 and torch.isfinite(attn).all() and vrange.shape == attn.shape


def test_rejects_bad_shapes():
    k_layers, v_layers, slots, ring, rows, positions = make_layers(0, bq=1, n=10, h_kv=2, group=2, d=64, w=4,
                                                                   dtype=torch.float32)
    with pytest.raises(ValueError):
        score_candidates(k_layers, v_layers, slots, ring[..., :32], rows, positions)
    with pytest.raises(ValueError):
        score_candidates(k_layers, v_layers, slots, ring, rows, positions, smoothing=4)
    with pytest.raises(ValueError):
        score_candidates(k_layers, v_layers[:1], slots, ring, rows, positions)
    with pytest.raises(ValueError):  # layers of different shapes
        score_candidates([k_layers[0], k_layers[1][:-1]], v_layers, slots, ring, rows, positions)
    with pytest.raises(ValueError):
        compact_(k_layers, v_layers, slots, torch.zeros(1, 2, 2, 11, dtype=torch.int64, device=slots.device))


def compile_for_sm90():
    """Compile every kernel for an H100 without a GPU: the interpreter never runs the 16-bit tensor-core
    branch, and it accepts code that the compiler rejects. Needs triton's bundled ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget

    from sglang_vase.kernels import compaction, noise, scoring

    def build(fn, types, consts, num_warps):
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
        # Pointers 16-byte aligned, as triton specialises them at launch: the vectorised code path.
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n.endswith("_ptr")}
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))

    for dt, f32, block_n in (("bf16", False, 64), ("fp16", False, 64), ("fp32", True, 32)):
        types = pointer_types(dt)
        common = dict(GROUP=5, D=128, BLOCK_D=128, BLOCK_W=64, BLOCK_N=block_n, F32=f32)
        build(scoring._stats_kernel, types, common, scoring.NUM_WARPS)
        build(scoring._probs_kernel, types, dict(BLOCK_S=16, **common), scoring.NUM_WARPS)
    for storage in ("i16", "i32", "u8"):  # compaction moves the KV's bytes as integers
        build(compaction._compact_kernel, pointer_types(storage),
              dict(D=128, BLOCK_D=128, BLOCK_K=compaction.BLOCK_K), compaction.NUM_WARPS)
    build(scoring._smooth_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32"}, dict(KERNEL=5, BLOCK=scoring.SMOOTH_BLOCK), 4)
    build(noise._uniform_kernel, {"seed_ptr": "*i64", "stream_ptr": "*i64", "out_ptr": "*fp32"},
          dict(BLOCK=noise.BLOCK), 4)
    check_fp8_boundary()
    check_lengths_are_not_compiled_in()


# Arguments whose value changes from one eviction round to the next on one server (lengths, counts,
# batch-dependent strides). Triton would compile a kernel per new value divisible by 16 or equal
# to 1 (seconds, on the scheduler's thread) unless they are marked do_not_specialize.
ROUND_DEPENDENT = {
    # (head counts too: a workspace too small for one request's layer splits its heads into chunks)
    "_stats_kernel": {"N", "W", "LAYERS", "H_Q", "tiles_per_split", "stride_sb", "stride_pb"},
    "_probs_kernel": {"N", "W", "LAYERS", "H_KV", "n_splits", "n_sink", "stride_sb", "stride_pb"},
    "_smooth_kernel": {"N"},
    "_compact_kernel": {"rows", "K", "LAYERS", "H_KV", "stride_sb", "stride_pb", "stride_pl", "stride_ph"},
    "_uniform_kernel": {"numel", "offset"},
}


def check_lengths_are_not_compiled_in():
    from sglang_vase.kernels import compaction, noise, scoring

    kernels = {**{n: getattr(scoring, n) for n in ("_stats_kernel", "_probs_kernel", "_smooth_kernel")},
               "_compact_kernel": compaction._compact_kernel, "_uniform_kernel": noise._uniform_kernel}
    for name, fn in kernels.items():
        marked = {p.name for p in fn.params if p.do_not_specialize}
        assert ROUND_DEPENDENT[name] <= marked, (name, ROUND_DEPENDENT[name] - marked)


def pointer_types(kv: str, queries: str | None = None) -> dict:
    """Triton signature types of the kernels' arguments for KV of type ``kv`` (others are i32)."""
    types = {"k_ptr": "*" + kv, "v_ptr": "*" + kv, "scratch_ptr": "*" + kv, "q_ptr": "*" + (queries or kv),
             "slot_ptr": "*i32", "keep_ptr": "*i64", "koff_ptr": "*i64", "voff_ptr": "*i64", "qrow_ptr": "*i64",
             "qpos_ptr": "*i64", "qk_scale": "fp32", "inv_count": "fp32"}
    return types | {n: "*fp32" for n in ("m_ptr", "l_ptr", "score_ptr", "vrange_ptr")}


def check_fp8_boundary():
    """The scoring kernel with an fp8 KV cache compiles exactly where ``triton_loads`` sends it to
    Triton: e4m3 from compute capability 8.9 on, e5m2 below too."""
    import triton
    from triton.backends.compiler import GPUTarget

    from sglang_vase.kernels import scoring
    from sglang_vase.kernels._dispatch import triton_loads

    fn = scoring._stats_kernel
    consts = dict(GROUP=5, D=128, BLOCK_D=128, BLOCK_W=64, BLOCK_N=32, F32=True)
    for tl_type, dtype in (("fp8e4nv", torch.float8_e4m3fn), ("fp8e5", torch.float8_e5m2)):
        for capability in ((8, 0), (8, 6), (8, 9), (9, 0)):
            types = pointer_types(tl_type, queries="bf16")
            sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
            try:
                triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts),
                               target=GPUTarget("cuda", capability[0] * 10 + capability[1], 32),
                               options=dict(num_warps=scoring.NUM_WARPS))
                compiled = True
            except triton.compiler.errors.CompilationError as e:
                assert "not supported in this architecture" in str(e), e
                compiled = False
            assert compiled == triton_loads(dtype, capability), (tl_type, capability, compiled)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the tests above run the compiled kernels")
def test_kernels_compile_for_sm90():
    """Every kernel compiles for an H100 (and fp8 exactly where the dispatch sends it), and no
    length, count or batch-dependent stride is compiled in (the startup warm-up compiles all)."""
    # A fresh process: kernels defined under TRITON_INTERPRET=1 cannot be compiled.
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


if __name__ == "__main__":
    compile_for_sm90()
