"""Tensor parallelism, rank-local: two torch.distributed (gloo) processes each hold half of the KV
heads and run the engine's eviction round on their own pool, as SGLang's TP ranks do.

SGLang 0.5.23 cannot run ``--tp-size 2`` on this CPU route (its TP group builds a PyNccl
communicator on the CPU device and raises "Expected a cuda device"; plain SGLang too), so this is
the evidence that a rank needs no all-reduce: over many decode steps with the engine's bookkeeping
(slots from a free list, one token per step, ``evict`` at each trigger, freed slots reused) the
ranks agree on every length, trigger and freed slot, and each keeps exactly what one process
holding every head keeps for its heads.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sglang_vase.config import VaseParams
from sglang_vase.engine.evictor import Eviction, agree_over, evict
from sglang_vase.engine import hooks, step
from sglang_vase.engine.state import DeviceState, RequestState
from sglang_vase.engine.step import KVPool
from sglang_vase.serving import free_port
from step_harness import FreeList, Request

LAYERS, H_KV, GROUP, D, POOL, ROWS, WORLD = 2, 4, 2, 16, 512, 6, 2
# (req_to_token row, prompt length, budget, window): triggers at different steps for each.
REQUESTS = [(1, 10, 32, 8), (3, 21, 24, 4), (4, 45, 40, 8)]
STEPS = 64


def _serve(policy: str, seed: int, heads: slice) -> tuple[list, dict]:
    """Decode every request for STEPS tokens holding KV heads ``heads`` (their query heads too), one
    ``engine.step`` after each decode step. Every process draws the K/V/q of all heads from one
    generator and keeps its slice."""
    g = torch.Generator().manual_seed(seed)
    h_local = heads.stop - heads.start
    kv = KVPool(torch.zeros(ROWS, 256, dtype=torch.int32), [torch.zeros(POOL, h_local, D) for _ in range(LAYERS)],
                [torch.zeros(POOL, h_local, D) for _ in range(LAYERS)])
    ring_window = max(w for *_, w in REQUESTS)
    device = DeviceState(ROWS, len(REQUESTS), LAYERS, ring_window, h_local * GROUP, D, torch.float32, "cpu",
                         head_offset=heads.start)
    reqs = [Request(RequestState(VaseParams(policy=policy, budget=b, window=w), seed=seed + i, rid=f"r{i}",
                                 prefill_len=p, ring_row=device.ring.bind(row)), row)
            for i, (row, p, b, w) in enumerate(REQUESTS)]
    slots, events = FreeList(range(1, POOL)), []
    for position in range(max(p for _, p, _, _ in REQUESTS) + STEPS):
        stepped = []
        for req, (row, prompt, _, _) in zip(reqs, REQUESTS):
            if position >= prompt + STEPS:
                continue
            slot = slots.take()
            for layer in range(LAYERS):
                kv.k_buffers[layer][slot] = torch.randn(H_KV, D, generator=g)[heads]
                kv.v_buffers[layer][slot] = torch.randn(H_KV, D, generator=g)[heads]
                q = torch.randn(1, H_KV * GROUP, D, generator=g)[:, heads.start * GROUP : heads.stop * GROUP]
                device.ring.record_decode(layer, torch.tensor([row]), torch.tensor([position]), q)
            kv.req_to_token[row, req.length] = slot
            req.length += 1
            if position >= prompt - 1:  # past its prefill
                stepped.append(req)
        due = step.due(stepped)
        if due:
            triggers = [(r.row, r.length) for r in due]
            result = step.evict_requests(due, kv, device, slots)
            assert not result.failed, result.failed
            events.append((position, triggers, slots.freed[len(slots.freed) - result.freed:]))
    assert all(r.state.evictions >= 5 for r in reqs), [r.state.evictions for r in reqs]
    return events, {"k": kv.k_buffers, "v": kv.v_buffers, "rows": kv.req_to_token, "offsets": device.position_offset,
                    "lengths": [r.length for r in reqs]}


def _rank(rank: int, port: int, policy: str, seed: int) -> None:
    torch.set_num_threads(1)
    # The torch path (the Triton kernels' parity is tests/test_evictor.py's): the interpreter would
    # make this test minutes long.
    os.environ["TRITON_INTERPRET"] = "0"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        per_rank = H_KV // WORLD
        heads = slice(rank * per_rank, (rank + 1) * per_rank)
        events, mine = _serve(policy, seed, heads)
        # The ranks agree on every trigger, length and freed slot, step by step.
        everyone = [None] * WORLD
        dist.all_gather_object(everyone, events)
        assert all(e == everyone[0] for e in everyone), f"seed {seed}: ranks disagree on an eviction"
        # And each keeps what one process holding all heads keeps for its heads.
        single_events, single = _serve(policy, seed, slice(0, H_KV))
        assert events == single_events, f"seed {seed}"
        assert torch.equal(mine["rows"], single["rows"]) and torch.equal(mine["offsets"], single["offsets"])
        assert mine["lengths"] == single["lengths"]
        for layer in range(LAYERS):
            assert torch.equal(mine["k"][layer], single["k"][layer][:, heads]), f"seed {seed}, rank {rank}"
            assert torch.equal(mine["v"][layer], single["v"][layer][:, heads]), f"seed {seed}, rank {rank}"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("policy", ["vase", "snapkv-sample", "rkv", "streamingllm"])
def test_two_ranks_keep_what_one_process_keeps(policy):
    seed = int.from_bytes(os.urandom(4), "little")
    mp.spawn(_rank, args=(free_port(), policy, seed), nprocs=WORLD, join=True)


# A round of four requests evicting together; on one rank only, the selection of "r1" fails (an
# out-of-memory, say), and on the other the compaction of "r2"'s batch (one request per batch).
FAULTS = {0: "select:r1", 1: "apply:r2"}
ROUND = [(1, 40, 24, 8), (2, 40, 24, 8), (3, 40, 24, 8), (4, 40, 24, 8)]


def _round_with_faults(rank: int, agree) -> dict:
    g = torch.Generator().manual_seed(5)
    h_local = H_KV // WORLD
    heads = slice(rank * h_local, (rank + 1) * h_local)
    k_bufs = [torch.randn(POOL, H_KV, D, generator=g)[:, heads].contiguous() for _ in range(LAYERS)]
    v_bufs = [torch.randn(POOL, H_KV, D, generator=g)[:, heads].contiguous() for _ in range(LAYERS)]
    device = DeviceState(ROWS, len(ROUND), LAYERS, 8, h_local * GROUP, D, torch.float32, "cpu", head_offset=heads.start)
    device.ring.buffer.copy_(torch.randn(device.ring.buffer.shape[:3] + (H_KV * GROUP, D), generator=g)[
        :, :, :, heads.start * GROUP : heads.stop * GROUP])
    req_to_token = torch.zeros(ROWS, 256, dtype=torch.int32)
    slots = torch.randperm(POOL - 1, generator=g) + 1
    due = []
    for i, (row, n, budget, window) in enumerate(ROUND):
        req_to_token[row, :n] = slots[i * n : (i + 1) * n].int()
        st = RequestState(VaseParams(policy="vase", budget=budget, window=window), seed=i, rid=f"r{i}",
                          prefill_len=n - 1, ring_row=device.ring.bind(row))
        due.append(Eviction(row=row, length=n, state=st))
    before = req_to_token.clone()
    hooks.HOOKS = hooks.Hooks.from_env({hooks.FAULT_ENV: FAULTS[rank]})  # this rank's process only
    try:
        # 1-byte workspace: one request per batch, so the compaction failure is r2's alone.
        result = evict(due, req_to_token, k_bufs, v_bufs, device, workspace_bytes=1, agree=agree)
    finally:
        hooks.HOOKS = hooks.Hooks()
    failed = sorted(e.state.rid for e, _ in result.failed)
    untouched = [e.state.rid for e in due if torch.equal(req_to_token[e.row], before[e.row])]
    return {"failed": failed, "evicted": sorted(e.state.rid for e in result.evicted), "untouched": untouched,
            "freed": int(result.freed_slots().numel()), "offsets": device.position_offset.tolist(),
            "evictions": [e.state.evictions for e in due]}


def _agreement_rank(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ["TRITON_INTERPRET"] = "0"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        everyone = [None] * WORLD
        dist.all_gather_object(everyone, _round_with_faults(rank, agree=None))
        # Alone, each rank aborts only what failed there: their batches would differ from then on.
        assert everyone[0]["failed"] == ["r1"] and everyone[1]["failed"] == ["r2"], everyone
        dist.all_gather_object(everyone, _round_with_faults(rank, agree=agree_over(dist.group.WORLD)))
        assert everyone[0] == everyone[1], everyone  # same aborts, evictions, freed slots, offsets
        mine = everyone[rank]
        assert mine["failed"] == ["r1", "r2"] and mine["evicted"] == ["r0", "r3"]
        # Neither failed request's row changed on any rank: r2, compacted on rank 0, was put back.
        assert mine["untouched"] == ["r1", "r2"] and mine["evictions"] == [1, 0, 0, 1]
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_a_failure_that_happens_on_one_of_them():
    """An eviction that fails on one tensor-parallel rank only is aborted on every rank (one MAX
    all-reduce per phase on the CPU group), so the ranks keep running the same batches."""
    mp.spawn(_agreement_rank, args=(free_port(),), nprocs=WORLD, join=True)
