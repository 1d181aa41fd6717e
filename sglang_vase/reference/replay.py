"""Plain-PyTorch reference of what the SGLang engine does for one request (VASE_SPEC "Static
footprint and trigger", "One eviction").

A manual decoder-only forward over a Hugging Face model's own modules, with an explicit per-layer
KV cache ``[H_kv, n, D]`` of post-RoPE keys (after q_norm/k_norm for Qwen3), so that every
(layer, KV head) can hold its own token set:

- prefill is uncompressed, positions 0..P-1; the query ring of each layer ``[R, H_q, D]`` takes the
  post-RoPE queries at slot ``position % R`` (the last min(P, R) prompt queries, then every decode
  query);
- a decode step appends the new K/V at the end of the cache (physical length n + 1) with RoPE at
  the TRUE absolute position, and attends over all n cached slots of each head;
- after a decode step with ``selection.should_evict(n, B, R)``, every layer evicts: candidates are
  slots 0..n-R-1, ``selection.select_keep`` picks K = B - R of them per KV head, and the cache
  becomes ``cand[h, keep[h]] ++ cache[h, n-R:n]`` (n = B). The eviction counter counts events
  (one per step that evicts, all layers).

Supported: Llama / Mistral / Qwen2 / Qwen3 style decoders (``model.model.layers[i].self_attn`` with
q/k/v/o_proj, optional q_norm/k_norm, input_layernorm, post_attention_layernorm, mlp,
``model.model.norm``, ``model.model.rotary_emb``, ``lm_head``); full attention only.

    model = load_model(prepare_default_model())
    dec = EvictingDecoder(model, get_policy("vase", budget=512, window=64), seed=7)
    logits = dec.prefill(prompt_ids)
    logits = dec.step(next_token)          # repeat
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

from sglang_vase.engine.selection import select_keep, should_evict
from sglang_vase.policies.base import Policy

# Prefill attention is computed in query chunks so that the fp32 score matrix stays small.
_SCORE_BYTES = 256 << 20

KeepOverride = Callable[[int, int], "torch.Tensor | None"]


def load_model(path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """An ``AutoModelForCausalLM`` in ``dtype`` on ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval()


def _rope_function(attn: torch.nn.Module) -> Callable:
    """The model's own ``apply_rotary_pos_emb`` (from its modeling module), else Llama's."""
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as fn
    return fn


