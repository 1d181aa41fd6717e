"""The engine's eviction round (sglang_vase.engine.evictor) on an SGLang-layout pool, without SGLang.

Checks what one round must do to the pool, the rows and the request state (VASE_SPEC "One
eviction"), and that the Triton path (scoring + compaction kernels; the interpreter on CPU) keeps
exactly what the torch path keeps.
"""

from __future__ import annotations

import gc
import os
import sys
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sglang_vase.config import DEFAULT_WORKSPACE_MB, VaseParams
from sglang_vase.engine import evictor
from sglang_vase.engine.evictor import Eviction, _Shape, evict, warm_up
from sglang_vase.engine import hooks, step
from sglang_vase.engine.state import DeviceState, RequestState
from sglang_vase.engine.step import KVPool
from step_harness import FreeList, Request

DEVICE = DEVICE_KIND = "cuda" if torch.cuda.is_available() else "cpu"
LAYERS, H_KV, H_Q, D, POOL, ROWS = 2, 2, 4, 16, 256, 6
WORKSPACE = DEFAULT_WORKSPACE_MB << 20  # the server default (--vase-workspace-mb)


def _inject(monkeypatch, faults: str) -> None:
    """Faults as a server reads them from SGLANG_VASE_TEST_FAIL_EVICTION."""
    monkeypatch.setattr(hooks, "HOOKS", hooks.Hooks.from_env({hooks.FAULT_ENV: faults}))


def make_engine(seed: int, n: int, budget: int, window: int, rows: list[int]):
    g = torch.Generator().manual_seed(seed)
    k_bufs = [torch.randn(POOL, H_KV, D, generator=g).to(DEVICE) for _ in range(LAYERS)]
    v_bufs = [torch.randn(POOL, H_KV, D, generator=g).to(DEVICE) for _ in range(LAYERS)]
    req_to_token = torch.zeros(ROWS, 512, dtype=torch.int32)
    ids = torch.randperm(POOL - 1, generator=g)[: len(rows) * n] + 1  # slot 0 is SGLang's padding
    for i, r in enumerate(rows):
        req_to_token[r, :n] = ids[i * n : (i + 1) * n].int()
    device = DeviceState(ROWS, len(rows), LAYERS, window, H_Q, D, torch.float32, DEVICE)
    for r in rows:
        device.ring.bind(r)
    device.ring.buffer.copy_(torch.randn(device.ring.buffer.shape, generator=g))
    device.position_offset[rows] = torch.tensor([0, 7, 100][: len(rows)])
    return k_bufs, v_bufs, req_to_token.to(DEVICE), device


@pytest.mark.parametrize("policy", ["vase", "snapkv", "evict-large-v", "streamingllm"])
def test_round_rewrites_rows_and_frees_the_middle(policy):
    seed = int.from_bytes(os.urandom(4), "little")
    budget, window, n, rows = 32, 8, 48, [1, 3, 4]
    params = VaseParams(policy=policy, budget=budget, window=window)
    k_bufs, v_bufs, req_to_token, device = make_engine(seed, n, budget, window, rows)
    old_rows = req_to_token.clone()
    old_k = [b.clone() for b in k_bufs]
    states = [RequestState(params, seed=s, rid=f"r{s}", prefill_len=n) for s in (11, 12, 13)]
    for r, st in zip(rows, states):
        st.ring_row = int(device.ring.row_of[r])
    due = [Eviction(row=r, length=n, state=st) for r, st in zip(rows, states)]

    result = evict(due, req_to_token, k_bufs, v_bufs, device)
    freed = result.freed_slots()
    assert not result.failed and result.evicted == due

    k = budget - window
    for r in rows:
        # Freed: the old middle columns K..n-R; kept: columns 0..K-1; the recency tail moved by index.
        assert set(old_rows[r, k : n - window].tolist()) <= set(freed.tolist())
        assert torch.equal(req_to_token[r, :k], old_rows[r, :k])
        assert torch.equal(req_to_token[r, k:budget], old_rows[r, n - window : n]), f"seed {seed}"
        # Each head's first K slots now hold K distinct old candidates of that head.
        for layer in range(LAYERS):
            cand = old_k[layer][old_rows[r, : n - window].long()]  # [N, H, D]
            now = k_bufs[layer][req_to_token[r, :k].long()]
            for h in range(H_KV):
                match = (now[:, None, h] == cand[None, :, h]).all(-1)  # [K, N]
                assert bool(match.any(1).all()), f"seed {seed}: slot not from candidates"
                assert int(match.float().argmax(1).unique().numel()) == k
    assert freed.numel() == len(rows) * (n - budget)
    assert device.position_offset[rows].tolist() == [n - budget, 7 + n - budget, 100 + n - budget]
    assert all(st.evictions == 1 and st.evicted_tokens == n - budget for st in states)


