"""Geometry's closed forms against the decode loop they summarise, step by step."""

import random

import pytest

from sglang_vase.engine.geometry import Geometry


def _decode(geometry: Geometry, prefill: int, new_tokens: int) -> tuple[list[int], int]:
    """The engine's loop: the prefill samples token 1; decode step k (k = 1..new_tokens-1) writes
    token k at physical length n and evicts if n triggers and the request goes on (k < new_tokens - 1
    means the step did not sample the last token). Returns (lengths that evicted, peak length)."""
    n, peak, evicted = prefill, prefill, []
    for k in range(1, new_tokens):
        n += 1
        peak = max(peak, n)
        if geometry.triggers(n) and k < new_tokens - 1:
            evicted.append(n)
            n = geometry.evicted_length
    return evicted, peak


@pytest.mark.parametrize("seed", range(4))
def test_closed_forms_match_the_decode_loop(seed):
    rng = random.Random(seed)
    for _ in range(300):
        window = rng.choice([1, 4, 8, 16])
        budget = window * rng.randint(2, 8)
        prefill = rng.randint(1, 3 * budget)
        kept_prompt = rng.choice([0, prefill])  # keep_prompt pins the whole prompt
        geometry = Geometry(budget, window, kept_prompt)
        new_tokens = rng.randint(1, 6 * budget)
        evicted, peak = _decode(geometry, prefill, new_tokens)
        assert geometry.evictions_in(prefill, new_tokens) == len(evicted)
        if evicted:
            assert evicted[0] == geometry.next_trigger(prefill)
            assert all(n == geometry.evicted_length + window for n in evicted[1:])
        assert peak <= geometry.slot_bound(prefill)
        if evicted:
            assert geometry.slot_bound(prefill, evicted=True) == kept_prompt + budget + window
        # A running request at length n sampling `remaining` more tokens: its steps reach n + 1 ..
        # n + remaining - 1 before the one that samples the last token.
        n, remaining = geometry.evicted_length + rng.randint(0, window - 1), rng.randint(1, 4 * window)
        assert geometry.will_evict(n, remaining) == any(geometry.triggers(n + k) for k in range(1, remaining))


def test_keep_prompt_counts_the_budget_after_the_prompt():
    geometry = Geometry(budget=64, window=16, kept_prompt=100)
    assert not geometry.triggers(164) and geometry.triggers(180) and not geometry.triggers(172)
    assert geometry.n_keep == 48 and geometry.evicted_length == 164
    assert geometry.slot_bound(100) == 180 and geometry.next_trigger(100) == 180
