"""Admission at equal KV memory: evicting requests run many more at once, with no retraction.

One small-pool server (1,200 slots, B = 64, R = 16) holds 5 full-length requests of ~15 prompt
and 220 output tokens; an evicting request holds at most max(prompt, B) + R = 80 slots, so 15 run
at once (3x), in the static mode and in pressure mode (the full cache while memory lasts, an
eviction instead of a retraction when it runs out). Other servers test the exactness of the
reservation (SGLang's clipped estimate) and a retraction that can never be re-admitted.
"""

from __future__ import annotations

import datetime
import re
import threading
import time

import pytest
import requests

from sglang_vase.serving import Server

pytestmark = pytest.mark.slow

PROMPT = "Tell me a long story about a lighthouse keeper."


# --- admission is exact for every B, R and prompt length (each fails without its fix) -------------

DECODE_TS_RE = re.compile(r"\[(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)[^\]]*\] Decode batch(?: \[\d+\])?, "
                          r"#running-req: (?P<running>\d+)")
SMALL = ["--max-running-requests", "16", "--decode-log-interval", "1",
         "--vase-budget", "64", "--vase-window", "16"]


def _run_all(server: Server, bodies: list[dict]) -> list[dict]:
    results, errors = [], []
    threads = []
    for b in bodies:
        def run(b=b):
            try:
                r = requests.post(f"{server.url}/generate", json=b, timeout=1800)
                r.raise_for_status()
                results.append(r.json())
            except Exception as e:  # noqa: BLE001 -- asserted below
                errors.append(e)
        threads.append(threading.Thread(target=run))
        threads[-1].start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def _request(text, max_new_tokens, vase=None):
    sp = {"max_new_tokens": max_new_tokens, "ignore_eos": True, "temperature": 0.7}
    if vase is not None:
        sp["custom_params"] = {"vase": vase}
    return {"text": text, "sampling_params": sp}


def test_reservation_is_not_clipped():
    """SGLang clips every request's future-token estimate at SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION
    (4096; 32 here so that small budgets show it). An evicting request still reserves its whole
    bound max(prompt, B) + R: on a pool for 4 bounds, 4 run at once and none is retracted."""
    budget, window = 128, 32
    pool = 4 * (budget + window) + 40
    # Ring rows would cap the concurrency at pool // (B + R) as well: lift them to test the memory.
    server = Server(["--max-total-tokens", str(pool), "--max-running-requests", "16", "--decode-log-interval", "1",
                     "--vase-budget", str(budget), "--vase-window", str(window), "--vase-ring-rows", "16"],
                    env={"SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION": "32"}, strict_memory=True)
    try:
        # One batch request: all eight reach the same admission round, where the clip would let
        # them all in at once (each reserving prompt + 32).
        batch = _request([f"{PROMPT} ({i})" for i in range(8)], 200)
        r = requests.post(f"{server.url}/generate", json=batch, timeout=1800)
        r.raise_for_status()
        results = r.json()
        assert len(results) == 8
        assert all(r["meta_info"]["num_retractions"] == 0 for r in results)
        assert all(r["meta_info"]["completion_tokens"] == 200 for r in results)
        assert server.max_running_requests() == 4
    finally:
        server.stop()


@pytest.fixture(scope="module")
def small_pool():
    # fp32: the pressure-mode test compares greedy tokens with the full cache's across requests
    server = Server(["--max-total-tokens", "1200", *SMALL, "--dtype", "float32"], strict_memory=True)
    yield server
    server.stop()


def test_long_prompt_reserves_only_b_plus_r_after_its_first_eviction(small_pool):
    """A ~270-token prompt with B = 64 reserves prompt + R until it first evicts (a few steps in),
    then only B + R. On a 1200-slot pool four are admitted first and the fifth right after those
    evict; reserving prompt + R for their whole life would admit it only once one of the first four
    had finished."""
    long_prompt = " ".join(["The lighthouse keeper counted the ships that passed."] * 30)
    offset = small_pool.log_offset()
    t0 = time.time()
    results = _run_all(small_pool, [_request(f"{long_prompt} ({i})", 600) for i in range(5)])
    t1 = time.time()
    prompt = results[0]["meta_info"]["prompt_tokens"]
    assert 250 <= prompt <= 330, prompt
    assert all(r["meta_info"]["num_retractions"] == 0 for r in results)
    five = [m for m in DECODE_TS_RE.finditer(small_pool.log(offset)) if int(m.group("running")) >= 5]
    assert five, "never ran five at once"
    first = datetime.datetime.strptime(five[0].group("ts"), "%Y-%m-%d %H:%M:%S").timestamp()
    assert first - t0 < 0.4 * (t1 - t0), f"five running only after {first - t0:.0f}s of {t1 - t0:.0f}s"