@pytest.mark.parametrize("policy", ["vase", "snapkv", "rkv", "evict-large-v", "h2o"])
def test_kernel_path_keeps_what_the_torch_path_keeps(policy, monkeypatch):
    seed = int.from_bytes(os.urandom(4), "little")
    budget, window, n, rows = 32, 8, 48, [2, 5]
    params = VaseParams(policy=policy, budget=budget, window=window)

    def run():
        k_bufs, v_bufs, req_to_token, device = make_engine(seed, n, budget, window, rows)
        states = [RequestState(params, seed=s, rid="x", prefill_len=n, ring_row=int(device.ring.row_of[r]))
                  for r, s in zip(rows, (3, 4))]
        due = [Eviction(row=r, length=n, state=st) for r, st in zip(rows, states)]
        freed = evict(due, req_to_token, k_bufs, v_bufs, device).freed_slots()
        return k_bufs, v_bufs, req_to_token, freed

    triton_result = run()  # Triton kernels: CUDA, or the interpreter (tests/conftest.py) on CPU
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(sys.modules[__name__], "DEVICE", "cpu")
    torch_result = run()  # the torch path: CPU tensors without the interpreter
    (k_t, v_t, rows_t, freed_t), (k_r, v_r, rows_r, freed_r) = triton_result, torch_result
    assert torch.equal(rows_t.cpu(), rows_r) and torch.equal(freed_t.sort().values.cpu(), freed_r.sort().values)
    for a, b in zip(k_t + v_t, k_r + v_r):
        if DEVICE_KIND == "cpu":  # the interpreter computes exactly what torch computes
            assert torch.equal(a, b), f"seed {seed}"
        else:  # GPU and CPU float sums may order a near-tie differently: nearly every row agrees
            same = (a.cpu() == b).all(-1).float().mean().item()
            assert same >= 0.98, f"seed {seed}: {same:.3f} of the rows agree"


def _states(params, rows, device, n, seeds=(11, 12, 13)):
    return [RequestState(params, seed=s, rid=f"r{s}", prefill_len=n, ring_row=int(device.ring.row_of[r]))
            for r, s in zip(rows, seeds)]


@pytest.mark.parametrize("stage", ["select", "apply"])
def test_a_failure_stays_with_its_request(stage, monkeypatch):
    """One request's eviction raises: it is reported (its row and KV untouched), the others evict.
    In the apply phase a batch is all or nothing, so with batches of one request only it fails."""
    seed = int.from_bytes(os.urandom(4), "little")
    budget, window, n, rows = 32, 8, 48, [1, 3, 4]
    params = VaseParams(policy="vase", budget=budget, window=window)
    k_bufs, v_bufs, req_to_token, device = make_engine(seed, n, budget, window, rows)
    old_rows, old_k = req_to_token.clone(), [b.clone() for b in k_bufs]
    states = _states(params, rows, device, n)
    due = [Eviction(row=r, length=n, state=st) for r, st in zip(rows, states)]
    _inject(monkeypatch, f"{stage}:r12")
    workspace = 1 if stage == "apply" else WORKSPACE  # 1 byte: one request per batch
    result = evict(due, req_to_token, k_bufs, v_bufs, device, workspace_bytes=workspace)
    assert [e.state.rid for e, _ in result.failed] == ["r12"]
    assert "injected" in str(result.failed[0][1])
    assert [e.state.rid for e in result.evicted] == ["r11", "r13"]
    assert torch.equal(req_to_token[3], old_rows[3]) and states[1].evictions == 0
    for layer in range(LAYERS):
        slots = old_rows[3, :n].long()
        assert torch.equal(k_bufs[layer][slots], old_k[layer][slots]), f"seed {seed}"
    assert result.freed_slots().numel() == 2 * (n - budget)


