"""The engine's eviction round (sglang_vase.engine.evictor) on an SGLang-layout pool, without SGLang.

Checks what one round must do to the pool, the rows and the request state (VASE_SPEC "One
eviction"), and that the Triton path (scoring + compaction kernels; the interpreter on CPU) keeps
exactly what the torch path keeps.
"""

from __future__ import annotations

import os

import pytest
import torch

from sglang_vase.config import VaseParams
from sglang_vase.engine.evictor import Eviction, evict
from sglang_vase.engine.state import DeviceState, RequestState

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYERS, H_KV, H_Q, D, POOL, ROWS = 2, 2, 4, 16, 256, 6


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
        device.bind_ring_row(r)
    device.ring.copy_(torch.randn(device.ring.shape, generator=g))
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
        st.ring_row = int(device.ring_row[r])
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


@pytest.mark.parametrize("policy", ["vase", "snapkv", "rkv", "evict-large-v"])
def test_kernel_path_keeps_what_the_torch_path_keeps(policy, monkeypatch):
    seed = int.from_bytes(os.urandom(4), "little")
    budget, window, n, rows = 32, 8, 48, [2, 5]
    params = VaseParams(policy=policy, budget=budget, window=window)

    def run():
        k_bufs, v_bufs, req_to_token, device = make_engine(seed, n, budget, window, rows)
        states = [RequestState(params, seed=s, rid="x", prefill_len=n, ring_row=int(device.ring_row[r]))
                  for r, s in zip(rows, (3, 4))]
        due = [Eviction(row=r, length=n, state=st) for r, st in zip(rows, states)]
        freed = evict(due, req_to_token, k_bufs, v_bufs, device).freed_slots()
        return k_bufs, v_bufs, req_to_token, freed

    triton_result = run()  # Triton kernels: CUDA, or the interpreter (tests/conftest.py) on CPU
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
    else:
        pytest.skip("on CUDA both paths are the kernel path")
    torch_result = run()
    for a, b in zip(triton_result, torch_result):
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            assert torch.equal(x, y), f"seed {seed}"
