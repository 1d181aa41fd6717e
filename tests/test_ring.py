"""The query ring on its own: rows bound and released, the forward's writes (a prefill keeps only
each request's last R queries, everything else lands in the scratch row), and the window the
evictor reads back, against a plain Python record of the same writes."""

from __future__ import annotations

import pytest
import torch

from sglang_vase.engine.ring import QueryRing

LAYERS, WINDOW, H_Q, D = 2, 4, 3, 5


def test_rows_are_bound_until_none_is_free_and_come_back():
    ring = QueryRing(pool_rows=6, rows=2, layers=LAYERS, window=WINDOW, q_heads=H_Q, head_dim=D,
                     dtype=torch.float32, device="cpu")
    assert ring.free_rows() == 2
    a, b = ring.bind(3), ring.bind(5)
    assert sorted([a, b]) == [1, 2] and ring.free_rows() == 0
    assert ring.bind(4) == 0  # none free: the caller aborts, never shares a row
    assert ring.row_of.tolist() == [0, 0, 0, a, 0, b]
    ring.release(3, a)
    ring.release(4, 0)  # a request that held none releases nothing
    assert ring.row_of.tolist() == [0, 0, 0, 0, 0, b] and ring.free_rows() == 1
    assert ring.bind(4) == a


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefill_then_decode_keeps_each_requests_last_window(seed):
    g = torch.Generator().manual_seed(seed)
    ring = QueryRing(pool_rows=8, rows=3, layers=LAYERS, window=WINDOW, q_heads=H_Q, head_dim=D,
                     dtype=torch.float32, device="cpu")
    # Three requests in one extend batch: one holds no ring row (it writes to the scratch row only).
    rows = torch.tensor([2, 5, 7])
    ring_rows = {2: ring.bind(2), 5: ring.bind(5)}
    prefix = torch.tensor([0, 3, 1])  # cached prefix: the extend starts there
    extend = torch.randint(1, 9, (3,), generator=g)
    seq_lens = prefix + extend
    positions = torch.cat([torch.arange(p, s) for p, s in zip(prefix.tolist(), seq_lens.tolist())])
    want = {}  # (ring row, layer, slot) -> query
    for layer in range(LAYERS):
        q = torch.randn(int(extend.sum()), H_Q, D, generator=g)
        ring.record_extend(layer, rows, seq_lens, extend, positions, q)
        i = 0
        for row, p, s in zip(rows.tolist(), prefix.tolist(), seq_lens.tolist()):
            for pos in range(p, s):
                if row in ring_rows and pos >= s - WINDOW:
                    want[(ring_rows[row], layer, pos % WINDOW)] = q[i]
                i += 1
    # Decode steps of the two ring holders.
    lasts = seq_lens[:2].clone()
    for _ in range(int(torch.randint(1, 7, (), generator=g))):
        for layer in range(LAYERS):
            q = torch.randn(2, H_Q, D, generator=g)
            ring.record_decode(layer, rows[:2], lasts, q)
            for j, row in enumerate(rows[:2].tolist()):
                want[(ring_rows[row], layer, int(lasts[j]) % WINDOW)] = q[j]
        lasts += 1
    for (r, layer, slot), q in want.items():
        assert torch.equal(ring.buffer[r, layer, slot], q)
    # The evictor's read: slots of the last R tokens, newest first, the same in every layer.
    slots = ring.window_slots(lasts - 1, WINDOW)
    assert slots.tolist() == [[(int(l) - 1 - k) % WINDOW for k in range(WINDOW)] for l in lasts]
    view = ring.view(range(1, 2), slice(1, 3))
    assert view.shape == (4, 1, WINDOW, 2, D) and view.data_ptr() == ring.buffer[:, 1:2, :, 1:3].data_ptr()
    # Unbound rows (3 of them in the pool) were never written; the scratch row absorbed the rest.
    held = set(ring_rows.values())
    for r in range(1, 4):
        if r not in held:
            assert not ring.buffer[r].any()
