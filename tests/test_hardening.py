"""No request can crash or corrupt the server: request-time validation, failure isolation, beam
search, n > 1, final stats, and query-ring rows, on a real sglang-vase server (embedded model, CPU)
under SGLang's strict memory checks."""

from __future__ import annotations

import re
import threading
import time

import pytest
import requests

from sglang_vase.config import DEFAULT_WORKSPACE_MB
from sglang_vase.engine.hooks import FAULT_ENV
from sglang_vase.engine.geometry import Geometry
from sglang_vase.serving import Server

pytestmark = pytest.mark.slow

PROMPT = "Question: what is 17 * 23? Think step by step.\nAnswer:"
BUDGET, WINDOW = 64, 16
FLAGS = ["--max-total-tokens", "8192", "--max-running-requests", "16", "--enable-metrics", "--dtype", "float32",
         "--vase-budget", str(BUDGET), "--vase-window", str(WINDOW)]


@pytest.fixture(scope="module")
def server():
    # Eviction of requests whose id contains "fail-select" / "fail-apply" raises in that phase.
    s = Server(FLAGS, env={FAULT_ENV: "select:fail-select,apply:fail-apply"}, strict_memory=True)
    yield s
    s.stop()


def post(server, body, timeout=600):
    return requests.post(f"{server.url}/generate", json=body, timeout=timeout)


def body(max_new_tokens=120, vase=None, **sampling):
    sp = {"max_new_tokens": max_new_tokens, "ignore_eos": True, "temperature": 0, **sampling}
    if vase is not None:
        sp["custom_params"] = {"vase": vase}
    return {"text": PROMPT, "sampling_params": sp}


def still_serving(server):
    assert server.alive(), server.log()[-3000:]
    assert server.generate("ok?", max_new_tokens=4, ignore_eos=True)["meta_info"]["completion_tokens"] == 4


@pytest.mark.parametrize("sampling, extra, field", [
    ({"custom_params": {"vase": {"policy": "evict-large-v", "n_large": 17}}}, {}, "n_large"),
    ({"custom_params": "vase"}, {}, "custom_params"),
    ({"custom_params": {"vase": "on"}}, {}, "custom_params.vase"),
    ({"beam_width": 2}, {}, "beam_width"),
    ({}, {"custom_params": {"vase": {"budget": 32}}}, "sampling_params.custom_params"),
])
def test_invalid_requests_get_400_naming_the_field(server, sampling, extra, field):
    b = body(max_new_tokens=300)
    b["sampling_params"].update(sampling)
    b.update(extra)
    r = post(server, b)
    assert r.status_code == 400, r.text
    assert field in r.text
    still_serving(server)


def test_evict_large_v_at_its_limit_evicts(server):
    out = post(server, body(max_new_tokens=200, vase={"policy": "evict-large-v", "n_large": WINDOW})).json()
    assert out["meta_info"]["vase"]["evictions"] >= 5