def test_eviction_disabled_ignore_eos_request_is_not_blocked(small_pool):
    """SGLang admits a fixed-length (ignore_eos) request by simulating every running request's whole
    remaining output; evicting requests with thousands of tokens to go must not block it (they hold
    at most B + R each)."""
    offset = small_pool.log_offset()
    long_rids = [f"long-{i}-{time.time_ns()}" for i in range(3)]
    threads = [threading.Thread(target=lambda rid=rid: requests.post(
        f"{small_pool.url}/generate", json={**_request(PROMPT, 3000), "rid": rid}, timeout=1800)) for rid in long_rids]
    for t in threads:
        t.start()
    try:
        while small_pool.max_running_requests(offset) < 3:
            time.sleep(0.5)
        t0 = time.time()
        out = small_pool.generate(PROMPT, max_new_tokens=32, vase=False, ignore_eos=True, temperature=0.7,
                                  timeout=300)
        waited = time.time() - t0
        assert out["meta_info"]["completion_tokens"] == 32 and "vase" not in out["meta_info"]
        assert waited < 60, f"the eviction-disabled request waited {waited:.0f}s behind the evicting ones"
    finally:
        for rid in long_rids:
            requests.post(f"{small_pool.url}/abort_request", json={"rid": rid}, timeout=10)
        for t in threads:
            t.join()
    assert small_pool.alive()


def test_retracted_request_too_long_to_reprefill_is_aborted():
    """A retracted evicting request re-prefills prompt + output uncompressed. Once that exceeds the
    pool it can never be re-admitted: it is answered (503, with the reason) instead of waiting
    forever, and the other request completes."""
    # Retracted at step 330, a request needs prompt + 330 > 300 slots to re-prefill; the pool holds
    # both requests' bounds max(prompt, B) + R = 80 at once.
    server = Server(["--max-total-tokens", "300", *SMALL, "--dtype", "bfloat16"], strict_memory=True,
                    env={"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "330"})
    try:
        codes, texts = [], []

        def run(i):
            r = requests.post(f"{server.url}/generate", json=_request(f"{PROMPT} ({i})", 400), timeout=1800)
            codes.append(r.status_code)
            texts.append(r.text)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes) == [200, 503], texts
        assert "re-prefilling prompt + output" in texts[codes.index(503)]
        assert server.alive()
    finally:
        server.stop()


# --- pressure mode: the full cache while memory lasts, an eviction instead of a retraction ------

def test_pressure_mode_at_low_load_is_the_full_cache(small_pool):
    """The pool holds the request at full length: no eviction, the full cache's exact tokens."""
    prompt = "Question: what is 17 * 23? Think step by step.\nAnswer:"
    pressed = small_pool.generate(prompt, max_new_tokens=200, ignore_eos=True, vase={"mode": "pressure"})
    full = small_pool.generate(prompt, max_new_tokens=200, ignore_eos=True, vase=False)
    assert pressed["meta_info"]["vase"]["evictions"] == 0 and pressed["meta_info"]["vase"]["mode"] == "pressure"
    assert pressed["output_ids"] == full["output_ids"]


def test_without_eviction_the_same_pool_runs_a_third(small_pool):
    """The contrast: 16 requests with eviction off ({"vase": false}: SGLang's own admission, which
    reserves an ignore_eos request's whole output) run at most 5 at once on the same pool."""
    offset = small_pool.log_offset()
    rids = [f"plain-{i}-{time.time_ns()}" for i in range(16)]
    threads = [threading.Thread(target=lambda i=i: requests.post(f"{small_pool.url}/generate", timeout=600, json={
        **_request(f"Story {i}: once upon a time a robot named R{i}", 220, vase=False), "rid": rids[i]}))
        for i in range(16)]
    for t in threads:
        t.start()
    try:
        time.sleep(20)  # admission settles within a few steps; the run itself proves nothing more
        running = small_pool.max_running_requests(offset)
    finally:
        for rid in rids:
            requests.post(f"{small_pool.url}/abort_request", json={"rid": rid}, timeout=10)
        for t in threads:
            t.join()
    assert 1 <= running <= 5, running
    assert small_pool.alive()


def test_pressure_mode_at_high_load_evicts_instead_of_retracting(small_pool):
    """16 requests, half static and half in pressure mode, whose full length (16 x ~235) is far
    beyond the 1,200-slot pool but whose slot bounds (16 x 80) nearly fit: the shortage forces the
    pressure-mode ones to evict (only when forced, growing again in between), nobody is retracted,
    and as many run at once as the bounds allow (1200 // 80 = 15)."""
    offset = small_pool.log_offset()
    modes = ["static", "pressure"] * 8
    results = _run_all(small_pool, [{**_request(f"Story {i}: once upon a time a robot named R{i}", 220,
                                                vase={"mode": mode}), "rid": f"press-{i}-{time.time_ns()}"}
                                    for i, mode in enumerate(modes)])
    log = small_pool.log(offset)
    assert "Retract" not in log, log[-3000:]
    assert all(r["meta_info"]["completion_tokens"] == 220 and r["meta_info"]["num_retractions"] == 0 for r in results)
    by_mode = {m: [r["meta_info"]["vase"] for r in results if r["meta_info"]["vase"]["mode"] == m] for m in set(modes)}
    assert len(by_mode["pressure"]) == len(by_mode["static"]) == 8
    forced = [v["forced_evictions"] for v in by_mode["pressure"]]
    assert sum(forced) > 0 and all(v["evictions"] == v["forced_evictions"] for v in by_mode["pressure"])
    assert all(v["forced_evictions"] == 0 for v in by_mode["static"])
    assert max(v["peak_kv_len"] for v in by_mode["pressure"]) > 80  # some held a full cache past the bound
    assert small_pool.max_running_requests(offset) >= 15
    assert small_pool.alive()
