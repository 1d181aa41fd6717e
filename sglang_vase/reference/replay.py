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
- after a decode step that ``Geometry.triggers`` (n - q > B, (n - q) % R == 0, q the kept prompt:
  P with keep_prompt, else 0), or, for a row with ``first_eviction_at`` L (pressure mode's
  schedule), first at n = L and then at the triggers (with ``regrow``: each time n is L again),
  every layer evicts: candidates are slots q..n-R-1,
  ``selection.select_keep`` picks K = B - R of them per KV head, and the cache becomes
  ``cache[h, :q] ++ cand[h, keep[h]] ++ cache[h, n-R:n]`` (n = q + B). The eviction counter counts
  events (one per step that evicts, all layers).

Rows. A decoder holds one or more rows (``Row``: policy, seed, keep_prompt), all fed the same tokens;
the single-request form ``EvictingDecoder(model, policy, seed)`` is one row. Rows that have not
evicted yet hold the same cache, so it is stored and computed once (the trunk); at the first trigger
of a geometry (budget, kept prompt) its rows copy the trunk and go on as a stream of their own. One forward runs every stream:
projections and MLP over all their tokens at once, attention per stream. ``extend(tokens)`` feeds
several tokens in one forward (teacher forcing) and splits them at every trigger, so it computes
what ``step`` computes token by token, up to the order of float sums.

Supported: Llama / Mistral / Qwen2 / Qwen3 style decoders (``model.model.layers[i].self_attn`` with
q/k/v/o_proj, optional q_norm/k_norm, input_layernorm, post_attention_layernorm, mlp,
``model.model.norm``, ``model.model.rotary_emb``, ``lm_head``); full attention only.

    model = load_model(prepare_default_model())
    dec = EvictingDecoder(model, get_policy("vase", budget=512, window=64), seed=7)
    logits = dec.prefill(prompt_ids)
    logits = dec.step(next_token)          # repeat

    rows = [Row(None), Row(get_policy("vase", budget=512, window=64), seed=s) for s in range(3)]
    dec = EvictingDecoder(model, rows=rows, record_keeps=False)
    dec.prefill(prompt_ids)
    logits = dec.extend(continuation[:64])   # [rows, 64, V]
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from sglang_vase.engine.geometry import Geometry
from sglang_vase.engine.selection import select_keep
from sglang_vase.policies.base import Policy

# Attention is computed in query chunks so that the fp32 score matrix stays small.
_SCORE_BYTES = 256 << 20

KeepOverride = Callable[[int, int], "torch.Tensor | None"]


@dataclass(frozen=True)
class Row:
    """One request's eviction settings: ``policy`` None keeps the full cache; ``keep_override``
    ``f(eviction_index, layer) -> LongTensor [H_kv, B - R] or None`` replaces the policy's selection
    for that (eviction, layer) when it returns a tensor (to replay an engine trace); ``keep_prompt``
    never evicts the prompt (B then counts the tokens after it), as ``custom_params.vase.keep_prompt``."""

    policy: Policy | None = None
    seed: int = 0
    keep_override: KeepOverride | None = None
    keep_prompt: bool = False
    # Pressure mode's schedule: no eviction until the physical length reaches ``first_eviction_at``
    # (where the pool ran short), one eviction there, then the static schedule. None: static.
    first_eviction_at: int | None = None
    # With ``regrow``, evicted again each time it grows back to ``first_eviction_at`` instead of
    # following the static schedule: a request in pressure mode that grows again after each forced
    # eviction, under a steady shortage.
    regrow: bool = False

    def __post_init__(self):
        if self.regrow and self.first_eviction_at is None:
            raise ValueError("regrow needs first_eviction_at: the length it is evicted at each time")

    @property
    def evicts_at(self) -> int | None:
        """The one length it evicts at after its first eviction (regrow), or None: the triggers."""
        return self.first_eviction_at if self.regrow else None

    def first_due(self, geometry: Geometry, length: int) -> bool:
        """Whether its first eviction falls at ``length`` (a decode step left it there)."""
        if self.first_eviction_at is None:
            return geometry.triggers(length)
        return length == self.first_eviction_at and length > geometry.evicted_length

    def geometry(self, prompt_len: int) -> Geometry | None:
        """Where it evicts after a ``prompt_len``-token prompt; None with the full cache."""
        if self.policy is None:
            return None
        return Geometry(self.policy.budget, self.policy.window, prompt_len if self.keep_prompt else 0)


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


