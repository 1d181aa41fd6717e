"""sglang-vase inside a real SGLang server on the embedded SmolLM2 model (CPU, torch_native).

One plain SGLang server and one sglang-vase server (fp32, so that logits can be compared tightly),
both under SGLang's strict memory checks; every test leaves them serving.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch

from sglang_vase.engine.geometry import Geometry
from sglang_vase.serving import Server

pytestmark = pytest.mark.slow

PROMPT = "Question: what is 17 * 23? Think step by step.\nAnswer:"
COMMON = ["--dtype", "float32", "--max-total-tokens", "16384", "--max-running-requests", "24"]


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("vase-trace"))


@pytest.fixture(scope="module")
def vase_server(trace_dir):
    server = Server(COMMON + ["--vase-budget", "128", "--vase-window", "32", "--enable-metrics"],
                    env={"SGLANG_VASE_TRACE_DIR": trace_dir}, strict_memory=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain_server():
    server = Server(COMMON, vase=False, strict_memory=True)
    yield server
    server.stop()


def test_budget_above_length_is_plain_sglang(vase_server, plain_server):
    """Eviction that never triggers changes nothing: token-identical greedy output."""
    prompts = [PROMPT, "Write a haiku about the sea.", "List three prime numbers:"]
    for prompt in prompts:
        want = plain_server.generate(prompt, max_new_tokens=96)
        got = vase_server.generate(prompt, max_new_tokens=96, vase={"budget": 4096, "window": 32})
        assert got["output_ids"] == want["output_ids"], prompt
        assert got["meta_info"]["vase"]["evictions"] == 0
    # Opting out per request is plain SGLang too.
    got = vase_server.generate(PROMPT, max_new_tokens=96, vase=False)
    assert got["output_ids"] == plain_server.generate(PROMPT, max_new_tokens=96)["output_ids"]
    assert "vase" not in got["meta_info"]


@pytest.mark.parametrize("keep_prompt", [False, True])
def test_evictions_match_the_reference_replay(vase_server, trace_dir, keep_prompt):
    """SnapKV at B=64, R=16 over 300 steps: SGLang's per-head compaction with true positions gives
    the logits of the plain-PyTorch reference applying the same keep sets (fp32 both); with
    keep_prompt the prompt's columns stay and B counts the tokens after them, in both."""
    from transformers import AutoTokenizer

    from sglang_vase.models import prepare_default_model
    from sglang_vase.policies import get_policy
    from sglang_vase.reference.engine_trace import replay_engine_trace
    from sglang_vase.reference.replay import load_model

    budget, window, steps = 64, 16, 300
    prompt_ids = AutoTokenizer.from_pretrained(prepare_default_model())(PROMPT).input_ids
    out = vase_server.generate(None, max_new_tokens=steps, ignore_eos=True,
                               vase={"policy": "snapkv", "budget": budget, "window": window,
                                     "keep_prompt": keep_prompt},
                               extra={"input_ids": prompt_ids, "return_logprob": True, "top_logprobs_num": 5})
    assert len(out["output_ids"]) == steps
    got = replay_engine_trace(load_model(prepare_default_model(), dtype=torch.float32),
                              get_policy("snapkv", budget=budget, window=window), prompt_ids, out, trace_dir,
                              keep_prompt=keep_prompt)
    kept_prompt = len(prompt_ids) if keep_prompt else 0
    expected = Geometry(budget, window, kept_prompt).evictions_in(len(prompt_ids), steps)
    assert out["meta_info"]["vase"]["evictions"] == got.traces == got.evictions == expected >= 10
    assert got.first_mismatch is None, f"greedy token differs at step {got.first_mismatch}"
    assert got.max_logprob_error < 2e-3, got
    # fp32 noise between the two stacks may flip a near-tie in a few of the 30 layers' top-k.
    assert got.keep_agreement >= 0.9, got