class EvictingDecoder:
    """One request through the model with the engine's eviction schedule.

    Args:
        model: a causal LM loaded by ``load_model`` (any dtype/device).
        policy: an eviction ``Policy`` (budget B, window R), or None for the full cache.
        seed: the request seed handed to ``select_keep``.
        keep_override: ``f(eviction_index, layer) -> LongTensor [H_kv, B - R] or None``; a tensor
            replaces the policy's selection for that (eviction, layer) (to replay an engine trace).

    State after each call: ``physical_length`` (n), ``position`` (next true position = tokens
    seen), ``evictions`` (events so far), ``keep_log`` (one CPU int64 ``[L, H_kv, B - R]`` per
    eviction, the indices into that eviction's candidates), ``slot_positions(layer)``.
    """

    def __init__(
        self,
        model,
        policy: Policy | None = None,
        seed: int = 0,
        keep_override: KeepOverride | None = None,
    ):
        config = model.config
        layer_types = getattr(config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise NotImplementedError(f"only full-attention models are supported, got layer_types {layer_types}")
        # Mistral-style configs without layer_types apply a sliding window when it is set.
        self._max_positions = None
        if not layer_types and getattr(config, "use_sliding_window", True) is not False:
            self._max_positions = getattr(config, "sliding_window", None)
        inner = model.model
        self.model = model
        self.inner = inner
        self.layers = list(inner.layers[: config.num_hidden_layers])
        attn = self.layers[0].self_attn
        self.n_layers = len(self.layers)
        self.n_q = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_q
        self.head_dim = attn.head_dim
        if self.n_q % self.n_kv:
            raise ValueError(f"query heads ({self.n_q}) must be a multiple of KV heads ({self.n_kv})")
        self._rope = _rope_function(attn)
        weight = inner.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype

        self.policy = policy
        self.seed = int(seed)
        self.keep_override = keep_override
        self.budget = policy.budget if policy is not None else None
        self.window = policy.window if policy is not None else None

        self.physical_length = 0
        self.position = 0
        self.evictions = 0
        self.keep_log: list[torch.Tensor] = []
        self._k: list[torch.Tensor] = []  # per layer [H_kv, capacity, D]
        self._v: list[torch.Tensor] = []
        self._pos: list[torch.Tensor] = []  # per layer [H_kv, capacity] true position of each slot
        self._ring: torch.Tensor | None = None  # [L, R, H_q, D]

    # --- public API ---------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompt_ids) -> torch.Tensor:
        """Uncompressed prefill at positions 0..P-1; returns the last token's logits ``[V]`` fp32."""
        if self.position:
            raise RuntimeError("prefill() was already called on this decoder")
        ids = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=self.device)
        if ids.numel() == 0:
            raise ValueError("the prompt must contain at least one token")
        p = ids.numel()
        capacity = p if self.policy is None else max(p, self.budget) + self.window
        shape = (self.n_kv, capacity, self.head_dim)
        self._k = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self._v = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self._pos = [torch.empty(shape[:2], dtype=torch.long, device=self.device) for _ in self.layers]
        if self.policy is not None:
            self._ring = torch.zeros(
                (self.n_layers, self.window, self.n_q, self.head_dim), dtype=self.dtype, device=self.device
            )
        return self._forward(ids)

    @torch.no_grad()
    def step(self, token_id: int) -> torch.Tensor:
        """Decode one token at the true position; returns its logits ``[V]`` fp32, then evicts if due."""
        if not self.position:
            raise RuntimeError("call prefill() before step()")
        ids = torch.tensor([int(token_id)], dtype=torch.long, device=self.device)
        logits = self._forward(ids)
        if self.policy is not None and should_evict(self.physical_length, self.budget, self.window):
            self._evict()
        return logits

    def slot_positions(self, layer: int) -> torch.Tensor:
        """True positions of the cached slots of ``layer``: int64 ``[H_kv, n]`` (cache order)."""
        return self._pos[layer][:, : self.physical_length].clone()

    def cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the cached keys and values of ``layer``: ``[H_kv, n, D]`` each."""
        n = self.physical_length
        return self._k[layer][:, :n].clone(), self._v[layer][:, :n].clone()

    # --- internals ----------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.numel()
        if self._max_positions is not None and self.position + t > self._max_positions:
            raise NotImplementedError(
                f"sliding-window attention (window {self._max_positions}) is not modelled; this request "
                f"reaches {self.position + t} tokens"
            )
        positions = torch.arange(self.position, self.position + t, device=self.device)
        self._reserve(t)
        h = self.inner.embed_tokens(ids[None])  # [1, T, hidden]
        cos, sin = self.inner.rotary_emb(h, positions[None])
        shape = (1, t, -1, self.head_dim)
        for l, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(shape)
            k = attn.k_proj(x).view(shape)
            v = attn.v_proj(x).view(shape)
            if getattr(attn, "q_norm", None) is not None:
                q = attn.q_norm(q)
            if getattr(attn, "k_norm", None) is not None:
                k = attn.k_norm(k)
            q, k = self._rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            q, k, v = q[0], k[0], v[0].transpose(0, 1)  # [H, T, D]
            n0 = self.physical_length
            self._k[l][:, n0 : n0 + t] = k
            self._v[l][:, n0 : n0 + t] = v
            self._pos[l][:, n0 : n0 + t] = positions
            if self._ring is not None:
                last = min(t, self.window)
                self._ring[l, positions[-last:] % self.window] = q[:, -last:].transpose(0, 1)
            o = self._attend(q, self._k[l][:, : n0 + t], self._v[l][:, : n0 + t], attn.scaling)
            h = h + attn.o_proj(o.transpose(0, 1).reshape(1, t, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        self.physical_length += t
        self.position += t
        h = self.inner.norm(h[:, -1:])
        return self.model.lm_head(h)[0, -1].float()

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of the last T cached tokens' queries ``[H_q, T, D]`` over ``[H_kv, n, D]``:
        query i sees slots 0..n-T+i. Scores and softmax in fp32; returns ``[H_q, T, D]``."""
        h_q, t, d = q.shape
        n = keys.shape[1]
        group = h_q // self.n_kv
        qf = q.float().view(self.n_kv, group, t, d)
        kt = keys.float().transpose(1, 2)[:, None]  # [H_kv, 1, D, n]
        vf = values.float()[:, None]  # [H_kv, 1, n, D]
        chunk = max(1, _SCORE_BYTES // (4 * h_q * n))
        out = []
        for s in range(0, t, chunk):
            e = min(t, s + chunk)
            scores = torch.matmul(qf[:, :, s:e], kt) * scaling  # [H_kv, G, c, n]
            if t > 1:
                limit = torch.arange(n - t + s, n - t + e, device=q.device)[:, None]
                mask = torch.arange(n, device=q.device)[None, :] > limit
                scores = scores.masked_fill(mask, float("-inf"))
            out.append(torch.matmul(torch.softmax(scores, dim=-1), vf))
        return torch.cat(out, dim=2).view(h_q, t, d).to(q.dtype)

    def _reserve(self, t: int) -> None:
        """Grow the cache buffers (full-cache mode) so that ``t`` more slots fit."""
        need = self.physical_length + t
        capacity = self._k[0].shape[1]
        if need <= capacity:
            return
        if self.policy is not None:  # the static footprint max(P, B) + R is never exceeded
            raise RuntimeError(f"cache overflow: {need} slots > static capacity {capacity}")
        new = max(need, 2 * capacity)
        n = self.physical_length
        for bufs in (self._k, self._v, self._pos):
            for l, old in enumerate(bufs):
                grown = old.new_empty((old.shape[0], new, *old.shape[2:]))
                grown[:, :n] = old[:, :n]
                bufs[l] = grown

    def _evict(self) -> None:
        n, budget, window = self.physical_length, self.budget, self.window
        m = n - window  # candidates 0..m-1; the newest R slots are always kept
        k_keep = budget - window
        keeps = []
        for l in range(self.n_layers):
            keys, values, pos = self._k[l], self._v[l], self._pos[l]
            keep = self.keep_override(self.evictions, l) if self.keep_override is not None else None
            if keep is None:
                keep = self.select_layer(l)
            keep = self._check_keep(keep, m, k_keep, l)
            idx = keep[:, :, None].expand(-1, -1, self.head_dim)
            kept_k = torch.gather(keys[:, :m], 1, idx)
            kept_v = torch.gather(values[:, :m], 1, idx)
            kept_p = torch.gather(pos[:, :m], 1, keep)
            recent = [b[:, m:n].clone() for b in (keys, values, pos)]
            keys[:, :k_keep], values[:, :k_keep], pos[:, :k_keep] = kept_k, kept_v, kept_p
            keys[:, k_keep:budget], values[:, k_keep:budget], pos[:, k_keep:budget] = recent
            keeps.append(keep)
        self.keep_log.append(torch.stack(keeps).cpu())
        self.evictions += 1
        self.physical_length = budget

    def select_layer(self, layer: int) -> torch.Tensor:
        """The policy's keep set ``[H_kv, B - R]`` for ``layer`` from the current cache and ring
        (what an eviction now would keep, absent an override)."""
        m = self.physical_length - self.window
        return select_keep(
            self.policy,
            self._k[layer][None, :, :m],
            self._v[layer][None, :, :m],
            self._ring[layer].permute(1, 0, 2)[None],  # [1, H_q, R, D]
            seeds=torch.tensor([self.seed], dtype=torch.long, device=self.device),
            evictions=torch.tensor([self.evictions], dtype=torch.long, device=self.device),
            layer=layer,
        )[0]

    def _check_keep(self, keep: torch.Tensor, m: int, k_keep: int, layer: int) -> torch.Tensor:
        keep = torch.as_tensor(keep, device=self.device)
        if keep.shape != (self.n_kv, k_keep) or keep.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"keep set of eviction {self.evictions}, layer {layer}: expected an integer tensor of "
                f"shape {(self.n_kv, k_keep)}, got {keep.dtype} {tuple(keep.shape)}"
            )
        keep = keep.long()
        if k_keep and (int(keep.min()) < 0 or int(keep.max()) >= m):
            raise ValueError(f"keep set of eviction {self.evictions}, layer {layer} is outside [0, {m})")
        return keep


