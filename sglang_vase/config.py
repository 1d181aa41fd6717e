"""VaSE settings: server defaults (``--vase-*`` flags) and per-request overrides.

The launcher turns the flags into JSON in the ``SGLANG_VASE_CONFIG`` environment variable, which
every SGLang process it spawns inherits; the plugin reads it there. A request may override the
defaults through ``sampling_params.custom_params`` (``custom_params`` at the top level of OpenAI
requests)::

    {"vase": {"policy": "vase", "budget": 512, "window": 64, "n_large": 128, "seed": 7}}
    {"vase": {"keep_prompt": true}}                   # never evict the prompt; B counts generated tokens
    {"vase": {"mode": "pressure"}}                   # keep the full cache until the pool runs short
    {"vase": false}                                   # this request keeps its full cache
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from sglang_vase.engine.geometry import Geometry
from sglang_vase.policies import POLICIES, get_policy, policy_params
from sglang_vase.policies.base import Policy

if TYPE_CHECKING:
    from sglang_vase.engine.memory import ModelShape, Plan

ENV_VAR = "SGLANG_VASE_CONFIG"
DEFAULT_WORKSPACE_MB = 256
DISABLED = "none"
# When a request evicts. static: every R tokens past B + R, whatever the load (the paper's schedule).
# pressure: only when the KV pool runs short (engine.pressure), then every R tokens as static.
MODES = ("static", "pressure")
# Fields a request may set in custom_params["vase"]; sort_kept is a server-wide choice.
REQUEST_FIELDS = ("policy", "budget", "window", "n_large", "seed", "keep_prompt", "mode")


@dataclass(frozen=True)
class VaseParams:
    """The eviction settings of one request (or the server's defaults)."""

    policy: str = "vase"
    budget: int = 4096
    window: int = 64
    n_large: int | None = None  # None: the policy's default (budget // 4 for vase)
    seed: int | None = None  # None: a seed derived from the request id
    # The paper's budget (False): B counts every token the request attends, prompt included. True: the
    # prompt is never evicted (it stays shared in the radix cache) and B counts generated tokens.
    keep_prompt: bool = False
    mode: str = "static"  # MODES
    # Server-wide only (not settable per request):
    sort_kept: bool = False
    ring_rows: int | None = None  # query-ring rows; None: what the pool holds at this budget
    workspace_mb: int = DEFAULT_WORKSPACE_MB  # bound on one eviction round's transient memory

    @property
    def enabled(self) -> bool:
        return self.policy != DISABLED

    def build_policy(self) -> Policy:
        """The policy object; raises ValueError naming the bad parameter."""
        return _build_policy(self.policy, self.budget, self.window, self.n_large, self.sort_kept)

    def kept_prompt(self, prompt_len: int) -> int:
        """Leading KV columns eviction never touches: the prompt with keep_prompt, else none."""
        return prompt_len if self.keep_prompt else 0

    def geometry(self, prompt_len: int) -> Geometry:
        """Where a request with a ``prompt_len``-token prompt evicts (``engine.geometry``)."""
        return Geometry(self.budget, self.window, self.kept_prompt(prompt_len))

    def slot_bound(self, prompt_len: int) -> int:
        """Most KV slots the request can ever hold (VASE_SPEC, static footprint): max(prompt, B) + R,
        or prompt + B + R with keep_prompt."""
        return self.geometry(prompt_len).slot_bound(prompt_len)

    def memory_plan(self, shape: "ModelShape") -> "Plan":
        """How the query ring and the eviction workspace share the KV budget (``engine.memory``)."""
        from sglang_vase.engine.memory import Plan
        from sglang_vase.engine.ring import QueryRing

        return Plan(budget=self.budget, window=self.window, ring_row_bytes=QueryRing.row_bytes(shape, self.window),
                    workspace_bytes=self.workspace_mb << 20, ring_rows=self.ring_rows)

    def validate(self) -> "VaseParams":
        if self.policy != DISABLED and self.policy not in POLICIES:
            raise ValueError(
                f"vase policy: unknown policy {self.policy!r}; choose one of {sorted(POLICIES)} or '{DISABLED}'"
            )
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"vase seed must be a non-negative integer, got {self.seed!r}")
        if self.ring_rows is not None and (isinstance(self.ring_rows, bool) or not isinstance(self.ring_rows, int)
                                           or self.ring_rows < 0):
            raise ValueError(f"vase ring_rows must be a non-negative integer, got {self.ring_rows!r}")
        if self.mode not in MODES:
            raise ValueError(f"vase mode: unknown mode {self.mode!r}; choose one of {list(MODES)}")
        if not isinstance(self.keep_prompt, bool):
            raise ValueError(f"vase keep_prompt must be a boolean, got {self.keep_prompt!r}")
        if isinstance(self.workspace_mb, bool) or not isinstance(self.workspace_mb, int) or self.workspace_mb < 1:
            raise ValueError(f"vase workspace_mb must be a positive integer, got {self.workspace_mb!r}")
        if self.enabled:
            self.build_policy()
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


@lru_cache(maxsize=256)
def _build_policy(name, budget, window, n_large, sort_kept) -> Policy:
    params = {"budget": budget, "window": window, "sort_kept": sort_kept}
    if n_large is not None:
        if "n_large" not in policy_params(POLICIES[name]):
            raise ValueError(f"vase n_large: policy {name!r} has no value slots (n_large)")
        params["n_large"] = n_large
    return get_policy(name, **params)


def server_defaults() -> VaseParams | None:
    """The server's settings from the environment, or None when sglang-vase was not launched."""
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return None
    return VaseParams(**json.loads(raw))


def request_params(custom_params: dict | None, defaults: VaseParams) -> VaseParams:
    """Merge a request's ``custom_params["vase"]`` into the server defaults and validate.

    Raises ValueError with a message naming the field, which SGLang turns into an HTTP 400.
    """
    if custom_params is not None and not isinstance(custom_params, dict):
        raise ValueError(f"sampling_params.custom_params must be an object, got {custom_params!r}")
    override = (custom_params or {}).get("vase")
    if override is None or override is True:
        return defaults
    if override is False:
        return dataclasses.replace(defaults, policy=DISABLED)
    if not isinstance(override, dict):
        raise ValueError(f"custom_params.vase must be an object or a boolean, got {override!r}")
    unknown = set(override) - set(REQUEST_FIELDS)
    if unknown:
        raise ValueError(
            f"custom_params.vase: unknown field(s) {sorted(unknown)}; allowed: {list(REQUEST_FIELDS)}"
        )
    for name in ("budget", "window", "n_large", "seed"):
        value = override.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"custom_params.vase.{name} must be an integer, got {value!r}")
    for name in ("policy", "mode"):
        if name in override and not isinstance(override[name], str):
            raise ValueError(f"custom_params.vase.{name} must be a string, got {override[name]!r}")
    merged = dataclasses.replace(defaults, **override)
    if merged.window > defaults.window:
        raise ValueError(
            f"custom_params.vase.window ({merged.window}) must not exceed the server's --vase-window "
            f"({defaults.window}), the size of its query ring"
        )
    if "budget" in override and "n_large" not in override:
        merged = dataclasses.replace(merged, n_large=None)  # re-derive budget // 4
    try:
        return merged.validate()
    except ValueError as e:
        raise ValueError(f"custom_params.vase: {e}") from None