@pytest.mark.parametrize("stage", ["select", "apply"])
def test_a_failed_round_holds_nothing_once_its_result_is_dropped(stage, monkeypatch):
    """A reported error keeps its traceback as text: no frame of the round outlives the result, so
    the batch's tensors and ``agree`` (a TP process group) are freed without the garbage collector
    (a group kept alive that way made gloo abort the process at exit)."""
    params = VaseParams(policy="vase", budget=32, window=8)
    k_bufs, v_bufs, req_to_token, device = make_engine(int.from_bytes(os.urandom(4), "little"), 48, 32, 8, [1, 3])
    due = [Eviction(row=r, length=48, state=st) for r, st in zip([1, 3], _states(params, [1, 3], device, 48))]

    class Agree:  # one rank: the codes are everyone's
        def __call__(self, codes):
            return codes

    agree = Agree()
    alive = weakref.ref(agree)
    _inject(monkeypatch, f"{stage}:r12")
    gc.disable()
    try:
        result = evict(due, req_to_token, k_bufs, v_bufs, device, workspace_bytes=1, agree=agree)
        (_, error), = result.failed
        assert error.__traceback__ is None and f"in {stage}" in "".join(error.__notes__)
        del agree, result, error
        assert alive() is None
    finally:
        gc.enable()


def test_apply_failure_reports_the_whole_batch(monkeypatch):
    seed = int.from_bytes(os.urandom(4), "little")
    params = VaseParams(policy="snapkv", budget=32, window=8)
    k_bufs, v_bufs, req_to_token, device = make_engine(seed, 48, 32, 8, [1, 3])
    old_rows = req_to_token.clone()
    due = [Eviction(row=r, length=48, state=st) for r, st in zip([1, 3], _states(params, [1, 3], device, 48))]
    _inject(monkeypatch, "apply:r11")
    result = evict(due, req_to_token, k_bufs, v_bufs, device)
    assert sorted(e.state.rid for e, _ in result.failed) == ["r11", "r12"] and not result.evicted
    assert torch.equal(req_to_token, old_rows) and result.freed_slots() is None


@pytest.mark.parametrize("policy", ["vase", "rkv", "curdkv", "h2o"])
def test_workspace_bound_splits_without_changing_the_result(policy):
    """A workspace too small for one request's heads: one request per batch, one KV head per chunk,
    and exactly the same pool, rows and freed slots as one batch over everything."""
    seed = int.from_bytes(os.urandom(4), "little")
    budget, window, n, rows = 32, 8, 48, [1, 3, 4]
    params = VaseParams(policy=policy, budget=budget, window=window)

    def run(workspace):
        k_bufs, v_bufs, req_to_token, device = make_engine(seed, n, budget, window, rows)
        due = [Eviction(row=r, length=n, state=st) for r, st in zip(rows, _states(params, rows, device, n))]
        freed = evict(due, req_to_token, k_bufs, v_bufs, device, workspace_bytes=workspace).freed_slots()
        return k_bufs + v_bufs + [req_to_token, freed.sort().values]

    shape = _Shape.of(params.build_policy(), n, torch.zeros(1, H_KV, D), DeviceState(2, 0, LAYERS, window, H_Q, D,
                                                                                       torch.float32, "cpu"), LAYERS)
    assert (shape.plan(1).requests, shape.plan(1).layers, shape.plan(1).heads) == (1, 1, 1)
    plan = shape.plan(WORKSPACE)
    assert plan.layers == LAYERS and plan.heads == H_KV
    assert shape.transient_bytes(plan) <= WORKSPACE
    for a, b in zip(run(WORKSPACE), run(1)):
        assert torch.equal(a, b), f"seed {seed}"


