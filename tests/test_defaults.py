"""SGLang's defaults stay on with eviction: the radix cache (prefix sharing) and the overlap scheduler.

A server with SGLang's defaults (what ``sglang_vase.launch_server`` starts) against one with both
turned off (the restricted setting eviction needed before), on the embedded model in fp32, under
SGLang's strict memory checks.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from sglang_vase.engine.geometry import Geometry
from sglang_vase.policies import POLICIES
from sglang_vase.serving import Server

pytestmark = pytest.mark.slow

BUDGET, WINDOW = 64, 16
# A pool that holds one 600-token prompt plus 16 requests' own B + R slots, not 16 unshared prompts.
POOL = 2600
FLAGS = ["--dtype", "float32", "--max-total-tokens", str(POOL), "--max-running-requests", "24", "--enable-metrics",
         "--decode-log-interval", "1", "--vase-budget", str(BUDGET), "--vase-window", str(WINDOW)]
EOS = 2  # the embedded model's <|im_end|>
STATS = ("evictions", "evicted_tokens", "peak_kv_len", "seed")
RESTRICTED = ["--disable-radix-cache", "--disable-overlap-schedule"]
SYSTEM = ("You are a patient mathematics tutor. You explain every step of a calculation, check each "
          "intermediate result twice, and finish with the answer on its own line. ") * 20


@pytest.fixture(scope="module")
def server():
    s = Server(FLAGS, strict_memory=True)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def restricted():
    s = Server(FLAGS + RESTRICTED, strict_memory=True)
    yield s
    s.stop()


def test_defaults_are_on(server, restricted):
    info = requests.get(f"{server.url}/get_server_info", timeout=30).json()
    assert not info["disable_radix_cache"] and not info["disable_overlap_schedule"]
    assert "--disable-radix-cache" not in server.cmd and "--disable-overlap-schedule" not in server.cmd


# Distinct first tokens: no prompt is a prefix hit of another, so both servers compute the same numbers.
# Each names its eviction seed (a derived one follows the request id, which differs between servers).
PARITY = [
    ("Alpha: count the primes below fifty.", dict(max_new_tokens=150, vase={"seed": 1})),  # may stop at EOS
    ("Bravo: describe a lighthouse at night.", dict(max_new_tokens=141, ignore_eos=True, vase={"seed": 2})),
    ("Charlie: list ten rivers.", dict(max_new_tokens=200, ignore_eos=True, vase={"seed": 3, "n_large": 4})),
    ("Delta: explain rain to a child.", dict(max_new_tokens=130, ignore_eos=True,
                                             vase={"seed": 4, "keep_prompt": True})),
    ("Echo: name the planets.", dict(max_new_tokens=130, ignore_eos=True, vase={"policy": "snapkv"})),
]  # Bravo's last step is a trigger (it does not evict); SGLang's seeded sampling differs between its loops


def test_radix_cache_and_overlap_scheduler_change_no_eviction(server, restricted):
    """The same greedy requests give the same tokens and the same eviction stats with SGLang's
    defaults as with both turned off (fp32): eviction is the same algorithm in both loops, beside the
    tree or not."""
    for text, kw in PARITY:
        got, want = server.generate(text, **kw), restricted.generate(text, **kw)
        assert got["output_ids"] == want["output_ids"], text
        keys = ("evictions", "evicted_tokens", "peak_kv_len")
        assert {k: got["meta_info"]["vase"][k] for k in keys} == {k: want["meta_info"]["vase"][k] for k in keys}
        out, prompt = len(got["output_ids"]), got["meta_info"]["prompt_tokens"]
        kept_prompt = prompt if kw.get("vase", {}).get("keep_prompt") else 0
        assert got["meta_info"]["vase"]["evictions"] == Geometry(BUDGET, WINDOW, kept_prompt).evictions_in(prompt, out) > 0


def test_a_stop_on_a_trigger_step_takes_its_eviction_back(server):
    """The overlap loop prepares step N + 1 before it learns that step N sampled a stop token: a
    request stopping right at a trigger is evicted for nothing, and its stats must not count it."""
    budget, window = 32, 8
    vase = {"seed": 9, "budget": budget, "window": window}
    for text in ("Foxtrot: write the numbers from one to two hundred.", "Golf: tell a story about a cat.",
                 "Hotel: a poem about the sea, in ten verses."):
        free = server.generate(text, max_new_tokens=200, ignore_eos=True, vase=vase)
        prompt, ids = free["meta_info"]["prompt_tokens"], free["output_ids"]
        # Output length m is sampled by the step at physical length prompt + m - 1. The run ignored
        # EOS: the stopping one must not meet an EOS before its stop token.
        last = ids.index(EOS) if EOS in ids else len(ids)
        stops = [m for m in range(2, last + 1) if (prompt + m - 1) > budget and (prompt + m - 1) % window == 0
                 and ids.index(ids[m - 1]) == m - 1 and Geometry(budget, window).evictions_in(prompt, m) > 0]
        if stops:
            break
    assert stops, "no token first appears on a trigger step; change the prompts"
    m = stops[0]
    counted = _evictions_counter(server)
    out = server.generate(text, max_new_tokens=200, stop_token_ids=[ids[m - 1]], vase=vase)
    assert out["output_ids"] == ids[:m]
    assert out["meta_info"]["vase"]["evictions"] == Geometry(budget, window).evictions_in(prompt, m)
    # The engine did evict at the stopping step (Prometheus counts the work done).
    assert _evictions_counter(server) - counted == out["meta_info"]["vase"]["evictions"] + 1


def _evictions_counter(server) -> float:
    metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("sglang:vase_evictions_total"))


def _post(server, body, results, key):
    r = requests.post(f"{server.url}/generate", json=body, timeout=1800)
    results[key] = r


def test_shared_system_prompt(server):
    """One 600-token system prompt: a first question, then n = 8 samples of a second and eight more
    questions at once. All but the first read the prompt from the radix tree (cached_tokens); the 16
    run at once on a pool that holds the prompt once plus their own B + R each, not 16 copies, with
    no retraction; a request without eviction on that prefix gives the same tokens before and after
    they all shared it (the tree's KV was never written); every slot and lock comes back."""
    probe = {"text": SYSTEM + "Question: what is 12 + 30?", "sampling_params": {
        "max_new_tokens": 48, "temperature": 0, "custom_params": {"vase": False}}}
    first = requests.post(f"{server.url}/generate", json={**probe, "sampling_params": {
        **probe["sampling_params"], "max_new_tokens": 200, "ignore_eos": True,
        "custom_params": {"vase": {}}}}, timeout=600).json()
    prompt = first["meta_info"]["prompt_tokens"]
    assert prompt >= 600 and first["meta_info"]["vase"]["evictions"] > 0
    before = requests.post(f"{server.url}/generate", json=probe, timeout=600).json()
    assert before["meta_info"]["cached_tokens"] > 0

    offset = server.log_offset()
    results: dict = {}
    sampling = {"max_new_tokens": 160, "ignore_eos": True, "temperature": 0.8}
    bodies = {"n8": {"text": SYSTEM + "Question: why is the sky blue?", "sampling_params": {**sampling, "n": 8}}}
    bodies |= {f"q{i}": {"text": SYSTEM + f"Question {i}: what is {i} times {i + 7}?", "sampling_params": sampling}
               for i in range(8)}
    threads = [threading.Thread(target=_post, args=(server, b, results, k)) for k, b in bodies.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outs = []
    for key, r in results.items():
        assert r.status_code == 200, r.text
        outs += r.json() if key == "n8" else [r.json()]
    assert len(outs) == 16
    for o in outs:
        meta = o["meta_info"]
        assert meta["cached_tokens"] >= 600, meta["cached_tokens"]
        assert meta["completion_tokens"] == 160 and meta["num_retractions"] == 0
        assert meta["vase"]["evictions"] == Geometry(BUDGET, WINDOW).evictions_in(meta["prompt_tokens"], 160)
        assert meta["vase"]["peak_kv_len"] <= max(meta["prompt_tokens"], BUDGET) + WINDOW
    assert 16 * (prompt + BUDGET + WINDOW) > POOL  # unshared prompts could not run at once ...
    assert server.max_running_requests(offset) == 16  # ... shared ones do
    after = requests.post(f"{server.url}/generate", json=probe, timeout=600).json()
    assert after["output_ids"] == before["output_ids"]
    time.sleep(3)  # idle: SGLang's idle check (free + cached + held == pool) runs
    assert server.used_tokens() == 0  # no slot and no tree lock left behind
    assert server.alive()


def test_keep_prompt_shares_the_prompt_for_the_whole_request(server):
    """keep_prompt: the prompt is never evicted and stays shared; B counts generated tokens, so the
    footprint is prompt + B + R and evictions follow the generated length."""
    sampling = {"max_new_tokens": 150, "ignore_eos": True, "temperature": 0.7,
                "custom_params": {"vase": {"keep_prompt": True}}}
    outs = requests.post(f"{server.url}/generate", json={
        "text": SYSTEM + "Question: how many legs do three spiders have?", "sampling_params": {**sampling, "n": 4}},
        timeout=900).json()
    for o in outs:
        meta = o["meta_info"]
        prompt = meta["prompt_tokens"]
        assert meta["cached_tokens"] >= 600
        assert meta["vase"]["keep_prompt"] is True
        assert meta["vase"]["evictions"] == Geometry(BUDGET, WINDOW, prompt).evictions_in(prompt, 150) > 0
        assert max(prompt, BUDGET) + WINDOW < meta["vase"]["peak_kv_len"] <= prompt + BUDGET + WINDOW
    time.sleep(3)
    assert server.used_tokens() == 0


# Prompt lengths past the budget whose first eviction's query window reaches back into the prompt
# (P % R != 0): 81 (P % R = 1) and 93 (P % R = R - 3).
CACHED_PROMPTS = (5 * WINDOW + 1, 6 * WINDOW - 3)
QUERY_POLICIES = sorted(name for name, cls in POLICIES.items() if cls.needs_queries)


def _token_prompt(seed: int, length: int) -> list[int]:
    """Distinct prompts of exact lengths: no prefix of one is cached when another is sent."""
    return torch.randint(1000, 40000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _send_all(server, bodies: dict) -> dict:
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = {k: pool.submit(requests.post, f"{server.url}/generate", json=b, timeout=900)
                   for k, b in bodies.items()}
    out = {}
    for k, f in futures.items():
        r = f.result()
        assert r.status_code == 200, r.text
        out[k] = r.json()
    return out


@pytest.mark.parametrize("prompt_len", CACHED_PROMPTS)
def test_a_cached_prompt_evicts_as_an_uncached_one(server, prompt_len):
    """The radix cache prefills only a prompt's uncached suffix, but the first eviction's query
    window covers the last P % R prompt positions: those are prefilled again, so every policy that
    scores with queries keeps the same tokens whether the prompt was cached or not (greedy, fp32)."""
    bodies = {name: {"input_ids": _token_prompt(100 * prompt_len + i, prompt_len), "sampling_params": {
        "max_new_tokens": 48, "ignore_eos": True, "temperature": 0, "custom_params": {"vase": {"policy": name,
                                                                                             "seed": 5}}}}
              for i, name in enumerate(QUERY_POLICIES)}
    cold, warm = _send_all(server, bodies), _send_all(server, bodies)
    window_start = prompt_len // WINDOW * WINDOW  # the first eviction (at the next multiple of R) reads from here
    assert [name for name in QUERY_POLICIES if warm[name]["output_ids"] != cold[name]["output_ids"]] == []
    for name in QUERY_POLICIES:
        c, w = cold[name]["meta_info"], warm[name]["meta_info"]
        assert c["cached_tokens"] == 0 and w["cached_tokens"] == window_start, (name, w["cached_tokens"])
        assert w["vase"]["evictions"] == c["vase"]["evictions"] == Geometry(BUDGET, WINDOW).evictions_in(prompt_len, 48)
        assert {k: w["vase"][k] for k in STATS} == {k: c["vase"][k] for k in STATS}, name


def test_parallel_samples_of_a_long_prompt_equal_a_single_request(server):
    """n > 1 prefills the prompt once and reads it from the tree for every sample: each sample evicts
    exactly as a single cold request with the same seed does."""
    prompt = _token_prompt(7, CACHED_PROMPTS[1])
    sampling = {"max_new_tokens": 48, "ignore_eos": True, "temperature": 0, "custom_params": {"vase": {"seed": 11}}}
    single = server.generate(input_ids=prompt, **{k: v for k, v in sampling.items() if k != "custom_params"},
                             vase=sampling["custom_params"]["vase"])
    assert single["meta_info"]["cached_tokens"] == 0
    many = _send_all(server, {"n": {"input_ids": prompt, "sampling_params": {**sampling, "n": 3}}})["n"]
    assert len(many) == 3
    for out in many:
        assert out["meta_info"]["cached_tokens"] > 0
        assert out["output_ids"] == single["output_ids"]
        assert {k: out["meta_info"]["vase"][k] for k in STATS} == {k: single["meta_info"]["vase"][k] for k in STATS}