def test_memory_bound_with_concurrency_and_aborts(vase_server):
    """B=128, R=32, 16 concurrent 320-token outputs plus 4 aborted mid-flight: nobody exceeds
    max(prompt,B)+R, the strict memory checks hold throughout, and every slot comes back."""
    results, errors = {}, []

    def run(key, body):
        try:
            r = requests.post(f"{vase_server.url}/generate", json=body, timeout=900)
            r.raise_for_status()
            results[key] = r.json()
        except Exception as e:  # noqa: BLE001 -- collected and asserted below
            errors.append((key, e))

    def body(i, rid=None):
        sp = {"max_new_tokens": 320, "ignore_eos": True, "temperature": 0.8,
              "custom_params": {"vase": {"budget": 128, "window": 32, "seed": i}}}
        return {"text": f"{PROMPT} ({i})", "sampling_params": sp, **({"rid": rid} if rid else {})}

    threads = [threading.Thread(target=run, args=(i, body(i))) for i in range(16)]
    threads += [threading.Thread(target=run, args=(f"abort-{i}", body(100 + i, rid=f"abort-{i}-{os.getpid()}")))
                for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(20)
    for i in range(4):
        requests.post(f"{vase_server.url}/abort_request", json={"rid": f"abort-{i}-{os.getpid()}"}, timeout=10)
    for t in threads:
        t.join()
    assert not errors, errors
    for key, res in results.items():
        meta = res["meta_info"]
        if str(key).startswith("abort"):
            assert meta["finish_reason"]["type"] == "abort"
            continue
        assert meta["completion_tokens"] == 320
        assert meta["vase"]["peak_kv_len"] <= max(meta["prompt_tokens"], 128) + 32
        assert meta["vase"]["evictions"] == Geometry(128, 32).evictions_in(meta["prompt_tokens"], 320) >= 5
        assert meta["num_retractions"] == 0
    assert len(results) == 20
    assert vase_server.alive(), vase_server.log()[-3000:]
    # Idle again: SGLang's idle check (on) asserts free + held == pool; the used-token gauge is 0.
    time.sleep(3)
    assert vase_server.used_tokens() == 0
    assert vase_server.generate("still serving?", max_new_tokens=4, ignore_eos=True)["meta_info"]["completion_tokens"] == 4


def test_prometheus_counters(vase_server):
    vase_server.generate(PROMPT, max_new_tokens=200, ignore_eos=True, vase={"budget": 64, "window": 16})
    metrics = requests.get(f"{vase_server.url}/metrics", timeout=10).text
    evictions = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                 if line.startswith("sglang:vase_evictions_total")]
    freed = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
             if line.startswith("sglang:vase_freed_slots_total")]
    assert evictions and sum(evictions) >= 9
    assert freed and sum(freed) >= 9 * 16
    assert any(line.startswith("sglang:vase_kv_used_slots") for line in metrics.splitlines())


def test_seed_reproduces_evictions(vase_server):
    """A stochastic policy with a request seed: same seed, same output; the seed is reported."""
    kw = dict(max_new_tokens=160, ignore_eos=True)
    a = vase_server.generate(PROMPT, vase={"budget": 64, "window": 16, "seed": 7}, **kw)
    b = vase_server.generate(PROMPT, vase={"budget": 64, "window": 16, "seed": 7}, **kw)
    assert a["output_ids"] == b["output_ids"]
    assert a["meta_info"]["vase"]["seed"] == 7
    assert a["meta_info"]["vase"]["evictions"] >= 7
    assert a["meta_info"]["vase"]["value_slots"] == 16  # n_large = budget // 4


