"""The engine's eviction round (``engine/evictor.py``, ``engine/selection.select_keep``) with the
policies of the fidelity issue: vase-adaptive, vase-random-slots, random (now with sinks) and
random-nosink. They run ``tests/test_evictor.py``'s checks unchanged (kernel path vs torch path,
workspace splits, rank-local heads, definitions by position over many evictions), on pools whose
values hold outliers (every 17th slot's values x 50), so that vase-adaptive pins more than the
sinks and its median test runs on the kernel's value range.
"""

from __future__ import annotations

import pytest

import test_evictor as ev

NEW = ["vase-adaptive", "vase-random-slots", "random", "random-nosink"]
OUTLIER_EVERY = 17


@pytest.fixture
def outlier_pools(monkeypatch):
    make = ev.make_engine

    def make_with_outliers(*args, **kwargs):
        k_bufs, v_bufs, req_to_token, device = make(*args, **kwargs)
        for v in v_bufs:
            v[::OUTLIER_EVERY] *= 50.0
        return k_bufs, v_bufs, req_to_token, device

    monkeypatch.setattr(ev, "make_engine", make_with_outliers)


@pytest.mark.parametrize("policy", NEW)
def test_kernel_path_keeps_what_the_torch_path_keeps(policy, monkeypatch, outlier_pools):
    ev.test_kernel_path_keeps_what_the_torch_path_keeps(policy, monkeypatch)


@pytest.mark.parametrize("policy", NEW)
def test_workspace_bound_splits_without_changing_the_result(policy, outlier_pools):
    ev.test_workspace_bound_splits_without_changing_the_result(policy)


@pytest.mark.parametrize("policy", NEW)
def test_rank_local_heads_keep_what_one_process_keeps(policy):
    ev.test_rank_local_heads_keep_what_one_process_keeps(policy)


@pytest.mark.parametrize("sort_kept", [False, True])
@pytest.mark.parametrize("policy", ["vase-adaptive", "vase-random-slots", "random"])
def test_sinks_kept_over_many_evictions(policy, sort_kept):
    ev.test_positional_policies_over_many_evictions(policy, sort_kept)


def test_adaptive_pins_the_outliers_in_the_engine():
    """Three candidates of each request get outlier values; after one round every (layer, KV head)
    of each request still holds them (cap n_large = 8 = 4 sinks + 4): they were pinned, not left to
    the attention draw."""
    import os

    from sglang_vase.config import VaseParams
    from sglang_vase.engine.evictor import Eviction, evict

    seed = int.from_bytes(os.urandom(4), "little")
    budget, window, n, rows = 32, 8, 48, [1, 3]
    params = VaseParams(policy="vase-adaptive", budget=budget, window=window)
    k_bufs, v_bufs, req_to_token, device = ev.make_engine(seed, n, budget, window, rows)
    old_rows = req_to_token.clone()
    outliers = {r: old_rows[r, [10, 20, 30]].long() for r in rows}
    for v in v_bufs:
        for slots in outliers.values():
            v[slots] *= 50.0
    old_v = [v.clone() for v in v_bufs]
    due = [Eviction(row=r, length=n, state=st) for r, st in zip(rows, ev._states(params, rows, device, n))]
    assert not evict(due, req_to_token, k_bufs, v_bufs, device).failed
    k = budget - window
    for r in rows:
        for layer in range(ev.LAYERS):
            kept = v_bufs[layer][req_to_token[r, :k].long()]  # [K, H, D]
            for h in range(ev.H_KV):
                for slot in outliers[r].tolist():
                    assert (kept[:, h] == old_v[layer][slot, h]).all(-1).any(), f"seed {seed}: outlier evicted"
