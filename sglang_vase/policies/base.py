"""The eviction-policy contract and the selection step every policy shares.

A policy is a small class with one scoring method (kvpress style). Selection is common:

    pinned  = top-n_pinned of ``pin_scores``            (e.g. VaSE's largest value ranges)
    rest    = K - (pins used) more, by ``scores``:
              top-k (deterministic policies) or sampled without replacement proportionally to the
              score (stochastic policies; Gumbel-top-k: topk(log score + Gumbel noise))
    keep    = pinned ++ rest                            (or sorted by position if ``sort_kept``)

with K = budget - window, per (batch..., KV head) independently.

A score of ``-inf`` excludes a token: it is never kept (the ``evict-large-v`` control uses it).
A pin score of ``-inf`` is no pin: ``n_pinned`` is a cap, and the slots of the pins a head does not
use go to the rest (``vase-adaptive`` pins only outliers). Shapes stay fixed whatever the count, so
nothing waits for the device: the rest is drawn for the largest count it can need and cut per head.

Two entry points share that code:
- ``select(keys, values, queries, generator)``: one request, ``[H_kv, N, D]`` -> ``[H_kv, K]``;
- ``select_batched(keys, values, queries, seed, step)``: any leading batch dims (requests, layers),
  random numbers from ``noise`` keyed by the int64 ``seed``/``step`` tensors of the batch shape.

Every concrete policy (a subclass that defines ``name``) registers itself in ``REGISTRY``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from sglang_vase.policies import noise, scoring

# Keys of zero-score candidates in Gumbel-top-k: below any log(positive fp32) + Gumbel noise
# (>= -104 - 3), above -inf (excluded tokens), and still randomised among themselves.
_ZERO_SCORE_KEY = -1.0e4

# Policy name -> class, filled by ``Policy.__init_subclass__``.
REGISTRY: dict[str, type["Policy"]] = {}


@dataclass(frozen=True)
class KernelScoring:
    """What the engine's scoring kernel computes for a policy (``Policy.kernel_scoring``): window
    attention at ``temperature`` smoothed over ``smoothing`` positions (``scoring.attention_scores``)
    and value ranges with the first ``n_sink`` forced to the top (``scoring.value_range``)."""

    temperature: float
    smoothing: int
    n_sink: int


@dataclass(frozen=True)
class Precomputed:
    """Scores the engine computed with its kernel, ``[..., H_kv, N]`` each, for ``spec``."""

    spec: KernelScoring
    attention: torch.Tensor
    value_range: torch.Tensor


@dataclass
class EvictionInputs:
    """What a policy scores: candidates and window queries, plus the randomness keys.

    keys, values: ``[..., H_kv, N, D]``; queries: ``[..., H_q, W, D]`` or None;
    seed, step: int64 of the batch shape ``...`` (request seed, eviction counter).
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor | None
    seed: torch.Tensor
    step: torch.Tensor
    # Global index of the first KV head in ``keys``: a tensor-parallel rank (or a head chunk of the
    # engine) holds heads [head_offset, head_offset + H_kv) and must draw their noise, not head 0's.
    head_offset: int = 0
    # Scores computed elsewhere from the same inputs (the engine's Triton scoring kernel); what
    # they do not cover is computed by the torch reference.
    precomputed: Precomputed | None = None
    # Draw the noise's uniforms with the Triton kernel (the same numbers in one launch) instead of
    # the torch reference's fifty tensor ops: the engine does where its kernels run.
    fused_noise: bool = False

    def attention_scores(self, temperature: float, smoothing: int) -> torch.Tensor:
        """``scoring.attention_scores`` of these candidates and queries."""
        p = self.precomputed
        if p is not None and (p.spec.temperature, p.spec.smoothing) == (temperature, smoothing):
            return p.attention
        return scoring.attention_scores(self.keys, self.queries, temperature, smoothing)

    def value_range(self, n_sink: int) -> torch.Tensor:
        """``scoring.value_range`` of these candidates."""
        p = self.precomputed
        if p is not None and p.spec.n_sink == n_sink:
            return p.value_range
        return scoring.value_range(self.values, n_sink)

    def noise(
        self, kind: str, stream: int, shape: tuple[int, ...], per_eviction: bool = True, per_head: bool = False
    ) -> torch.Tensor:
        """Random numbers of ``batch + shape``; ``per_eviction=False`` repeats them at every eviction.

        ``per_head``: ``shape[0]`` is the KV-head dimension, so the numbers are those of the global
        heads ``head_offset + h`` (the same whichever rank or chunk holds a head).
        """
        step = self.step if per_eviction else torch.zeros_like(self.step)
        draw, source = getattr(noise, kind), {}
        if self.fused_noise:
            from sglang_vase.kernels.noise import hashed_uniform as fused

            draw, source = (fused, {}) if kind == "hashed_uniform" else (draw, {"uniform": fused})
        if per_head:
            return draw(self.seed, step * 64 + stream, shape, offset=self.head_offset * math.prod(shape[1:]), **source)
        return draw(self.seed, step * 64 + stream, shape, **source)