@pytest.mark.parametrize(
    "vase, field",
    [
        ({"budget": 100, "window": 32}, "multiple"),
        ({"budget": 32, "window": 32}, "larger"),
        ({"policy": "nope"}, "policy"),
        ({"budget": "big"}, "budget"),
        ({"budget": 128, "window": 64}, "window"),  # above the server's ring
        ({"n_large": 1000}, "n_large"),
        ({"colour": 1}, "colour"),
        ("yes", "custom_params.vase"),
    ],
)
def test_bad_request_params_are_400(vase_server, vase, field):
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 4, "custom_params": {"vase": vase}}}
    r = requests.post(f"{vase_server.url}/generate", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert field in r.text
    assert vase_server.generate("hi", max_new_tokens=4, ignore_eos=True)["meta_info"]["completion_tokens"] == 4


def test_openai_client_and_frontend_program(vase_server):
    import openai
    import sglang as sgl

    client = openai.OpenAI(base_url=f"{vase_server.url}/v1", api_key="none")
    chat = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Count from 1 to 100."}],
        max_tokens=200, temperature=0,
        extra_body={"ignore_eos": True, "custom_params": {"vase": {"budget": 64, "window": 16}}},
    )
    assert chat.choices[0].message.content
    assert chat.usage.completion_tokens == 200  # well past the budget: evicted several times
    stats = chat.model_dump()["metadata"]["vase"]  # meta_info["vase"] of each choice
    assert len(stats) == 1 and stats[0]["budget"] == 64 and stats[0]["evictions"] >= 8
    r = requests.post(f"{vase_server.url}/v1/completions", json={
        "model": "default", "prompt": PROMPT, "max_tokens": 100, "n": 2, "ignore_eos": True,
        "custom_params": {"vase": {"budget": 64, "window": 16}}}, timeout=300)
    stats = r.json()["metadata"]["vase"]
    assert len(stats) == 2 and all(st["evictions"] >= 2 for st in stats), stats
    r = requests.post(f"{vase_server.url}/v1/completions", json={
        "model": "default", "prompt": PROMPT, "max_tokens": 8, "custom_params": {"vase": {"budget": 3}}}, timeout=60)
    assert r.status_code == 400 and "budget" in r.text

    @sgl.function
    def reason(s, question):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=120, temperature=0))

    backend = sgl.RuntimeEndpoint(vase_server.url)
    state = reason.run(question="Explain why the sky is blue.", backend=backend)
    assert len(state["answer"]) > 20


def test_retraction_tree_pressure_and_aborts_stay_consistent():
    """Forced retractions (SGLANG_TEST_RETRACT, every 25 steps) and two client aborts, on a pool too
    small for every prompt, so the radix tree hands back the slots of finished ones (distinct
    ~250-token prompts, two pairs sharing one), under SGLang's strict memory checks: retracted
    requests are re-prefilled whole and start evicting again, outputs complete, and every slot and
    tree lock comes back."""
    budget, window = 64, 16
    server = Server(["--dtype", "float32", "--max-total-tokens", "1400", "--max-running-requests", "8",
                     "--enable-metrics", "--vase-budget", str(budget), "--vase-window", str(window)],
                    env={"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "25"}, strict_memory=True)
    try:
        results = {}

        def run(key, text):
            body = {"text": text, "rid": f"{key}-{server.port}",
                    "sampling_params": {"max_new_tokens": 200, "ignore_eos": True, "temperature": 0.7}}
            results[key] = requests.post(f"{server.url}/generate", json=body, timeout=900)

        texts = {f"r{i}": f"Story {i // 2 if i < 4 else i}: " + f"the keeper of tower {i // 2 if i < 4 else i} " * 40
                 for i in range(8)}
        threads = [threading.Thread(target=run, args=item) for item in texts.items()]
        for t in threads:
            t.start()
        time.sleep(15)
        for key in ("r5", "r7"):
            requests.post(f"{server.url}/abort_request", json={"rid": f"{key}-{server.port}"}, timeout=10)
        for t in threads:
            t.join()
        outs = {k: r.json() for k, r in results.items()}
        assert all(r.status_code == 200 for r in results.values()), [r.text for r in results.values()]
        done = {k: o for k, o in outs.items() if o["meta_info"]["finish_reason"]["type"] != "abort"}
        assert len(done) >= 6
        assert sum(o["meta_info"]["num_retractions"] for o in done.values()) > 0
        for o in done.values():
            meta = o["meta_info"]
            assert meta["completion_tokens"] == 200 and meta["vase"]["evictions"] > 0
            assert meta["vase"]["peak_kv_len"] <= meta["prompt_tokens"] + 200  # a re-prefill is uncompressed
        assert server.alive()
        time.sleep(3)
        assert server.used_tokens() == 0
    finally:
        server.stop()


def test_bad_flags_fail_at_startup():
    """The launcher exits with a usage error and a message (tests/test_launcher.py covers each flag)."""
    proc = subprocess.run([sys.executable, "-m", "sglang_vase.launch_server", "--vase-budget", "100",
                           "--vase-window", "32"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "multiple" in proc.stderr, proc.stderr
