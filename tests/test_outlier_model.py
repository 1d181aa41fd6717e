"""Value outliers: what VaSE's value slots are for (its Qwen3 finding), on models built here.

1. A tiny model this test builds, whose layer 0 gives one marker token a value 100x the others' in
   one channel and whose output depends on it: evicting the large values (``evict-large-v``) is
   catastrophic, ``vase`` and ``vase-adaptive`` keep every marker and stay close to the full cache,
   ``snapkv`` loses markers.
2. The outlier model of ``benchmarks/outlier_model.py`` (SmolLM2 whose layer-0 newline tokens carry value
   ranges far above the median, and whose output depends on them): the ranges are abnormal in layer
   0 only, hiding the newlines from layer 0 moves the output far more than hiding other tokens,
   ``vase`` and ``vase-adaptive`` keep every newline through the evictions while ``snapkv`` drops
   some, and ``vase-adaptive`` pins the newlines there and nothing but the sinks elsewhere (nor
   anywhere on SmolLM2 itself).
"""

from __future__ import annotations

import pytest
import torch

import fidelity_configs
import fidelity_replay
from sglang_vase.policies import get_policy
from sglang_vase.policies.base import EvictionInputs
from sglang_vase.reference import EvictingDecoder, Row, load_model

MARKER = 7
POLICIES = ["evict-large-v", "random", "snapkv", "snapkv-sample", "vase", "vase-adaptive"]