@pytest.mark.parametrize("policy", ["vase", "snapkv-sample", "random"])
def test_rank_local_heads_keep_what_one_process_keeps(policy):
    """Tensor parallelism: a rank holding KV heads [2, 4) of 4 (head_offset 2) draws those heads'
    noise, so it keeps exactly what a single process keeps for them."""
    seed = int.from_bytes(os.urandom(4), "little")
    budget, window, n, rows = 32, 8, 48, [1, 3]
    params = VaseParams(policy=policy, budget=budget, window=window)
    g = torch.Generator().manual_seed(seed)
    h_kv, group = 4, 2
    k_full = [torch.randn(POOL, h_kv, D, generator=g) for _ in range(LAYERS)]
    v_full = [torch.randn(POOL, h_kv, D, generator=g) for _ in range(LAYERS)]
    ring = torch.randn(len(rows) + 1, LAYERS, window, h_kv * group, D, generator=g)
    req_to_token = torch.zeros(ROWS, 512, dtype=torch.int32)
    ids = torch.randperm(POOL - 1, generator=g)[: len(rows) * n] + 1
    for i, r in enumerate(rows):
        req_to_token[r, :n] = ids[i * n : (i + 1) * n].int()

    def run(heads, head_offset):
        k_bufs = [b[:, heads].clone().to(DEVICE) for b in k_full]
        v_bufs = [b[:, heads].clone().to(DEVICE) for b in v_full]
        device = DeviceState(ROWS, len(rows), LAYERS, window, len(range(h_kv)[heads]) * group, D, torch.float32,
                             DEVICE, head_offset=head_offset)
        device.ring.buffer.copy_(ring[:, :, :, heads.start * group : heads.stop * group])
        for r in rows:
            device.ring.bind(r)
        rtt = req_to_token.clone().to(DEVICE)
        due = [Eviction(row=r, length=n, state=st) for r, st in zip(rows, _states(params, rows, device, n))]
        evict(due, rtt, k_bufs, v_bufs, device)
        return k_bufs, v_bufs, rtt

    full_k, full_v, full_rows = run(slice(0, 4), 0)
    rank_k, rank_v, rank_rows = run(slice(2, 4), 2)
    assert torch.equal(full_rows, rank_rows)
    for layer in range(LAYERS):
        assert torch.equal(full_k[layer][:, 2:4], rank_k[layer]), f"seed {seed}"
        assert torch.equal(full_v[layer][:, 2:4], rank_v[layer]), f"seed {seed}"


def _decode_with_evictions(policy: str, sort_kept: bool, seed: int, budget=32, window=8, prompt=10, steps=140):
    """The engine's step for one request: slots from a free list, a decode step appends one token (KV
    written at row[length], query into the ring), then ``engine.step`` evicts it if due and gives the
    freed slots back. V[..., 0] carries each token's true position, moved with it."""
    g = torch.Generator().manual_seed(seed)
    params = VaseParams(policy=policy, budget=budget, window=window, sort_kept=sort_kept)
    kv = KVPool(torch.zeros(ROWS, 512, dtype=torch.int32), [torch.zeros(POOL, H_KV, D) for _ in range(LAYERS)],
                [torch.zeros(POOL, H_KV, D) for _ in range(LAYERS)])
    device = DeviceState(ROWS, 1, LAYERS, window, H_Q, D, torch.float32, "cpu")
    row = 1
    req = Request(RequestState(params, seed=seed, rid="pos", prefill_len=prompt, ring_row=device.ring.bind(row)), row)
    slots, kept_after = FreeList(range(1, POOL)), []
    for position in range(prompt + steps):
        slot = slots.take()
        for layer in range(LAYERS):
            kv.k_buffers[layer][slot] = torch.randn(H_KV, D, generator=g)
            kv.v_buffers[layer][slot] = torch.randn(H_KV, D, generator=g)
            kv.v_buffers[layer][slot, :, 0] = float(position)
            device.ring.record_decode(layer, torch.tensor([row]), torch.tensor([position]), torch.randn(1, H_Q, D, generator=g))
        kv.req_to_token[row, req.length] = slot
        req.length += 1
        if position < prompt - 1:  # the prefill: no step yet
            continue
        result = step.evict_requests(step.due([req]), kv, device, slots)
        assert not result.failed
        if result.evicted:
            assert req.length == budget and result.freed == window
            held = kv.req_to_token[row, :budget].long()
            kept_after.append((position, [[set(kv.v_buffers[l][held, h, 0].long().tolist()) for h in range(H_KV)]
                                          for l in range(LAYERS)]))
    assert req.state.evictions == len(kept_after) >= 10
    assert sorted(slots.slots + kv.req_to_token[row, :req.length].tolist()) == list(range(1, POOL))  # none lost
    return kept_after


