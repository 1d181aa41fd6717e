"""The plain-PyTorch reference of one request (sglang_vase.reference.replay) on the embedded model.

Checks the manual forward against Hugging Face, then the eviction schedule of VASE_SPEC "Static
footprint and trigger" and the compaction of "One eviction". CPU, fp32; about 500 decode steps.
"""

from __future__ import annotations

import pytest
import torch

from sglang_vase.policies import get_policy
from sglang_vase.reference import EvictingDecoder, generate, load_model, teacher_forced

BUDGET, WINDOW = 64, 16
K_KEEP = BUDGET - WINDOW
SNAP_STEPS = 120


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: this model is memory-bound per token, and two OpenMP threads on a
    shared two-core machine spin against other processes (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_path():
    from sglang_vase.models import prepare_default_model

    return prepare_default_model()


@pytest.fixture(scope="module")
def model(model_path):
    return load_model(model_path, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def chat_prompt(tokenizer) -> list[int]:
    messages = [{"role": "user", "content": "Write a short story about a cat who learns to fly."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert 16 < len(ids) < BUDGET
    return ids


@pytest.fixture(scope="module")
def long_prompt(tokenizer) -> list[int]:
    text = (
        "The history of astronomy spans thousands of years. Early observers tracked the motion of the "
        "planets and the phases of the moon, built calendars from the seasons, and predicted eclipses. "
    ) * 4
    ids = tokenizer(text).input_ids[:100]
    assert len(ids) == 100
    return ids


def expected_length(prompt_len: int, steps: int) -> int:
    """Physical length after ``steps`` decode steps, simulated from the spec's rule directly."""
    n = prompt_len
    for _ in range(steps):
        n += 1
        if n > BUDGET and n % WINDOW == 0:
            n = BUDGET
    return n


def hf_forward(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
    return out.logits[0].float(), out.past_key_values


def hf_layer_kv(cache, layer):
    """Post-RoPE keys and values of one layer from HF's cache: ``[H_kv, T, D]`` each."""
    lay = cache.layers[layer]
    return lay.keys[0], lay.values[0]


@pytest.fixture(scope="module")
def snapkv_run(model, chat_prompt):
    """Greedy decoding under snapkv (B=64, R=16), recording the state after every step."""
    dec = EvictingDecoder(model, get_policy("snapkv", budget=BUDGET, window=WINDOW), seed=11)
    logits = [dec.prefill(chat_prompt)]
    tokens, lengths, positions, evictions = [], [], [], []
    for _ in range(SNAP_STEPS):
        tokens.append(int(torch.argmax(logits[-1])))
        logits.append(dec.step(tokens[-1]))
        lengths.append(dec.physical_length)
        positions.append(dec.position)
        evictions.append(dec.evictions)
    return dict(dec=dec, tokens=tokens, logits=torch.stack(logits), lengths=lengths, positions=positions,
                evictions=evictions)


def assert_valid_keep_log(keep_log, candidates, h_kv, n_layers):
    for e, keep in enumerate(keep_log):
        assert keep.dtype == torch.int64
        assert keep.shape == (n_layers, h_kv, K_KEEP), f"eviction {e}"
        assert int(keep.min()) >= 0 and int(keep.max()) < candidates[e], f"eviction {e} out of range"
        srt = keep.sort(dim=-1).values
        assert bool((srt[..., 1:] != srt[..., :-1]).all()), f"eviction {e} repeats an index"


# --- (1) the manual forward is the model -----------------------------------------------------
def test_full_cache_matches_hf(model, chat_prompt):
    dec = EvictingDecoder(model)
    steps = 8
    rows = [dec.prefill(chat_prompt)]
    tokens = []
    for _ in range(steps):
        tokens.append(int(torch.argmax(rows[-1])))
        rows.append(dec.step(tokens[-1]))
    ids = chat_prompt + tokens
    ref, cache = hf_forward(model, ids)
    p = len(chat_prompt)
    got = torch.stack(rows)
    assert got.shape == (steps + 1, model.config.vocab_size) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref[p - 1 :], atol=1e-4, rtol=0)
    assert dec.physical_length == dec.position == len(ids) and dec.evictions == 0
    for layer in (0, 14, model.config.num_hidden_layers - 1):
        k, v = dec.cache(layer)
        hk, hv = hf_layer_kv(cache, layer)
        torch.testing.assert_close(k, hk, atol=1e-4, rtol=0)
        torch.testing.assert_close(v, hv, atol=1e-4, rtol=0)
        assert torch.equal(dec.slot_positions(layer), torch.arange(len(ids)).expand(dec.n_kv, -1))


def test_teacher_forced_full_cache_matches_hf(model, chat_prompt):
    continuation = [28, 260, 1345, 314, 253, 3575]
    ref, _ = hf_forward(model, chat_prompt + continuation)
    p = len(chat_prompt)
    got = teacher_forced(model, chat_prompt, continuation, policy=None)
    assert got.shape == (len(continuation), model.config.vocab_size)
    torch.testing.assert_close(got, torch.log_softmax(ref[p - 1 : -1], -1), atol=1e-4, rtol=0)
    raw = teacher_forced(model, chat_prompt, continuation, logprobs=False)
    torch.testing.assert_close(raw, ref[p - 1 : -1], atol=1e-4, rtol=0)


# --- (2) a budget above the total length never evicts ----------------------------------------
@pytest.fixture(scope="module")
def full_greedy(model, chat_prompt):
    return generate(model, chat_prompt, 24, policy=None)


@pytest.mark.parametrize("name", ["snapkv", "vase"])
def test_no_eviction_under_budget(model, chat_prompt, full_greedy, name):
    steps = len(full_greedy)
    full = full_greedy
    policy = get_policy(name, budget=256, window=WINDOW)
    dec = EvictingDecoder(model, policy, seed=5)
    logits = dec.prefill(chat_prompt)
    tokens = []
    for _ in range(steps):
        tokens.append(int(torch.argmax(logits)))
        logits = dec.step(tokens[-1])
    assert tokens == full
    assert dec.evictions == 0 and dec.keep_log == []
    assert dec.physical_length == dec.position == len(chat_prompt) + steps


# --- (3) snapkv at B=64, R=16 over 120 decode steps -----------------------------------------
def test_eviction_schedule(snapkv_run, chat_prompt):
    p = len(chat_prompt)
    lengths, positions = snapkv_run["lengths"], snapkv_run["positions"]
    assert lengths == [expected_length(p, t) for t in range(1, SNAP_STEPS + 1)]
    assert positions == list(range(p + 1, p + SNAP_STEPS + 1))  # true positions never shrink
    # The first eviction is at n = B + R, then every R steps; n oscillates in [B, B + R).
    first = BUDGET + WINDOW - p
    evict_steps = [t for t in range(1, SNAP_STEPS + 1) if t >= first and (t - first) % WINDOW == 0]
    assert len(evict_steps) >= 5
    assert snapkv_run["evictions"] == [sum(s <= t for s in evict_steps) for t in range(1, SNAP_STEPS + 1)]
    assert all(lengths[t - 1] == BUDGET for t in evict_steps)
    assert all(BUDGET <= n < BUDGET + WINDOW for n in lengths[first - 1 :])
    assert len(snapkv_run["dec"].keep_log) == len(evict_steps)


def test_eviction_compacts_true_positions(model, snapkv_run, chat_prompt):
    """Layer-0 K/V depend only on (token, position): the evicted cache must hold HF's layer-0
    K/V of exactly the positions ``slot_positions`` names, the newest R in order at the end."""
    dec = snapkv_run["dec"]
    ids = chat_prompt + snapkv_run["tokens"]
    _, cache = hf_forward(model, ids)
    hk, hv = hf_layer_kv(cache, 0)
    pos = dec.slot_positions(0)
    n = dec.physical_length
    assert pos.shape == (dec.n_kv, n)
    assert int(pos.max()) == dec.position - 1
    # the recency buffer: the newest n - K positions, in order, in every head
    recent = torch.arange(dec.position - (n - K_KEEP), dec.position)
    assert torch.equal(pos[:, K_KEEP:], recent.expand(dec.n_kv, -1))
    for h in range(dec.n_kv):
        assert pos[h].unique().numel() == n
    k, v = dec.cache(0)
    idx = pos[:, :, None].expand(-1, -1, k.shape[-1])
    torch.testing.assert_close(k, torch.gather(hk, 1, idx), atol=1e-4, rtol=0)
    torch.testing.assert_close(v, torch.gather(hv, 1, idx), atol=1e-4, rtol=0)


def test_keep_override_replays_exactly(model, snapkv_run, chat_prompt):
    """The override alone decides (another policy would select differently), and ``extend`` (the
    tokens in as few forwards as the triggers allow) computes what ``step`` computed token by token."""
    log = snapkv_run["dec"].keep_log
    other = get_policy("streamingllm", budget=BUDGET, window=WINDOW)
    dec = EvictingDecoder(model, other, seed=99, keep_override=lambda e, layer: log[e][layer])
    got = torch.cat([dec.prefill(chat_prompt)[None], dec.extend(snapkv_run["tokens"][:-1])[0]])
    assert len(dec.keep_log) == len(log) and all(torch.equal(a, b) for a, b in zip(dec.keep_log, log))
    # fp32 sums over a chunk of tokens and over one token differ in their last bits only
    torch.testing.assert_close(got, snapkv_run["logits"][:-1], atol=1e-4, rtol=0)


def test_keep_override_changes_the_result(model, snapkv_run, chat_prompt):
    """Replaying with another keep set (the oldest K candidates) diverges right after eviction 1."""
    first = BUDGET + WINDOW - len(chat_prompt)
    tokens = snapkv_run["tokens"][: first + 3]
    oldest = torch.arange(K_KEEP).expand(3, -1)
    policy = get_policy("snapkv", budget=BUDGET, window=WINDOW)
    dec = EvictingDecoder(model, policy, keep_override=lambda e, layer: oldest)
    rows = [dec.prefill(chat_prompt)] + [dec.step(t) for t in tokens]
    got, ref = torch.stack(rows), snapkv_run["logits"][: len(rows)]
    assert torch.equal(got[: first + 1], ref[: first + 1])  # identical up to the evicting step
    assert not torch.allclose(got[first + 1 :], ref[first + 1 :], atol=1e-3)
    assert torch.equal(dec.keep_log[0], oldest.expand(model.config.num_hidden_layers, -1, -1))


def test_keep_sets_differ_across_heads(snapkv_run):
    for keep in snapkv_run["dec"].keep_log:
        sets = keep.sort(dim=-1).values  # [L, H_kv, K]
        same = (sets[:, 1:] == sets[:, :1]).all(dim=-1).all(dim=-1)  # every head equals head 0
        assert int(same.sum()) < keep.shape[0] // 2, "most layers keep one token set for all heads"
        assert not torch.equal(sets[0], sets[-1])  # and layers differ too


# --- (4) a prompt longer than the budget ---------------------------------------------------------
def test_long_prompt_cut_at_next_window_multiple(model, long_prompt):
    p = len(long_prompt)  # 100 > B; first multiple of R above it: 112
    cut = (p // WINDOW + 1) * WINDOW
    dec = EvictingDecoder(model, get_policy("snapkv", budget=BUDGET, window=WINDOW), seed=1)
    logits = dec.prefill(long_prompt)
    assert dec.physical_length == p and dec.evictions == 0
    lengths = []
    for _ in range(cut - p + WINDOW):
        logits = dec.step(int(torch.argmax(logits)))
        lengths.append(dec.physical_length)
        assert dec.physical_length <= max(p, BUDGET) + WINDOW
    steps_to_cut = cut - p
    assert lengths[: steps_to_cut - 1] == list(range(p + 1, cut))
    assert lengths[steps_to_cut - 1] == BUDGET
    assert lengths[steps_to_cut:] == list(range(BUDGET + 1, BUDGET + WINDOW)) + [BUDGET]
    assert dec.evictions == 2 and dec.position == cut + WINDOW
    assert_valid_keep_log(dec.keep_log, [cut - WINDOW, BUDGET], dec.n_kv, dec.n_layers)


def test_keep_prompt_keeps_every_prompt_column(model, long_prompt):
    """keep_prompt: the prompt's columns stay in every (layer, head) and B counts what follows them
    (the engine's ``Geometry`` with kept_prompt = P)."""
    from sglang_vase.engine.geometry import Geometry

    p, steps = len(long_prompt), BUDGET + 3 * WINDOW
    geometry = Geometry(BUDGET, WINDOW, kept_prompt=p)
    dec = EvictingDecoder(model, get_policy("snapkv", budget=BUDGET, window=WINDOW), seed=1, keep_prompt=True)
    logits = dec.prefill(long_prompt)
    for _ in range(steps):
        logits = dec.step(int(torch.argmax(logits)))
        assert dec.physical_length <= geometry.slot_bound(p)
    # The replay evicts at every trigger up to n = p + steps (the engine skips one at the last token).
    assert dec.evictions == geometry.evictions_in(p, steps + 2) == 3
    assert dec.physical_length == geometry.evicted_length + (p + steps - geometry.next_trigger(p)) % WINDOW
    for layer in range(dec.n_layers):
        pos = dec.slot_positions(layer)
        assert torch.equal(pos[:, :p], torch.arange(p).expand(dec.n_kv, -1)), f"layer {layer}"
        assert bool((pos[:, p:] >= p).all())
    assert_valid_keep_log(dec.keep_log, [BUDGET] * 3, dec.n_kv, dec.n_layers)  # B candidates after the prompt


# --- (5) keep sets are valid, and seeded -------------------------------------------------------
def test_keep_log_valid_snapkv(snapkv_run, chat_prompt):
    dec = snapkv_run["dec"]
    assert_valid_keep_log(dec.keep_log, [BUDGET] * len(dec.keep_log), dec.n_kv, dec.n_layers)


def test_keep_log_valid_vase_keeps_sinks(model, chat_prompt):
    policy = get_policy("vase", budget=BUDGET, window=WINDOW)  # n_large = 16 >= n_sink = 4
    dec = EvictingDecoder(model, policy, seed=3)
    logits = dec.prefill(chat_prompt)
    steps = BUDGET + 2 * WINDOW - len(chat_prompt)  # two evictions
    for _ in range(steps):
        logits = dec.step(int(torch.argmax(logits)))
    assert dec.evictions == 2
    assert_valid_keep_log(dec.keep_log, [BUDGET, BUDGET], dec.n_kv, dec.n_layers)
    for layer in range(dec.n_layers):
        pos = dec.slot_positions(layer)
        for h in range(dec.n_kv):
            assert bool(torch.isin(torch.arange(policy.n_sink), pos[h]).all()), f"layer {layer} head {h}"


def test_stochastic_keep_sets_follow_the_seed(model, long_prompt):
    """vase samples: the same request seed reproduces the keep sets, another seed changes them."""
    tokens = [13, 330, 2056, 314, 260, 4444, 28, 365, 1345, 314, 253, 3575]  # 112 - 100: one eviction

    def keep_log(seed):
        dec = EvictingDecoder(model, get_policy("vase", budget=BUDGET, window=WINDOW), seed=seed)
        dec.prefill(long_prompt)
        for t in tokens:
            dec.step(t)
        assert dec.evictions == 1
        return dec.keep_log[0]

    a, b, c = keep_log(7), keep_log(7), keep_log(8)
    assert torch.equal(a, b)
    assert not torch.equal(a.sort(-1).values, c.sort(-1).values)


def test_bad_override_rejected(model, long_prompt):
    bad = torch.full((3, K_KEEP), BUDGET * 10)
    dec = EvictingDecoder(model, get_policy("snapkv", budget=BUDGET, window=WINDOW), keep_override=lambda e, l: bad)
    dec.prefill(long_prompt)
    with pytest.raises(ValueError, match="outside"):
        for t in range(12):
            dec.step(t + 100)


# --- other architectures: tiny random models ---------------------------------------------------
def tiny_model(arch: str, heads: int = 4, kv_heads: int = 2):
    import transformers

    config_cls, model_cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    }[arch]
    config = getattr(transformers, config_cls)(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).float().eval()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_other_architectures_match_hf(arch):
    model = tiny_model(arch)
    ids = list(range(3, 60, 2))
    continuation = [7, 99, 12, 200, 31]
    ref, _ = hf_forward(model, ids + continuation)
    got = teacher_forced(model, ids, continuation, policy=None, logprobs=False)
    torch.testing.assert_close(got, ref[len(ids) - 1 : -1], atol=1e-4, rtol=0)


def test_mha_model_evicts():
    """A group of one (as many KV heads as query heads) works; keep sets stay per head."""
    model = tiny_model("llama", heads=4, kv_heads=4)
    dec = EvictingDecoder(model, get_policy("vase", budget=32, window=8), seed=2)
    logits = dec.prefill(list(range(10, 40)))
    for _ in range(26):  # n: 31 .. 56 -> evictions at n = 40, 48, 56
        logits = dec.step(int(torch.argmax(logits)))
    assert dec.evictions == 3 and dec.physical_length == 32
    assert [k.shape for k in dec.keep_log] == [(2, 4, 24)] * 3


def test_rows_in_one_decoder_equal_rows_alone():
    """Rows of several policies, budgets and seeds fed together (the trunk shared until each
    budget's first trigger, then one stream per budget) compute what each computes alone, and a
    full-cache row is the full cache."""
    from sglang_vase.reference import Row

    model = tiny_model("llama")
    # Distinct tokens: a repeated token has the same layer-0 value, an exact tie whose order in
    # topk may differ between any two computations.
    prompt, continuation = list(range(5, 45)), [50 + (7 * i) % 200 for i in range(100)]
    specs = [(None, 0), ("vase", 0), ("vase", 1), ("snapkv", 0), ("vase-adaptive", 2), ("random", 3)]
    rows, policies = [], {}
    for budget in (48, 64):
        for name, seed in specs:
            if name is None and budget == 64:
                continue
            policy = policies.setdefault((name, budget), name and get_policy(name, budget=budget, window=8))
            rows.append(Row(policy, seed))
    dec = EvictingDecoder(model, rows=rows)
    got = torch.cat([dec.prefill(prompt).expand(len(rows), 1, -1), dec.extend(continuation[:-1])], dim=1)
    for r, row in enumerate(rows):
        alone = EvictingDecoder(model, row.policy, seed=row.seed)
        want = torch.cat([alone.prefill(prompt)[None], torch.stack([alone.step(t) for t in continuation[:-1]])])
        torch.testing.assert_close(got[r], want, atol=1e-4, rtol=0, msg=f"row {r}")
        assert dec.row_evictions(r) == alone.evictions and dec.row_length(r) == alone.physical_length
        assert all(torch.equal(a, b) for a, b in zip(dec.row_keep_log(r), alone.keep_log)), f"row {r}"
    assert dec.row_evictions(0) == 0 and dec.row_evictions(1) >= 5
    # the rows of one budget kept different tokens (different seeds and policies)
    assert not torch.equal(dec.row_keep_log(1)[0], dec.row_keep_log(2)[0])


# --- pressure mode's schedule: one eviction where the pool ran short, then the static one -------
@pytest.mark.parametrize("late", [50, 47])
def test_first_eviction_at_a_given_length_then_the_static_schedule(model, snapkv_run, chat_prompt, late):
    from sglang_vase.reference.replay import Row

    p = len(chat_prompt)
    at = p + late  # not at a trigger: any length past B a shortage may strike
    policy = get_policy("snapkv", budget=BUDGET, window=WINDOW)
    rows = [Row(None), Row(policy, seed=11), Row(policy, seed=11, first_eviction_at=at),
            Row(policy, seed=11, first_eviction_at=BUDGET + WINDOW)]  # at the static trigger: the static row
    dec = EvictingDecoder(model, rows=rows)
    dec.prefill(chat_prompt)
    tokens = snapkv_run["tokens"]
    logits = dec.extend(tokens[:late - 1])
    assert dec.row_length(2) == at - 1 and dec.row_evictions(2) == 0  # the full cache so far
    logits = torch.cat([logits, dec.extend(tokens[late - 1:])], dim=1)
    torch.testing.assert_close(logits[2, :late], logits[0, :late])  # identical up to the eviction
    assert not torch.equal(logits[2, late:], logits[0, late:])
    torch.testing.assert_close(logits[3], logits[1], atol=2e-4, rtol=1e-4)  # batched with other copies
    # One eviction at `at`, then every R tokens past B + R: the static lengths from B on.
    n, evictions = BUDGET, 1
    for _ in tokens[late:]:
        n += 1
        if n > BUDGET and n % WINDOW == 0:
            n, evictions = BUDGET, evictions + 1
    assert (dec.row_length(2), dec.row_evictions(2)) == (n, evictions)
    # Token by token, one row alone: the same as in the batched teacher-forced run.
    alone = EvictingDecoder(model, rows=[rows[2]])
    alone.prefill(chat_prompt)
    stepped = torch.stack([alone.step(t) for t in tokens])
    torch.testing.assert_close(stepped, logits[2], atol=2e-4, rtol=1e-4)
    assert alone.keep_log[0].shape == (len(dec.layers), dec.n_kv, K_KEEP)


def test_regrow_evicts_each_time_it_is_back_at_its_length(model, snapkv_run, chat_prompt):
    """Row.regrow: the first eviction where the pool ran short, then again each time the row grows
    back to that length (never at the static triggers); before its first eviction it is the late
    row's twin, and step by step it computes what the batched teacher-forced run does."""
    from sglang_vase.reference.replay import Row

    p, late = len(chat_prompt), 47
    at = p + late
    policy = get_policy("snapkv", budget=BUDGET, window=WINDOW)
    rows = [Row(None), Row(policy, seed=3, first_eviction_at=at),
            Row(policy, seed=3, first_eviction_at=at, regrow=True)]
    dec = EvictingDecoder(model, rows=rows)
    dec.prefill(chat_prompt)
    tokens = snapkv_run["tokens"]
    logits = dec.extend(tokens)
    n, evictions = p, 0
    for _ in tokens:  # the rule, simulated: evict to B whenever the length is `at`
        n += 1
        if n == at:
            n, evictions = BUDGET, evictions + 1
    assert evictions >= 3  # the run comes back to `at` at least twice
    assert (dec.row_length(2), dec.row_evictions(2)) == (n, evictions)
    torch.testing.assert_close(logits[2, :late], logits[1, :late])  # the late row's twin until then
    with pytest.raises(ValueError, match="first_eviction_at"):
        Row(policy, regrow=True)
    alone = EvictingDecoder(model, rows=[rows[2]])
    alone.prefill(chat_prompt)
    stepped = torch.stack([alone.step(t) for t in tokens])
    torch.testing.assert_close(stepped, logits[2], atol=2e-4, rtol=1e-4)