def marker_model():
    """2 layers, random weights, except: embedding dim 0 is 8 for MARKER and 0 for every other
    token, layer 0's value channel 0 of each KV head reads it (a marker's value 32, the others'
    ranges ~0.3), its o_proj columns are large (the output depends on the markers' values), and the
    LM head is scaled up so that next-token distributions are peaked."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        embeddings = model.model.embed_tokens.weight
        embeddings[:, 0] = 0.0
        embeddings[MARKER, 0] = 8.0
        attn = model.model.layers[0].self_attn
        for h in range(2):
            attn.v_proj.weight[h * 16] = 0.0
            attn.v_proj.weight[h * 16, 0] = 4.0
            for q in (2 * h, 2 * h + 1):
                attn.o_proj.weight[:, q * 16] = torch.randn(64, generator=g)
        model.lm_head.weight *= 50.0
    return model


def replay(model, prompt, continuation, budget, window, watched):
    """Teacher-force ``continuation`` under every policy of POLICIES (stochastic ones with seeds
    0..2) in one decoder. Returns per policy the mean KL after the first eviction and how often a
    watched position (seen, not a sink) was missing from a layer-0 KV head after a chunk."""
    specs = [(n, s) for n in POLICIES for s in range(3 if get_policy(n, budget=budget, window=window).stochastic else 1)]
    policies = {n: get_policy(n, budget=budget, window=window) for n in POLICIES}
    dec = EvictingDecoder(model, rows=[Row(None)] + [Row(policies[n], s) for n, s in specs], record_keeps=False)
    dec.prefill(prompt)
    t = len(continuation)
    kl = torch.zeros(len(specs) + 1, t, dtype=torch.float64)
    lost = dict.fromkeys(POLICIES, 0)
    for i in range(1, t, window):
        end = min(t, i + window)
        kl[:, i:end] = fidelity_replay.token_metrics(dec.extend(continuation[i - 1 : end - 1]),
                                                     torch.tensor(continuation[i:end]))[0]
        seen = {p for p in watched if 4 <= p < dec.position}
        for j, (name, _) in enumerate(specs, start=1):
            held = dec.slot_positions(0, row=j)
            lost[name] += sum(len(seen - set(held[h].tolist())) for h in range(held.shape[0]))
    first, _ = fidelity_configs.first_affected_row(len(prompt), t, budget, window)
    means = {}
    for j, (name, _) in enumerate(specs, start=1):
        means.setdefault(name, []).append(float(kl[j, first:].mean()))
    return {n: sum(v) / len(v) for n, v in means.items()}, lost


def test_evicting_the_large_values_is_catastrophic():
    model = marker_model()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(10, 256, (500,), generator=g)
    tokens[torch.rand(500, generator=g) < 0.05] = MARKER  # 26 markers: fewer than vase's 28 value slots
    tokens = tokens.tolist()
    watched = [i for i, t in enumerate(tokens) if t == MARKER]
    kl, lost = replay(model, tokens[:40], tokens[40:], budget=128, window=16, watched=watched)
    others = [kl[n] for n in ("random", "snapkv", "snapkv-sample")]
    assert kl["evict-large-v"] > 20 * max(others), kl
    assert max(kl["vase"], kl["vase-adaptive"]) < 0.2 * min(others), kl
    assert lost["vase"] == lost["vase-adaptive"] == 0, lost
    assert lost["snapkv"] > 0 and lost["evict-large-v"] > lost["random"] > 0, lost


# --- the outlier model (SmolLM2 with newline value outliers) ----------------------------------------

@pytest.fixture(scope="module")
def outlier_model():
    from outlier_model import prepare_outlier_model

    return load_model(prepare_outlier_model(), torch.float32)


@pytest.fixture(scope="module")
def text_ids(outlier_model):
    from transformers import AutoTokenizer

    from outlier_model import CALIBRATION_TEXT, prepare_outlier_model

    tokenizer = AutoTokenizer.from_pretrained(prepare_outlier_model())
    messages = [{"role": "user", "content": "Solve the problems below step by step."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    prompt = [int(t) for t in (prompt["input_ids"] if hasattr(prompt, "keys") else prompt)]
    text = tokenizer(CALIBRATION_TEXT * 2).input_ids
    newline = [i for i, t in enumerate(prompt + text) if "\n" in tokenizer.decode([t])]
    return prompt, text, newline


def pinned_per_layer(model, ids, policy) -> list[int]:
    """Tokens ``policy`` (vase-adaptive) would pin beyond the sinks if the cache of ``ids`` were
    evicted now, per layer (most over the KV heads)."""
    dec = EvictingDecoder(model)
    dec.prefill(ids)
    counts = []
    for layer in range(dec.n_layers):
        keys, values = dec.cache(layer)
        x = EvictionInputs(keys[:, :-policy.window], values[:, :-policy.window], None, torch.tensor(0), torch.tensor(0))
        counts.append(int((policy.pin_scores(x)[:, policy.n_sink:] > -torch.inf).sum(-1).max()))
    return counts


@pytest.mark.slow
def test_outlier_model_pins_newlines_in_layer_0_only(outlier_model, text_ids):
    from sglang_vase.models import prepare_default_model

    prompt, text, newline = text_ids
    ids = (prompt + text)[:320]
    adaptive = get_policy("vase-adaptive", budget=256, window=32)
    counts = pinned_per_layer(outlier_model, ids, adaptive)
    candidates = [p for p in newline if 4 <= p < len(ids) - 32]
    assert counts[0] == len(candidates) > 10, counts
    assert max(counts[1:]) <= 2, counts  # the other layers are mild, as in SmolLM2
    smollm2 = pinned_per_layer(load_model(prepare_default_model(), torch.float32), ids, adaptive)
    assert max(smollm2) <= 2, smollm2


@pytest.mark.slow
def test_outlier_model_output_depends_on_the_newlines(text_ids):
    """Hiding the newlines from layer 0's attention moves the next-token distributions (KL) many
    times more than hiding as many random tokens does (3 draws)."""
    from transformers import AutoModelForCausalLM

    from outlier_model import prepare_outlier_model

    model = AutoModelForCausalLM.from_pretrained(prepare_outlier_model(), dtype=torch.float32,
                                                 attn_implementation="eager").eval()  # takes a 4-D mask
    prompt, text, newline = text_ids
    ids = torch.tensor([prompt + text])
    n = ids.shape[1]

    def logprobs(hidden: list[int] | None = None) -> torch.Tensor:
        def mask_columns(module, args, kwargs):
            mask = kwargs["attention_mask"].clone()
            mask[..., hidden] = float("-inf")
            mask[..., torch.arange(n), torch.arange(n)] = 0.0  # every token still sees itself
            kwargs["attention_mask"] = mask
            return args, kwargs

        hook = model.model.layers[0].self_attn.register_forward_pre_hook(mask_columns, with_kwargs=True) \
            if hidden else None
        with torch.no_grad():
            out = model(ids).logits[0].double().log_softmax(-1)
        if hook:
            hook.remove()
        return out

    full = logprobs()

    def kl(hidden):
        lp = logprobs(hidden)
        return float((full.exp() * (full - lp)).sum(-1)[len(prompt):].mean())

    hidden = [p for p in newline if p >= 4]
    g = torch.Generator().manual_seed(0)
    others = [p for p in range(4, n) if p not in set(newline)]
    random = [kl([others[i] for i in torch.randperm(len(others), generator=g)[: len(hidden)].tolist()])
              for _ in range(3)]
    assert kl(hidden) > 5 * max(random), (kl(hidden), random)


@pytest.mark.slow
def test_vase_and_adaptive_keep_every_newline_snapkv_does_not(outlier_model, text_ids):
    prompt, text, newline = text_ids
    # One copy of the text: its ~25 newlines fit the 28 value slots beyond the sinks (n_large = B / 4).
    text = text[: len(text) // 2]
    kl, lost = replay(outlier_model, prompt, text, budget=128, window=32, watched=newline)
    assert lost["vase"] == lost["vase-adaptive"] == 0, lost
    assert lost["snapkv"] > 0 and lost["evict-large-v"] > 0, lost