class _Stream:
    """Rows whose caches hold the same tokens: the trunk (rows that have not evicted; one copy for
    all) or the rows of one geometry after their first eviction (one copy per row; each (layer, KV
    head) of each copy holds its own token set).

    Per layer: ``k``/``v`` ``[C, H_kv, capacity, D]``, ``pos`` ``[C, H_kv, capacity]`` (the true
    position of each slot); ``ring`` ``[C, L, R, H_q, D]`` or None; C copies.
    """

    def __init__(self, rows: list[int], copies: int, geometry: Geometry | None, shape: tuple, dtype, device):
        self.rows, self.copies, self.geometry = rows, copies, geometry
        self.length = 0
        self.evictions = 0
        self.first_due = False  # branched at its rows' first eviction: evicts before anything else
        self.evicts_at: int | None = None  # after that: at this length (Row.regrow), else the triggers
        n_layers, capacity, h_kv, head_dim = shape
        self.k = [torch.empty((copies, h_kv, capacity, head_dim), dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.empty_like(t) for t in self.k]
        self.pos = [torch.empty((copies, h_kv, capacity), dtype=torch.long, device=device) for _ in range(n_layers)]
        self.ring: torch.Tensor | None = None

    def due(self, length: int) -> bool:
        """Whether a branch of ``length`` slots after a decode step evicts (after its first)."""
        return length == self.evicts_at if self.evicts_at is not None else self.geometry.triggers(length)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def branch(self, rows: list[int], geometry: Geometry, capacity: int) -> "_Stream":
        """A stream of one copy per row of ``rows``, holding this (one-copy) stream's cache."""
        n = self.length
        _, h_kv, _, head_dim = self.k[0].shape
        new = _Stream(rows, len(rows), geometry, (len(self.k), capacity, h_kv, head_dim), self.k[0].dtype,
                      self.k[0].device)
        for mine, theirs in ((self.k, new.k), (self.v, new.v), (self.pos, new.pos)):
            for src, dst in zip(mine, theirs):
                dst[:, :, :n] = src[:, :, :n]
        new.ring = self.ring.expand(len(rows), *self.ring.shape[1:]).clone()
        new.length = n
        return new

    def grow(self, need: int) -> None:
        """Make room for ``need`` slots (the trunk only: branches have a static footprint)."""
        if need <= self.capacity:
            return
        new = max(need, 2 * self.capacity)
        n = self.length
        for bufs in (self.k, self.v, self.pos):
            for l, old in enumerate(bufs):
                grown = old.new_empty((*old.shape[:2], new, *old.shape[3:]))
                grown[:, :, :n] = old[:, :, :n]
                bufs[l] = grown


class EvictingDecoder:
    """Requests (rows) through the model with the engine's eviction schedule, fed the same tokens.

    Args:
        model: a causal LM loaded by ``load_model`` (any dtype/device).
        policy, seed, keep_override, keep_prompt: the single row of the one-request form (see ``Row``).
        rows: several rows instead (then ``policy``, ``seed``, ``keep_override``, ``keep_prompt`` stay unset). Every
            row with a policy must use the same window (the query ring is shared until it branches).
        record_keeps: keep every eviction's keep sets in ``keep_log`` (CPU memory per row).

    State after each call, for row 0 (``row_length(r)``/``row_evictions(r)`` for the others):
    ``physical_length`` (n), ``position`` (next true position = tokens seen, shared), ``evictions``
    (events so far), ``keep_log`` (``row_keep_log(r)``; one CPU int64 ``[L, H_kv, B - R]`` per eviction, the indices into
    that eviction's candidates), ``slot_positions(layer)``, ``cache(layer)``.
    """

    def __init__(
        self,
        model,
        policy: Policy | None = None,
        seed: int = 0,
        keep_override: KeepOverride | None = None,
        *,
        keep_prompt: bool = False,
        rows: Sequence[Row] | None = None,
        record_keeps: bool = True,
    ):
        if rows is None:
            rows = [Row(policy, seed, keep_override, keep_prompt)]
        elif policy is not None or keep_override is not None or seed or keep_prompt:
            raise ValueError("give either rows or one row's policy/seed/keep_override/keep_prompt, not both")
        if not rows:
            raise ValueError("a decoder needs at least one row")
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

        self.rows = list(rows)
        windows = {r.policy.window for r in self.rows if r.policy is not None}
        if len(windows) > 1:
            raise ValueError(f"rows with policies must share one window, got {sorted(windows)}")
        self.window = windows.pop() if windows else None
        self.record_keeps = record_keeps

        self.position = 0
        self.prompt_length = 0
        self._keep_logs: list[list[torch.Tensor]] = [[] for _ in self.rows]
        self._streams: list[_Stream] = []
        self._trunk: _Stream | None = None
        self._where: list[tuple[_Stream, int]] = []  # row -> (stream, copy)
        self._geometries: list[Geometry | None] = []  # row -> where it evicts (known at the prefill)

    # --- public API ---------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompt_ids) -> torch.Tensor:
        """Uncompressed prefill at positions 0..P-1; returns the last token's logits ``[V]`` fp32
        (the same for every row: nothing is evicted yet)."""
        if self.position:
            raise RuntimeError("prefill() was already called on this decoder")
        ids = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=self.device)
        if ids.numel() == 0:
            raise ValueError("the prompt must contain at least one token")
        p = self.prompt_length = ids.numel()
        self._geometries = [r.geometry(p) for r in self.rows]
        capacity = max([p] + [g.slot_bound(p) for g in self._geometries if g is not None])
        self._trunk = _Stream(list(range(len(self.rows))), 1, None,
                              (self.n_layers, capacity, self.n_kv, self.head_dim), self.dtype, self.device)
        if self.window is not None:
            self._trunk.ring = torch.zeros((1, self.n_layers, self.window, self.n_q, self.head_dim),
                                           dtype=self.dtype, device=self.device)
        self._streams = [self._trunk]
        self._where = [(self._trunk, 0)] * len(self.rows)
        return self._forward(ids, last_only=True)[0][0, -1]

    @torch.no_grad()
    def step(self, token_id: int) -> torch.Tensor:
        """Decode one token at the true position; returns row 0's logits ``[V]`` fp32, then evicts if due."""
        return self.extend([int(token_id)])[0, 0]

    @torch.no_grad()
    def extend(self, token_ids) -> torch.Tensor:
        """Decode several known tokens (teacher forcing); returns every row's logits ``[rows, T, V]``
        fp32, where ``[r, i]`` is row r's logits after token i. Evicts after each token as ``step``
        does: the tokens run in as few forwards as the triggers between them allow."""
        if not self.position:
            raise RuntimeError("call prefill() before step() or extend()")
        ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=self.device)
        out = []
        start = 0
        while start < ids.numel():
            end = start + self._tokens_to_next_trigger(ids.numel() - start)
            logits, index = self._forward(ids[start:end])
            out.append(logits.index_select(0, index))
            self._evict_due()
            start = end
        if not out:
            return torch.empty((len(self.rows), 0, self.model.config.vocab_size))
        return torch.cat(out, dim=1) if len(out) > 1 else out[0]

    @property
    def physical_length(self) -> int:
        return self.row_length(0)

    @property
    def evictions(self) -> int:
        return self.row_evictions(0)

    @property
    def keep_log(self) -> list[torch.Tensor]:
        return self.row_keep_log(0)

    def row_length(self, row: int) -> int:
        return self._where[row][0].length if self._where else 0

    def row_evictions(self, row: int) -> int:
        return self._where[row][0].evictions if self._where else 0

    def row_keep_log(self, row: int) -> list[torch.Tensor]:
        return self._keep_logs[row]

    def slot_positions(self, layer: int, row: int = 0) -> torch.Tensor:
        """True positions of the cached slots of ``layer``: int64 ``[H_kv, n]`` (cache order)."""
        stream, copy = self._where[row]
        return stream.pos[layer][copy, :, : stream.length].clone()

    def cache(self, layer: int, row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the cached keys and values of ``layer``: ``[H_kv, n, D]`` each."""
        stream, copy = self._where[row]
        n = stream.length
        return stream.k[layer][copy, :, :n].clone(), stream.v[layer][copy, :, :n].clone()

    def select_layer(self, layer: int, row: int = 0) -> torch.Tensor:
        """The policy's keep set ``[H_kv, B - R]`` for ``layer`` from the current cache and ring
        (what an eviction now would keep, absent an override)."""
        stream, copy = self._where[row]
        return self._select(stream, layer, [row], torch.tensor([copy], device=self.device))[0]

    # --- internals ----------------------------------------------------------------------------
    def _triggers(self, stream: _Stream, length: int) -> bool:
        """Whether a stream of ``length`` slots after a decode step evicts (or, the trunk, branches)."""
        if stream.geometry is not None:
            return stream.due(length)
        return any(self.rows[r].first_due(self._geometries[r], length) for r in stream.rows
                   if self._geometries[r] is not None)

    def _tokens_to_next_trigger(self, available: int) -> int:
        for t in range(1, available):
            if any(self._triggers(s, s.length + t) for s in self._streams):
                return t
        return available

    def _forward(self, ids: torch.Tensor, last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``ids`` through every stream; returns fp32 logits ``[copies of all streams, T', V]``
        (T' = 1 with ``last_only``) and, per row, its index into their first dimension."""
        t = ids.numel()
        if self._max_positions is not None and self.position + t > self._max_positions:
            raise NotImplementedError(
                f"sliding-window attention (window {self._max_positions}) is not modelled; this request "
                f"reaches {self.position + t} tokens"
            )
        streams = self._streams
        for s in streams:
            if s.length + t > s.capacity:
                if s.geometry is not None:  # the static footprint (Geometry.slot_bound) is never exceeded
                    raise RuntimeError(f"cache overflow: {s.length + t} slots > static capacity {s.capacity}")
                s.grow(s.length + t)
        copies = [s.copies for s in streams]
        positions = torch.arange(self.position, self.position + t, device=self.device)
        h = self.inner.embed_tokens(ids[None]).expand(sum(copies), t, -1)  # [C, T, hidden]
        cos, sin = self.inner.rotary_emb(h[:1], positions[None])
        shape = (sum(copies), t, -1, self.head_dim)
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
            q, k = self._rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [C, H, T, D]
            v = v.transpose(1, 2)
            outs = []
            for s, qs, ks, vs in zip(streams, q.split(copies), k.split(copies), v.split(copies)):
                n0 = s.length
                s.k[l][:, :, n0 : n0 + t] = ks
                s.v[l][:, :, n0 : n0 + t] = vs
                s.pos[l][:, :, n0 : n0 + t] = positions
                if s.ring is not None:
                    last = min(t, self.window)
                    s.ring[:, l, positions[-last:] % self.window] = qs[:, :, -last:].transpose(1, 2)
                outs.append(self._attend(qs, s.k[l][:, :, : n0 + t], s.v[l][:, :, : n0 + t], attn.scaling))
            o = torch.cat(outs) if len(outs) > 1 else outs[0]  # [C, H_q, T, D]
            h = h + attn.o_proj(o.transpose(1, 2).reshape(sum(copies), t, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        for s in streams:
            s.length += t
        self.position += t
        if last_only:
            h = h[:, -1:]
        logits = self.model.lm_head(self.inner.norm(h)).float()
        first = {id(s): sum(copies[:i]) for i, s in enumerate(streams)}
        index = torch.tensor([first[id(s)] + c for s, c in self._where], device=logits.device)
        return logits, index

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of the last T cached tokens' queries ``[C, H_q, T, D]`` over ``[C, H_kv, n, D]``:
        query i sees slots 0..n-T+i. Scores and softmax in fp32; returns ``[C, H_q, T, D]``."""
        c, h_q, t, d = q.shape
        n = keys.shape[2]
        group = h_q // self.n_kv
        qf = q.float().view(c, self.n_kv, group, t, d)
        kt = keys.float().transpose(2, 3)[:, :, None]  # [C, H_kv, 1, D, n]
        vf = values.float()[:, :, None]  # [C, H_kv, 1, n, D]
        chunk = max(1, _SCORE_BYTES // (4 * c * h_q * n))
        out = []
        for s in range(0, t, chunk):
            e = min(t, s + chunk)
            scores = torch.matmul(qf[:, :, :, s:e], kt) * scaling  # [C, H_kv, G, c, n]
            if t > 1:
                limit = torch.arange(n - t + s, n - t + e, device=q.device)[:, None]
                mask = torch.arange(n, device=q.device)[None, :] > limit
                scores = scores.masked_fill(mask, float("-inf"))
            out.append(torch.matmul(torch.softmax(scores, dim=-1), vf))
        return torch.cat(out, dim=3).view(c, h_q, t, d).to(q.dtype)

    def _evict_due(self) -> None:
        """After a decode step: branch the trunk rows whose geometry triggers, evict every due stream."""
        trunk = self._trunk
        if trunk is not None:
            due = defaultdict(list)
            for r in trunk.rows:
                geometry = self._geometries[r]
                if geometry is not None and self.rows[r].first_due(geometry, trunk.length):
                    due[geometry, self.rows[r].evicts_at].append(r)
            for (geometry, evicts_at), rows in due.items():
                capacity = max(geometry.slot_bound(self.prompt_length), trunk.length)
                stream = trunk.branch(rows, geometry, capacity)
                stream.first_due, stream.evicts_at = True, evicts_at
                self._streams.append(stream)
                for c, r in enumerate(rows):
                    self._where[r] = (stream, c)
                trunk.rows = [r for r in trunk.rows if r not in rows]
            if not trunk.rows:  # every row has its own stream: the shared cache is no longer read
                self._streams.remove(trunk)
                self._trunk = None
        for stream in self._streams:
            if stream.geometry is not None and (stream.first_due or stream.due(stream.length)):
                stream.first_due = False
                self._evict(stream)

    def _evict(self, stream: _Stream) -> None:
        geometry, n = stream.geometry, stream.length
        q, m = geometry.kept_prompt, n - geometry.window  # candidates q..m-1; the newest R slots are always kept
        k_keep, end = geometry.n_keep, geometry.evicted_length
        keeps = []
        for l in range(self.n_layers):
            forced = {}  # copy -> the keep set its row's override imposes
            for c, r in enumerate(stream.rows):
                override = self.rows[r].keep_override
                keep = override(stream.evictions, l) if override is not None else None
                if keep is not None:
                    forced[c] = self._check_keep(keep, m - q, k_keep, l, stream.evictions)
            keep = torch.empty((stream.copies, self.n_kv, k_keep), dtype=torch.long, device=self.device)
            chosen = [c for c in range(stream.copies) if c not in forced]
            if chosen:
                at = torch.tensor(chosen, device=self.device)
                keep[at] = self._select(stream, l, [stream.rows[c] for c in chosen], at)
            for c, f in forced.items():
                keep[c] = f
            idx = keep[..., None].expand(-1, -1, -1, self.head_dim)
            keys, values, pos = stream.k[l], stream.v[l], stream.pos[l]
            kept_k = torch.gather(keys[:, :, q:m], 2, idx)
            kept_v = torch.gather(values[:, :, q:m], 2, idx)
            kept_p = torch.gather(pos[:, :, q:m], 2, keep)
            recent = [b[:, :, m:n].clone() for b in (keys, values, pos)]
            mid = q + k_keep
            keys[:, :, q:mid], values[:, :, q:mid], pos[:, :, q:mid] = kept_k, kept_v, kept_p
            keys[:, :, mid:end], values[:, :, mid:end], pos[:, :, mid:end] = recent
            keeps.append(keep)
        if self.record_keeps:
            log = torch.stack(keeps, dim=1).cpu()  # [C, L, H_kv, K]
            for c, r in enumerate(stream.rows):
                self._keep_logs[r].append(log[c])
        stream.evictions += 1
        stream.length = end

    def _select(self, stream: _Stream, layer: int, rows: list[int], copies: torch.Tensor) -> torch.Tensor:
        """Keep sets ``[len(rows), H_kv, B - R]`` of ``layer`` for ``rows`` (held at ``copies`` of
        ``stream``), one batched ``select_keep`` per policy."""
        q, m = self._geometries[rows[0]].kept_prompt, stream.length - self.window
        keep = torch.empty((len(rows), self.n_kv, self.rows[rows[0]].policy.n_keep), dtype=torch.long,
                           device=self.device)
        by_policy = defaultdict(list)
        for i, r in enumerate(rows):
            by_policy[id(self.rows[r].policy)].append(i)
        for members in by_policy.values():
            at = torch.tensor(members, device=self.device)
            src = copies[at]
            keep[at] = select_keep(
                self.rows[rows[members[0]]].policy,
                stream.k[layer][src, :, q:m],
                stream.v[layer][src, :, q:m],
                stream.ring[src, layer].permute(0, 2, 1, 3),  # [g, H_q, R, D]
                seeds=torch.tensor([self.rows[rows[i]].seed for i in members], dtype=torch.long, device=self.device),
                evictions=torch.full((len(members),), stream.evictions, dtype=torch.long, device=self.device),
                layer=layer,
            )
        return keep

    def _check_keep(self, keep, m: int, k_keep: int, layer: int, eviction: int) -> torch.Tensor:
        keep = torch.as_tensor(keep, device=self.device)
        if keep.shape != (self.n_kv, k_keep) or keep.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"keep set of eviction {eviction}, layer {layer}: expected an integer tensor of "
                f"shape {(self.n_kv, k_keep)}, got {keep.dtype} {tuple(keep.shape)}"
            )
        keep = keep.long()
        if k_keep and (int(keep.min()) < 0 or int(keep.max()) >= m):
            raise ValueError(f"keep set of eviction {eviction}, layer {layer} is outside [0, {m})")
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
        rows.append(dec.prefill(prompt_ids)[None])
        if len(continuation) > 1:
            rows.append(dec.extend(continuation[:-1])[0])
    vocab = model.config.vocab_size
    out = torch.cat(rows).cpu() if rows else torch.empty((0, vocab))
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
    suppress_token_ids: Sequence[int] = (),
    return_logits: bool = False,
):
    """Generate up to ``max_new_tokens`` tokens (stops after ``eos_token_id``; never emits a token of
    ``suppress_token_ids``). Greedy, or sampled from ``softmax(logits / temperature)`` with a CPU
    generator seeded by ``seed`` (this sampler is not SGLang's; only greedy decoding is meant to
    match the engine token for token). Returns the tokens, and with ``return_logits`` also the
    model's logits before each of them (fp32 ``[T, V]`` on CPU, suppressed tokens included)."""
    dec = EvictingDecoder(model, policy, seed=seed)
    gen = torch.Generator().manual_seed(int(seed))
    tokens: list[int] = []
    rows: list[torch.Tensor] = []
    suppressed = torch.tensor(list(suppress_token_ids), dtype=torch.long)
    logits = dec.prefill(prompt_ids) if max_new_tokens > 0 else None
    while logits is not None:
        logits = logits.cpu()
        if return_logits:
            rows.append(logits)
        if suppressed.numel():
            logits = logits.index_fill(0, suppressed, float("-inf"))
        if greedy:
            token = int(torch.argmax(logits))
        else:
            token = int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen))
        tokens.append(token)
        logits = None if len(tokens) >= max_new_tokens or token == eos_token_id else dec.step(token)
    if not return_logits:
        return tokens
    return tokens, torch.stack(rows) if rows else torch.empty((0, model.config.vocab_size))
