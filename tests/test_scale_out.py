"""Scale-out on SGLang's own engine, on CPU: ``--dp-size 2`` (two schedulers, each with its own
query ring and offsets, behind one endpoint) and two sglang-vase servers behind sglang-router."""

from __future__ import annotations

import concurrent.futures as cf
import re

import pytest
import requests

from sglang_vase.engine.geometry import Geometry
from sglang_vase.serving import Router, Server

pytestmark = pytest.mark.slow

PROMPT = "Question: what is 17 * 23? Think step by step.\nAnswer:"
BUDGET, WINDOW = 64, 16
FLAGS = ["--max-total-tokens", "4096", "--max-running-requests", "8", "--vase-budget", str(BUDGET),
         "--vase-window", str(WINDOW)]


def test_data_parallel_ranks_each_evict():
    # The launcher's own per-rank threads, whatever OMP_NUM_THREADS the test run set for itself.
    server = Server(FLAGS + ["--dp-size", "2"], env={"OMP_NUM_THREADS": None}, strict_memory=True, timeout=600)
    try:
        log = server.log()
        assert "SGLANG_CPU_OMP_THREADS_BIND=" in log and "OMP_NUM_THREADS=1" in log
        for rank in (0, 1):  # every scheduler loaded the plugin and sized its own ring
            assert re.search(rf"DP{rank}\].*query ring \d+ rows", log), log[-3000:]

        def generate(rank):
            body = {"text": f"{PROMPT} ({rank})", "routed_dp_rank": rank,
                    "sampling_params": {"max_new_tokens": 120, "ignore_eos": True, "temperature": 0}}
            r = requests.post(f"{server.url}/generate", json=body, timeout=600)
            r.raise_for_status()
            return r.json()["meta_info"]

        with cf.ThreadPoolExecutor(4) as pool:
            metas = list(pool.map(generate, [0, 1, 0, 1]))
        for meta in metas:
            assert meta["vase"]["evictions"] == Geometry(BUDGET, WINDOW).evictions_in(meta["prompt_tokens"], 120) > 0
            assert meta["vase"]["peak_kv_len"] <= max(meta["prompt_tokens"], BUDGET) + WINDOW
        log = server.log()
        for rank in (0, 1):
            assert re.search(rf"DP{rank}\] Decode batch", log), f"rank {rank} decoded nothing"
        r = requests.post(f"{server.url}/generate", timeout=60, json={
            "text": PROMPT, "sampling_params": {"max_new_tokens": 8, "custom_params": {"vase": {"budget": 3}}}})
        assert r.status_code == 400 and "budget" in r.text
        assert server.alive()
    finally:
        server.stop()


def test_router_in_front_of_two_servers():
    """Per-request settings reach the workers through the router's /v1/completions (top-level
    ``custom_params``), both workers serve, stats come back in ``metadata["vase"]``, and a bad
    request is still our 400."""
    one_core = {"OMP_NUM_THREADS": "1"}
    workers = [Server(FLAGS, env=one_core, wait=False, strict_memory=True) for _ in range(2)]
    router = None
    try:
        for w in workers:
            w.wait_ready(600)
        router = Router([w.url for w in workers], ["--policy", "round_robin", "--disable-circuit-breaker"])

        def complete(i, vase):
            return requests.post(f"{router.url}/v1/completions", timeout=600, json={
                "model": "default", "prompt": f"{PROMPT} ({i})", "max_tokens": 100, "temperature": 0,
                "ignore_eos": True, "custom_params": {"vase": vase}})

        with cf.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: complete(i, {"budget": 32, "window": 16}), range(6)))
        for r in answers:
            assert r.status_code == 200, r.text
            body = r.json()
            stats = body["metadata"]["vase"]
            assert len(stats) == 1 and stats[0]["budget"] == 32, stats  # the request's budget, not the server's
            expected = Geometry(32, 16).evictions_in(body["usage"]["prompt_tokens"], 100)
            assert stats[0]["evictions"] == expected > 0
        for w in workers:
            assert w.log().count("POST /v1/completions") >= 2, "round robin skipped a worker"

        bad = complete(0, {"budget": 3})
        assert bad.status_code == 400 and "budget" in bad.text

        # sglang-router 0.3.2 re-serialises /generate into typed fields and drops
        # sampling_params.custom_params: there the server's defaults apply (README, scale out).
        r = requests.post(f"{router.url}/generate", timeout=600, json={
            "text": PROMPT, "sampling_params": {"max_new_tokens": 100, "ignore_eos": True, "temperature": 0,
                                                "custom_params": {"vase": {"budget": 32, "window": 16}}}})
        assert r.status_code == 200, r.text
        assert r.json()["meta_info"]["vase"]["budget"] == BUDGET, "the router now forwards custom_params: update the README"
        for w in workers:
            assert w.alive()
    finally:
        if router is not None:
            router.stop()
        for w in workers:
            w.stop()