class Policy:
    """Base class. Subclasses set ``name`` and implement ``scores`` (and optionally ``pin_scores``).

    Parameters (every policy):
        budget: KV slots kept per request, layer and KV head after an eviction (B).
        window: recency buffer = observation window = eviction period (R). B > R, B % R == 0.
        n_sink: first tokens treated as attention sinks (kept by the policies that pin them).
        sort_kept: return the kept indices sorted by position instead of [pinned, rest] order.
    """

    name: ClassVar[str]
    needs_queries: ClassVar[bool] = False
    stochastic: ClassVar[bool] = False
    # Policies defined by token position (StreamingLLM) read the position from the slot index, which
    # holds only if every eviction stores the kept tokens in slot order: they ignore ``sort_kept``.
    positional: ClassVar[bool] = False
    # Whether scores read the candidates' keys/values themselves, beyond what ``kernel_scoring``
    # lets the engine precompute; when False the engine gathers no K/V (it passes zero-size
    # stand-ins of the candidates' shape).
    reads_kv: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # concrete policy; intermediate classes define no name
            if cls.name in REGISTRY:
                raise ValueError(f"policy name {cls.name!r} registered twice")
            REGISTRY[cls.name] = cls

    def __init__(self, budget: int, window: int = 64, n_sink: int = 4, sort_kept: bool = False):
        check_int("budget", budget, minimum=1)
        check_int("window", window, minimum=1)
        check_int("n_sink", n_sink, minimum=0)
        if budget <= window:
            raise ValueError(f"budget ({budget}) must be larger than window ({window})")
        if budget % window != 0:
            raise ValueError(f"budget ({budget}) must be a multiple of window ({window})")
        self.budget = budget
        self.window = window
        self.n_sink = n_sink
        self.sort_kept = bool(sort_kept)

    @property
    def n_keep(self) -> int:
        """K = budget - window: slots for compressed history."""
        return self.budget - self.window

    @property
    def n_pinned(self) -> int:
        """Most tokens pinned by ``pin_scores`` per head and eviction."""
        return 0

    @property
    def n_pinned_min(self) -> int:
        """Pins always used (their pin scores are never ``-inf``); fewer widen the rest's draw."""
        return self.n_pinned

    # --- the one method a policy implements -------------------------------------------------
    def scores(self, x: EvictionInputs) -> torch.Tensor:
        """Importance ``[..., H_kv, N]``. Higher = keep; ``-inf`` = never keep.

        Stochastic policies sample proportionally to the score, so theirs must be >= 0 (or -inf).
        """
        raise NotImplementedError

    def pin_scores(self, x: EvictionInputs) -> torch.Tensor:
        """Score whose top ``n_pinned`` are kept unconditionally (only if ``n_pinned > 0``)."""
        raise NotImplementedError

    def kernel_scoring(self) -> KernelScoring | None:
        """What the scoring kernel must compute when this policy's scores come from
        ``x.attention_scores`` / ``x.value_range`` with exactly those arguments, so the engine can
        compute them with the kernel straight from the KV pool; None otherwise."""
        return None

    # --- shared selection --------------------------------------------------------------------
    def select(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        queries: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Indices to keep for one request: ``[H_kv, N, D]`` -> int64 ``[H_kv, budget - window]``.

        The request seed is drawn from ``generator``; the eviction counter is 0. Candidate ``t`` is the
        token at slot ``t``; after an engine eviction slot order is position order only for sorted keep
        sets (``sort_kept``, and always for ``positional`` policies).
        """
        for name, t in (("keys", keys), ("values", values), ("queries", queries)):
            if t is not None and t.dim() != 3:
                raise ValueError(f"{name} must be 3-D [heads, tokens, head_dim], got shape {tuple(t.shape)}")
        seed = torch.tensor(noise.seed_from_generator(generator), device=keys.device)
        step = torch.zeros((), dtype=torch.int64, device=keys.device)
        return self.select_batched(keys, values, queries, seed, step)

    def select_batched(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        queries: torch.Tensor | None,
        seed: torch.Tensor,
        step: torch.Tensor,
        check: bool = True,
        precomputed: Precomputed | None = None,
        head_offset: int = 0,
        fused_noise: bool = False,
    ) -> torch.Tensor:
        """Batched form: ``[..., H_kv, N, D]`` -> int64 ``[..., H_kv, budget - window]``.

        ``check=False`` skips the NaN/inf check, the only one that synchronises with the device
        (shape checks always run). ``precomputed``: see ``EvictionInputs`` and ``kernel_scoring``.
        ``head_offset``: global index of the first KV head given (see ``EvictionInputs``); heads are
        independent, so any split of the heads keeps exactly what one call over all of them keeps.
        ``fused_noise``: see ``EvictionInputs`` (the same keep sets).
        """
        self.validate(keys, values, queries, check_finite=check)
        batch = keys.shape[:-3]
        x = EvictionInputs(
            keys,
            values,
            queries,
            torch.as_tensor(seed, dtype=torch.int64, device=keys.device).expand(batch),
            torch.as_tensor(step, dtype=torch.int64, device=keys.device).expand(batch),
            head_offset,
            precomputed,
            fused_noise,
        )
        return self.select_from_scores(x, self.scores(x), self.pin_scores(x) if self.n_pinned else None)

    def select_from_scores(
        self, x: EvictionInputs, scores: torch.Tensor, pin_scores: torch.Tensor | None
    ) -> torch.Tensor:
        """The shared selection step, given the policy's scores and pin scores."""
        k = self.n_keep
        scores = scores.float()
        n_pin = self.n_pinned if pin_scores is not None else 0
        n_pin_min = min(self.n_pinned_min, n_pin)
        if n_pin:
            top = torch.topk(pin_scores, n_pin, dim=-1)
            pinned = top.indices
            # Sorted descending, so the used pins are a prefix: the first n_pin_min, then any not -inf.
            used = top.values != -math.inf
            used[..., :n_pin_min] = True
            scores = scores.scatter(-1, pinned, torch.where(used, -math.inf, scores.gather(-1, pinned)))
        parts = [pinned] if n_pin else []
        n_rest = k - n_pin_min  # the rest's largest count: every pin beyond the minimum unused
        if n_rest > 0:
            if self.stochastic:
                g = x.noise("gumbel", 0, tuple(scores.shape[len(x.seed.shape):]), per_head=True)
                key = torch.where(scores > 0, torch.log(scores.clamp_min(1e-38)) + g, _ZERO_SCORE_KEY + g)
                key = key.masked_fill(scores == -math.inf, -math.inf)  # pinned or excluded
            else:
                key = scores
            parts.append(torch.topk(key, n_rest, dim=-1).indices)
        keep = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        if n_pin_min < n_pin:  # per head: its used pins, then the first K - (used) of the rest
            slot = torch.arange(k, device=keep.device)
            n_used = used.sum(dim=-1, keepdim=True)
            keep = keep.gather(-1, torch.where(slot < n_used, slot, slot - n_used + n_pin))
        return keep.sort(dim=-1).values if self.sort_kept or self.positional else keep

    # --- input checks --------------------------------------------------------------------------
    def validate(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        queries: torch.Tensor | None,
        check_finite: bool = True,
    ) -> None:
        if keys.dim() < 3 or keys.shape != values.shape:
            raise ValueError(
                f"keys and values must share a shape [..., heads, tokens, head_dim]; got keys "
                f"{tuple(keys.shape)} and values {tuple(values.shape)}"
            )
        n = keys.shape[-2]
        if n < self.n_keep:
            raise ValueError(
                f"N (candidate tokens, {n}) must be at least budget - window ({self.n_keep})"
            )
        if self.needs_queries:
            if queries is None:
                raise ValueError(f"queries are required by policy '{self.name}'")
            if queries.shape[:-3] != keys.shape[:-3] or queries.shape[-1] != keys.shape[-1]:
                raise ValueError(
                    f"queries shape {tuple(queries.shape)} does not match keys {tuple(keys.shape)}"
                )
            if queries.shape[-3] % keys.shape[-3] != 0:
                raise ValueError(
                    f"query heads ({queries.shape[-3]}) must be a multiple of KV heads ({keys.shape[-3]})"
                )
        if not check_finite:
            return
        for name, t in (("keys", keys), ("values", values), ("queries", queries if self.needs_queries else None)):
            if t is not None and not torch.isfinite(t).all():
                raise ValueError(f"{name} contain NaN or inf")


def check_int(name: str, value, minimum: int, maximum: int | None = None) -> None:
    """Raise a ValueError naming ``name`` unless ``minimum <= value (<= maximum)`` is an int."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")


def check_float(
    name: str, value, minimum: float, maximum: float = math.inf, open_minimum: bool = False
) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a real number in the given range."""
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and (value > minimum if open_minimum else value >= minimum)
        and value <= maximum
    )
    if not ok:
        bounds = f"{'>' if open_minimum else '>='} {minimum}"
        if maximum < math.inf:
            bounds += f" and <= {maximum}"
        raise ValueError(f"{name} must be a number {bounds}, got {value!r}")