def test_a_failing_eviction_aborts_only_its_request(server):
    """Two requests whose eviction raises (one in each phase) beside two that evict normally: the
    failing ones end with a 500 naming the failure, the others complete, the server keeps serving
    and every slot comes back."""
    results = {}

    def run(rid):
        b = {**body(max_new_tokens=160), "rid": rid}
        results[rid] = post(server, b)

    rids = [f"fail-select-{time.time_ns()}", f"fail-apply-{time.time_ns()}", f"ok-a-{time.time_ns()}",
            f"ok-b-{time.time_ns()}"]
    threads = [threading.Thread(target=run, args=(rid,)) for rid in rids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rid in rids[:2]:
        assert results[rid].status_code == 500, results[rid].text
        assert "KV eviction failed" in results[rid].text and "injected" in results[rid].text
    for rid in rids[2:]:
        assert results[rid].status_code == 200, results[rid].text
        meta = results[rid].json()["meta_info"]
        assert meta["completion_tokens"] == 160 and meta["vase"]["evictions"] >= 5
    time.sleep(3)  # idle: SGLang's idle memory check runs, the gauge settles
    assert server.used_tokens() == 0
    still_serving(server)


def test_parallel_samples_are_isolated(server):
    """n = 4 with one eviction seed, greedy: four independent rows, each evicting on its own, give
    exactly the single request's tokens (no sample reads another's KV; fp32, since bf16 batches of
    4 and 1 round differently even without eviction). Without a seed each sample derives its own."""
    vase = {"seed": 7}
    single = post(server, body(vase=vase)).json()
    many = post(server, body(vase=vase, n=4)).json()
    assert len(many) == 4
    for out in many:
        assert out["output_ids"] == single["output_ids"]
        assert out["meta_info"]["vase"]["evictions"] == single["meta_info"]["vase"]["evictions"] >= 3
    sampled = post(server, body(temperature=0.8, n=3)).json()
    assert len({o["meta_info"]["vase"]["seed"] for o in sampled}) == 3
    assert all(o["meta_info"]["completion_tokens"] == 120 for o in sampled)


# With the 20-token prompt, outputs 61 and 77 end on a trigger (the finishing step does not evict),
# 62 and 78 evict at the step before they finish.
@pytest.mark.parametrize("output", [61, 62, 77, 78, 97, 150])
def test_final_stats_count_every_eviction(server, output):
    """The last response reports the request's final eviction count and KV length."""
    out = post(server, body(max_new_tokens=output)).json()
    meta = out["meta_info"]
    prompt = meta["prompt_tokens"]
    assert meta["vase"]["evictions"] == Geometry(BUDGET, WINDOW).evictions_in(prompt, output), meta["vase"]
    assert meta["vase"]["peak_kv_len"] <= max(prompt, BUDGET) + WINDOW


def test_max_running_requests_caps_the_ring_memory_charged_to_the_kv_budget(server):
    """16 running requests need 16 ring rows: the budget the ring would take for a row per B + R
    tokens of the pool goes to the pool instead (the log shows what was charged)."""
    m = re.search(r"KV budget [0-9.]+ GiB -> [0-9.]+ GiB for the pool \(\d+ tokens\), ([0-9.]+) MiB for the query "
                  r"ring \(at most (\d+) rows \+ 1 scratch\)", server.log())
    assert m, server.log()[:5000]
    assert int(m[2]) == 16
    ring = re.search(r"query ring 16 rows \+ 1 scratch .* = ([0-9.]+) MiB", server.log())
    assert ring, server.log()[:5000]
    assert float(m[1]) == pytest.approx(DEFAULT_WORKSPACE_MB + float(ring[1]), abs=0.2)


def test_query_ring_rows_gate_only_requests_that_can_evict():
    """One ring row: requests that can reach their trigger run one at a time, while short requests
    (and eviction-disabled ones) need no row and run beside them."""
    s = Server(FLAGS + ["--vase-ring-rows", "1", "--decode-log-interval", "1"], strict_memory=True)
    try:
        assert "query ring 1 rows" in s.log()
        results, errors = [], []

        def run(b):
            try:
                r = post(s, b)
                r.raise_for_status()
                results.append(r.json())
            except Exception as e:  # noqa: BLE001 -- asserted below
                errors.append(e)

        long_reqs = [body(max_new_tokens=100) for _ in range(3)]  # each evicts at least twice (n = 80, 96, ...)
        short_reqs = [body(max_new_tokens=30) for _ in range(3)] + [body(max_new_tokens=100, vase=False)]
        threads = [threading.Thread(target=run, args=(b,)) for b in long_reqs + short_reqs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert all(r["meta_info"]["num_retractions"] == 0 for r in results)
        evicting = [r for r in results if r["meta_info"].get("vase", {}).get("evictions", 0) > 0]
        assert len(evicting) == 3
        assert 2 <= s.max_running_requests() <= 5  # one evicting at a time, the others beside it
        time.sleep(3)
        assert s.used_tokens() == 0
    finally:
        s.stop()
