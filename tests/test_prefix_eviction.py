"""Eviction beside SGLang's radix cache (sglang_vase.engine.evictor), on an SGLang-layout pool.

A request's first ``protected`` columns are radix-tree slots that other requests read too. Its
eviction must keep exactly what it keeps when it owns every slot (same selection, same data), while
never writing or freeing a tree slot: kept tree tokens are copied into slots it owns (copy-on-evict),
topped up from fresh slots. With keep_prompt the prompt's columns are never candidates at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from sglang_vase.config import VaseParams
from sglang_vase.engine.admission import admission_slots, future_slots, own_bound
from sglang_vase.engine import step
from sglang_vase.engine.evictor import Eviction
from sglang_vase.engine.geometry import Geometry
from sglang_vase.engine.state import DeviceState, RequestState
from sglang_vase.engine.step import KVPool
from step_harness import Request

LAYERS, H_KV, H_Q, D, POOL, ROWS = 2, 2, 4, 16, 1024, 8
BUDGET, WINDOW = 32, 8


class Pool:
    """A KV pool with a free list; ``write`` puts a token sequence's KV into given slots."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.k = [torch.zeros(POOL, H_KV, D) for _ in range(LAYERS)]
        self.v = [torch.zeros(POOL, H_KV, D) for _ in range(LAYERS)]
        self.req_to_token = torch.zeros(ROWS, 512, dtype=torch.int32)
        self.free = torch.randperm(POOL - 1, generator=self.g) + 1  # slot 0 is SGLang's padding
        self.device = DeviceState(ROWS, ROWS, LAYERS, WINDOW, H_Q, D, torch.float32, "cpu")
        self.kv = KVPool(self.req_to_token, self.k, self.v)

    def take(self, count: int) -> torch.Tensor:
        out, self.free = self.free[:count], self.free[count:]
        return out

    def fill(self, row: int, slots: torch.Tensor, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.req_to_token[row, : slots.numel()] = slots.int()
        for layer, (k, v) in enumerate(data):
            self.k[layer][slots] = k
            self.v[layer][slots] = v

    def row_kv(self, row: int, length: int) -> list[torch.Tensor]:
        slots = self.req_to_token[row, :length].long()
        return [torch.stack([self.k[l][slots], self.v[l][slots]]) for l in range(LAYERS)]


def _sequence(g, n):
    return [(torch.randn(n, H_KV, D, generator=g), torch.randn(n, H_KV, D, generator=g)) for _ in range(LAYERS)]


def _request(pool: Pool, row: int, seed: int, params: VaseParams, kept_prompt: int, ring: torch.Tensor):
    st = RequestState(params, seed=seed, rid=f"r{row}", prefill_len=kept_prompt, kept_prompt=kept_prompt,
                      ring_row=pool.device.ring.bind(row))
    pool.device.ring.buffer[st.ring_row] = ring
    pool.device.position_offset[row] = 5
    return st


class Tree:
    """``engine.step.Slots``: the pool's free list with a radix tree behind it. Tree slots whose only
    lock was released are evictable and handed out first (as SGLang's tree evicts to allocate)."""

    def __init__(self, pool: Pool):
        self.pool, self.evictable, self.freed = pool, [], []
        self.given: dict[int, torch.Tensor] = {}  # call number -> slots handed out

    def available(self) -> int:
        return self.pool.free.numel() + len(self.evictable)

    def alloc(self, count: int) -> torch.Tensor:
        reuse, self.evictable = self.evictable[:count], self.evictable[count:]
        out = torch.cat([torch.tensor(reuse, dtype=torch.int64), self.pool.take(count - len(reuse))])
        self.given[len(self.given)] = out
        return out

    def free(self, slots: torch.Tensor) -> None:
        self.freed += slots.tolist()


@dataclass
class TreeRequest(Request):
    """A request reading its first ``protected`` columns from the tree slots ``tree_slots`` under a
    tree lock; ``sole`` when no other request locks them (released, they become evictable)."""

    tree: Tree | None = None
    tree_slots: torch.Tensor | None = None
    sole: bool = False
    locked: bool = True

    def release_tree(self) -> bool:
        if not self.locked:
            return False
        self.locked = False
        if self.sole:
            self.tree.evictable += self.tree_slots.flip(0).tolist()  # another order: sources and targets overlap
        return True

    def restore_tree(self) -> None:
        self.locked = True
        if self.sole:
            mine = set(self.tree_slots.tolist())
            self.tree.evictable = [t for t in self.tree.evictable if t not in mine]


CASES = {  # (keep_prompt, kept prompt, tree columns, physical length n, fresh slots needed); K = 24
    "top-up": (False, 0, 20, 40, 12),  # 12 own candidates: 12 more targets
    "shared-tail": (False, 0, 37, 40, 29),  # no own candidate, 5 tree columns in the recency tail
    "own-targets": (False, 0, 12, 48, 0),  # 28 own candidates: kept tree tokens copied into them
    "keep-prompt": (True, 20, 20, 60, 0),  # the tree columns are kept_prompt: never candidates, no copy
    "keep-prompt-retracted": (True, 20, 30, 60, 2),  # re-prefilled prompt + output in the tree
}


@pytest.mark.parametrize("policy", ["vase", "snapkv", "streamingllm"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_shared_prefix_keeps_what_own_slots_keep(policy, case):
    """Two requests with the same tokens and settings evict in one batch: A owns all its slots, B reads
    its first columns from tree slots that a third row C shares. B keeps exactly A's tokens per
    (layer, head), its new row holds no tree slot but kept-prompt ones, it frees none, and the tree slots
    and row C are untouched."""
    keep_prompt, kept_prompt, protected, n, fresh_needed = CASES[case]
    seed = int.from_bytes(os.urandom(4), "little")
    params = VaseParams(policy=policy, budget=BUDGET, window=WINDOW, keep_prompt=keep_prompt)
    pool = Pool(seed)
    data = _sequence(pool.g, n)
    ring = torch.randn(pool.device.ring.buffer.shape[1:], generator=pool.g)
    a_slots, tree, b_own = pool.take(n), pool.take(protected), pool.take(n - protected)
    pool.fill(1, a_slots, data)
    pool.fill(2, torch.cat([tree, b_own]), data)
    pool.req_to_token[3, :protected] = tree.int()  # row C reads the same tree slots
    tree_kv = [(pool.k[l][tree].clone(), pool.v[l][tree].clone()) for l in range(LAYERS)]
    before_c = pool.req_to_token[3].clone()
    st_a, st_b = (_request(pool, row, 77, params, kept_prompt, ring) for row in (1, 2))
    assert Eviction(1, n, st_a).fresh_needed == 0 and Eviction(2, n, st_b, protected=protected).fresh_needed == fresh_needed
    slots = Tree(pool)
    a, b = Request(st_a, 1, n), TreeRequest(st_b, 2, n, protected, tree=slots, tree_slots=tree)

    result = step.evict_requests(step.due([a, b]), pool.kv, pool.device, slots)
    assert not result.failed and not result.deferred and result.evicted == [a, b], f"seed {seed}"
    length = st_a.geometry.evicted_length
    assert length == kept_prompt + BUDGET == a.length == b.length
    for got, want in zip(pool.row_kv(2, length), pool.row_kv(1, length)):
        assert torch.equal(got, want), f"seed {seed}: B's compacted KV differs from A's"
    new_b = set(pool.req_to_token[2, :length].tolist())
    freed = set(slots.freed)
    assert len(freed) == result.freed
    kept_tree = set(tree[:kept_prompt].tolist())
    assert new_b & set(tree.tolist()) == kept_tree and not freed & set(tree.tolist()), f"seed {seed}"
    # Every slot B owned or was given is in its new row or freed, not both.
    fresh = set(torch.cat(list(slots.given.values())).tolist()) if slots.given else set()
    assert len(fresh) == fresh_needed
    owned = set(b_own.tolist()) | fresh
    assert (new_b - kept_tree) | (freed & owned) == owned and not (new_b & freed)
    assert torch.equal(pool.req_to_token[3], before_c)
    for l in range(LAYERS):
        assert torch.equal(pool.k[l][tree], tree_kv[l][0]) and torch.equal(pool.v[l][tree], tree_kv[l][1])
    assert b.protected == min(protected, kept_prompt)  # the tree columns it still reads: kept_prompt ones
    assert b.locked == (protected <= kept_prompt)  # it released its tree lock if it stopped reading tree columns
    assert pool.device.position_offset[1] == pool.device.position_offset[2] == 5 + n - length


def test_fresh_slots_may_be_the_tree_slots_it_reads():
    """In the paper's mode a request releases its tree lock before its fresh slots are allocated, so
    the tree may hand back the very prefix slots it reads (if only it held them). Compaction gathers
    every source before writing: the result is still exactly the own-slots one."""
    seed = int.from_bytes(os.urandom(4), "little")
    params = VaseParams(policy="vase", budget=BUDGET, window=WINDOW)
    prompt, n = 37, 40
    pool = Pool(seed)
    data = _sequence(pool.g, n)
    ring = torch.randn(pool.device.ring.buffer.shape[1:], generator=pool.g)
    a_slots, tree, b_own = pool.take(n), pool.take(prompt), pool.take(n - prompt)
    pool.fill(1, a_slots, data)
    pool.fill(2, torch.cat([tree, b_own]), data)
    st_a, st_b = (_request(pool, row, 9, params, 0, ring) for row in (1, 2))
    slots = Tree(pool)
    b = TreeRequest(st_b, 2, n, prompt, tree=slots, tree_slots=tree, sole=True)
    result = step.evict_requests([Request(st_a, 1, n), b], pool.kv, pool.device, slots)
    assert len(result.evicted) == 2
    assert set(slots.given[0].tolist()) <= set(tree.tolist()), "the fresh slots were not the released tree slots"
    for got, want in zip(pool.row_kv(2, BUDGET), pool.row_kv(1, BUDGET)):
        assert torch.equal(got, want), f"seed {seed}"


def test_a_request_without_fresh_slots_is_deferred_untouched():
    seed = int.from_bytes(os.urandom(4), "little")
    params = VaseParams(policy="vase", budget=BUDGET, window=WINDOW)
    pool = Pool(seed)
    prompt, n = 20, 40
    pool.fill(2, torch.cat([pool.take(prompt), pool.take(n - prompt)]), _sequence(pool.g, n))
    st = _request(pool, 2, 1, params, 0, torch.randn(pool.device.ring.buffer.shape[1:], generator=pool.g))
    before = [x.clone() for x in pool.row_kv(2, n)]
    row = pool.req_to_token[2].clone()
    pool.free = pool.free[:0]  # no free slot, and the tree slots are shared: nothing to allocate
    req = TreeRequest(st, 2, n, prompt, tree=Tree(pool), tree_slots=row[:prompt].long())
    result = step.evict_requests(step.due([req]), pool.kv, pool.device, req.tree)
    assert result.deferred == [req] and not result.evicted and result.freed == 0
    assert req.locked and req.length == n and req.protected == prompt  # its tree lock taken back
    assert torch.equal(pool.req_to_token[2], row) and st.evictions == 0
    assert all(torch.equal(x, y) for x, y in zip(pool.row_kv(2, n), before))


def test_keep_prompt_trigger_and_bounds():
    """keep_prompt: the evictable length g = n - prompt triggers (g > B, g % R == 0) and drops to B;
    the footprint is prompt + B + R; admission charges the request B + R beyond a shared prompt."""
    params = VaseParams(policy="vase", budget=64, window=16, keep_prompt=True)
    st = RequestState(params, seed=0, rid="k", prefill_len=100, kept_prompt=100)
    assert [n for n in range(100, 300) if st.due(n)] == list(range(180, 300, 16))
    assert st.slot_bound() == 100 + 64 + 16 and st.geometry.evicted_length == 164
    assert Geometry(64, 16, 100).evictions_in(100, 100) == 2  # n = 180, 196 (the last step never evicts)
    # A shared 100-token prompt held by the tree: the request owns at most B + R.
    assert own_bound(st, protected=100) == 80
    assert admission_slots(st, fill=100, matched=99, remaining_output=1000, radix=True) == 80
    paper = RequestState(VaseParams(policy="vase", budget=64, window=16), seed=0, rid="p", prefill_len=100)
    # The paper's budget: max(P, B) + R without the radix cache ...
    assert admission_slots(paper, fill=100, matched=0, remaining_output=1000, radix=False) == 16
    # ... and with it: a prompt only it holds is released at its first eviction and may be reused ...
    assert future_slots(paper, 100, protected=100, remaining_output=1000, exclusive=100) == 16
    # ... a shared one is not: it then needs B + R of its own.
    assert future_slots(paper, 100, protected=100, remaining_output=1000, exclusive=0) == 80
    assert future_slots(paper, 100, protected=100, remaining_output=1000, exclusive=30) == 50


@pytest.mark.parametrize("policy, keep_prompt, prefill, expected", [
    ("vase", False, 93, 80),     # P % R = 13: the first window (at n = 96) starts at column 80
    ("snapkv", False, 81, 80),   # P % R = 1
    ("vase", False, 96, None),   # P % R = 0: the window (n = 112) holds decoded tokens only
    ("vase", False, 40, None),   # P <= B: first trigger at B + R
    ("vase", True, 93, None),    # keep_prompt: the window is past the kept prompt
    ("streamingllm", False, 93, None),  # scores without queries
])
def test_the_prefix_match_stops_where_the_first_query_window_starts(policy, keep_prompt, prefill, expected):
    """A cached prompt prefix must not cover positions whose queries the first eviction scores with
    (``patches/compute_max_prefix_len``); a request that never reaches its trigger is not capped."""
    params = VaseParams(policy=policy, budget=64, window=16, keep_prompt=keep_prompt)
    st = RequestState(params, seed=0, rid="c", prefill_len=prefill, kept_prompt=params.kept_prompt(prefill))
    assert st.first_window_start(remaining_new_tokens=100) == expected
    assert st.first_window_start(remaining_new_tokens=1) is None
    if expected is not None:  # the window the engine reads at its first trigger starts exactly there
        first = next(n for n in range(prefill, 400) if st.due(n))
        assert first - params.window == expected


def test_a_tree_slot_another_request_released_is_only_reused_after_it_was_read(monkeypatch):
    """B and C read their prompts from the tree; each releases its tree lock when it claims fresh
    slots, and the tree may hand B's released slots to C. C must not write them before B has read
    them: members that read tree slots claim and compact one at a time. (With the compaction's
    programs forced to 5, C's rows would otherwise run before B's rows of the same layer and head.)"""
    from sglang_vase.kernels import compaction

    monkeypatch.setattr(compaction, "num_programs", lambda rows, *args, **kwargs: min(rows, 5))
    seed = int.from_bytes(os.urandom(4), "little")
    params = VaseParams(policy="vase", budget=BUDGET, window=WINDOW)
    prompt, n = 37, 40
    pool = Pool(seed)
    ring = torch.randn(pool.device.ring.buffer.shape[1:], generator=pool.g)
    rows = {}  # name -> (row, data, tree slots)
    for name, row, twin in (("b", 2, 1), ("c", 3, 4)):
        data = _sequence(pool.g, n)
        pool.fill(twin, pool.take(n), data)  # a twin owning every slot: what the request must keep
        tree = pool.take(prompt)
        pool.fill(row, torch.cat([tree, pool.take(n - prompt)]), data)
        rows[name] = (row, twin, tree)
    states = {row: _request(pool, row, 3, params, 0, ring) for row in (1, 2, 3, 4)}
    slots = Tree(pool)
    running = [Request(states[1], 1, n), Request(states[4], 4, n)] + [
        TreeRequest(states[row], row, n, prompt, tree=slots, tree_slots=tree, sole=True) for row, _, tree in rows.values()]
    result = step.evict_requests(step.due(running), pool.kv, pool.device, slots)
    assert len(result.evicted) == 4 and not result.failed
    c_fresh = slots.given[1]  # B claims first (call 0), then C
    assert set(c_fresh.tolist()) & set(rows["b"][2].tolist()), "C was not handed B's released slots"
    for name in ("b", "c"):
        row, twin, _ = rows[name]
        for got, want in zip(pool.row_kv(row, BUDGET), pool.row_kv(twin, BUDGET)):
            assert torch.equal(got, want), f"seed {seed}: {name} kept other KV than its twin"
