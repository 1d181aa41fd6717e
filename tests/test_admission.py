"""Admission at equal KV memory: evicting requests run many more at once, with no retraction.

A pool that fits N = 4 full-length requests (prompt + 512 output tokens). With VaSE at
B = 128 (a quarter of the output), R = 16, each request holds at most max(prompt, B) + R slots,
so more than 3N run at once; plain SGLang on the same pool cannot.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests

from sglang_vase.serving import Server

pytestmark = pytest.mark.slow

OUTPUT = 512
PROMPT = "Tell me a long story about a lighthouse keeper."
N_FULL = 4
POOL = N_FULL * (OUTPUT + 40)  # prompt (~30 tokens with BOS) + output per full request
FLAGS = ["--max-total-tokens", str(POOL), "--max-running-requests", "24", "--decode-log-interval", "1",
         "--dtype", "bfloat16"]


def _send(server: Server, n: int, results: list, errors: list) -> list[threading.Thread]:
    def run(i):
        try:
            r = requests.post(f"{server.url}/generate", timeout=1800, json={
                "text": f"{PROMPT} ({i})", "rid": f"adm-{server.port}-{i}",
                "sampling_params": {"max_new_tokens": OUTPUT, "ignore_eos": True, "temperature": 0.7}})
            r.raise_for_status()
            results.append(r.json())
        except Exception as e:  # noqa: BLE001 -- asserted by the caller
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def test_more_than_3n_concurrent_without_retraction():
    n_requests = 3 * N_FULL + 2
    vase = Server(FLAGS + ["--vase-budget", "128", "--vase-window", "16"], strict_memory=True)
    try:
        results, errors = [], []
        for t in _send(vase, n_requests, results, errors):
            t.join()
        assert not errors, errors
        assert len(results) == n_requests
        assert all(r["meta_info"]["num_retractions"] == 0 for r in results)
        assert all(r["meta_info"]["completion_tokens"] == OUTPUT for r in results)
        vase_running = vase.max_running_requests()
        assert vase_running > 3 * N_FULL, vase_running
    finally:
        vase.stop()

    # Plain SGLang, same pool and workload: observe how many it runs at once, then stop early.
    plain = Server(FLAGS + ["--disable-overlap-schedule"], vase=False, strict_memory=True)
    try:
        results, errors = [], []
        threads = _send(plain, n_requests, results, errors)
        time.sleep(60)  # long enough for admission to settle; then stop the run
        requests.post(f"{plain.url}/abort_request", json={"abort_all": True}, timeout=10)
        for t in threads:
            t.join()
        plain_running = plain.max_running_requests()
        assert plain_running <= N_FULL + 1 or "retract" in plain.log().lower(), plain_running
        assert plain_running < vase_running
    finally:
        plain.stop()