@torch.no_grad()
def teacher_forced(
    model,
    prompt_ids,
    continuation_ids,
    policy: Policy | None = None,
    seed: int = 0,
    logprobs: bool = True,
    keep_override: KeepOverride | None = None,
) -> torch.Tensor:
    """Teacher-forced replay: row i predicts ``continuation_ids[i]`` (the cache holds the prompt and
    ``continuation_ids[:i]``, evicted under ``policy``). Returns fp32 ``[T, V]`` on CPU: log-probs
    (default) or raw logits."""
    continuation = list(continuation_ids)
    dec = EvictingDecoder(model, policy, seed=seed, keep_override=keep_override)
    rows = []
    if continuation:
        rows.append(dec.prefill(prompt_ids))
        for token in continuation[:-1]:
            rows.append(dec.step(token))
    vocab = model.config.vocab_size
    out = torch.stack(rows).cpu() if rows else torch.empty((0, vocab))
    return torch.log_softmax(out, dim=-1) if logprobs else out


@torch.no_grad()
def generate(
    model,
    prompt_ids,
    max_new_tokens: int,
    policy: Policy | None = None,
    seed: int = 0,
    greedy: bool = True,
    temperature: float = 1.0,
    eos_token_id: int | None = None,
) -> list[int]:
    """Generate up to ``max_new_tokens`` tokens (stops after ``eos_token_id``). Greedy, or sampled
    from ``softmax(logits / temperature)`` with a CPU generator seeded by ``seed`` (this sampler is
    not SGLang's; only greedy decoding is meant to match the engine token for token)."""
    dec = EvictingDecoder(model, policy, seed=seed)
    gen = torch.Generator().manual_seed(int(seed))
    tokens: list[int] = []
    if max_new_tokens <= 0:
        return tokens
    logits = dec.prefill(prompt_ids)
    while True:
        if greedy:
            token = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits.cpu() / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=gen))
        tokens.append(token)
        if len(tokens) >= max_new_tokens or token == eos_token_id:
            return tokens
        logits = dec.step(token)