@pytest.mark.parametrize("sort_kept", [False, True])
@pytest.mark.parametrize("policy", ["streamingllm", "vase", "vase-topk", "curdkv", "vase-dkv"])
def test_positional_policies_over_many_evictions(policy, sort_kept):
    """Definitions by position hold at every eviction of the engine's bookkeeping, in both kept
    orders: StreamingLLM keeps the sinks and exactly the most recent tokens; the sink-keeping
    policies keep positions 0..n_sink-1."""
    seed = int.from_bytes(os.urandom(4), "little")
    budget, n_sink = 32, 4
    for newest, per_layer in _decode_with_evictions(policy, sort_kept, seed, budget=budget):
        for heads in per_layer:
            for kept in heads:
                assert set(range(n_sink)) <= kept, f"seed {seed}: sinks lost at position {newest}"
                if policy == "streamingllm":
                    recent = set(range(newest + 1 - (budget - n_sink), newest + 1))
                    assert kept == set(range(n_sink)) | recent, f"seed {seed} at position {newest}"


class _HostToDevice(TorchDispatchMode):
    """Records every op that takes a host tensor and returns a device one: a host-to-device copy."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" for t in ins) and any(t.device.type != "cpu" for t in outs):
            self.copies.append(str(func))
        return out


@pytest.mark.parametrize("policy", ["vase", "snapkv", "rkv", "vase-adaptive", "curdkv", "streamingllm"])
def test_a_round_never_waits_for_the_device(policy, monkeypatch):
    """A round on the meta device, whose tensors hold no data: any host read of device data (an
    ``.item()``, a ``.tolist()``, a tensor in an ``if``) raises, so the round syncs with the device
    nowhere. Its only host-to-device copies are the batches' per-request scalars (pinned and
    non-blocking on CUDA); the deferral path (a member without fresh slots) indexes on the host
    instead of copying an index to the device."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the torch path: kernels cannot run on meta tensors
    batches = []
    monkeypatch.setattr(evictor, "_to_device", lambda host, dev: batches.append(1) or host.to(dev))
    dev = "meta"
    k_bufs = [torch.empty(POOL, H_KV, D, device=dev) for _ in range(LAYERS)]
    v_bufs = [torch.empty(POOL, H_KV, D, device=dev) for _ in range(LAYERS)]
    req_to_token = torch.empty(ROWS, 512, dtype=torch.int32, device=dev)
    device = DeviceState(ROWS, 3, LAYERS, 8, H_Q, D, torch.float32, dev)
    params = VaseParams(policy=policy, budget=32, window=8)
    due = [Eviction(row=r, length=48, state=RequestState(params, seed=r, rid=f"r{r}", prefill_len=47,
                                                         ring_row=device.ring.bind(r)), protected=20)
           for r in (1, 3, 4)]

    def claim(members):  # r1 gets no fresh slots: it is deferred
        for m in members:
            if m.state.rid != "r1":
                m.fresh = torch.empty(m.fresh_needed, dtype=torch.int64, device=dev)
        return [m for m in members if m.state.rid == "r1"]

    created_on_device = []  # torch.tensor(host data, device=...): a copy the dispatcher does not show

    def watch(make):
        def made(data, *args, **kwargs):
            if not isinstance(data, torch.Tensor) and str(kwargs.get("device") or "cpu") != "cpu":
                created_on_device.append(data)
            return make(data, *args, **kwargs)
        return made

    for name in ("tensor", "as_tensor"):
        monkeypatch.setattr(torch, name, watch(getattr(torch, name)))
    with _HostToDevice() as transfers:
        result = evict(due, req_to_token, k_bufs, v_bufs, device, claim=claim)
    assert [e.state.rid for e in result.deferred] == ["r1"] and len(result.evicted) == 2 and not result.failed
    # The batch's selection, then (members that read tree slots claim and compact one at a time) the
    # two served members: every copy is one of these.
    assert len(transfers.copies) == len(batches) == 3, transfers.copies
    assert created_on_device == []


def _per_layer_round(params, seeds, rows, n, k_bufs, v_bufs, req_to_token, device):
    """The round's semantics written the simplest way: each request alone, each layer alone, torch
    references only (what the engine did before it batched layers)."""
    from sglang_vase.engine.selection import select_keep
    from sglang_vase.kernels.scoring import gather_candidates, gather_queries

    policy = params.build_policy()
    k, r = policy.n_keep, policy.window
    for row, seed in zip(rows, seeds):
        slots = req_to_token[row, :n].long()
        cand = slots[: n - r]
        last = torch.tensor([n - 1]) + device.position_offset[row]
        positions = device.ring.window_slots(last, r)
        ring_rows = device.ring.row_of[[row]]
        for layer in range(LAYERS):
            keys = gather_candidates(k_bufs[layer : layer + 1], cand[None])[:, 0]
            values = gather_candidates(v_bufs[layer : layer + 1], cand[None])[:, 0]
            queries = gather_queries(device.ring.buffer[:, layer : layer + 1], ring_rows, positions)[:, 0]
            keep = select_keep(policy, keys, values, queries, torch.tensor([seed]), torch.tensor([0]), layer)[0]
            for buf, kept in ((k_bufs[layer], keys), (v_bufs[layer], values)):
                buf[slots[:k]] = torch.stack([kept[0, h, keep[h]] for h in range(H_KV)], dim=1)
        req_to_token[row, :policy.budget] = torch.cat([cand[:k], slots[n - r :]]).int()


@pytest.mark.parametrize("policy", ["vase", "snapkv", "h2o", "rkv", "vase-adaptive", "curdkv", "vase-dkv", "random",
                                    "streamingllm"])
def test_one_round_keeps_what_each_layer_alone_keeps(policy):
    """Batching every request and layer into one selection (and one compaction launch: the
    interpreter on CPU) keeps exactly what evicting each request's layers one at a time keeps."""
    seed = int.from_bytes(os.urandom(4), "little")
    budget, window, n, rows, seeds = 32, 8, 48, [1, 3, 4], [11, 12, 13]
    params = VaseParams(policy=policy, budget=budget, window=window)
    k_bufs, v_bufs, req_to_token, device = make_engine(seed, n, budget, window, rows)
    want = [t.clone() for t in k_bufs + v_bufs], req_to_token.clone()
    _per_layer_round(params, seeds, rows, n, want[0][:LAYERS], want[0][LAYERS:], want[1], device)
    due = [Eviction(row=r, length=n, state=st) for r, st in zip(rows, _states(params, rows, device, n, seeds))]
    evict(due, req_to_token, k_bufs, v_bufs, device)
    assert torch.equal(req_to_token, want[1])
    for got, expected in zip(k_bufs + v_bufs, want[0]):
        assert torch.equal(got, expected), f"seed {seed}"


def test_warm_up_touches_only_the_padding_slot():
    """The startup warm-up runs a round of a dummy request on slot 0 (SGLang's padding slot) with a
    scratch row: every other slot, every row and every offset is as before, and a real round after
    it keeps what it keeps without it."""
    seed = int.from_bytes(os.urandom(4), "little")
    budget, window, n, rows = 32, 8, 48, [1, 3]
    params = VaseParams(policy="vase", budget=budget, window=window)

    def run(warm):
        k_bufs, v_bufs, req_to_token, device = make_engine(seed, n, budget, window, rows)
        before = [t.clone() for t in k_bufs + v_bufs], req_to_token.clone(), device.position_offset.clone()
        if warm:
            assert warm_up(k_bufs, v_bufs, device, params) > 0
            for got, old in zip(k_bufs + v_bufs, before[0]):
                assert torch.equal(got[1:], old[1:])
            assert torch.equal(req_to_token, before[1]) and torch.equal(device.position_offset, before[2])
        due = [Eviction(row=r, length=n, state=st) for r, st in zip(rows, _states(params, rows, device, n))]
        evict(due, req_to_token, k_bufs, v_bufs, device)
        return [t[1:] for t in k_bufs + v_bufs] + [req_to_token]

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b), f"seed {seed}"
