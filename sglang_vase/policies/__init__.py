"""KV-cache eviction policies: the registry and its factory.

Every module of this package is imported here, and every concrete ``Policy`` subclass (one that
defines ``name``) registers itself, so adding a policy touches exactly one file.

    from sglang_vase.policies import get_policy, POLICIES
    policy = get_policy("vase", budget=512, window=64)
    keep = policy.select(keys, values, queries, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

from sglang_vase.policies.base import REGISTRY, EvictionInputs, Policy

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

POLICIES: dict[str, type[Policy]] = REGISTRY

__all__ = ["POLICIES", "EvictionInputs", "Policy", "get_policy", "policy_params"]


def policy_params(cls: type[Policy]) -> dict[str, Any]:
    """Constructor parameters of a policy class, base first: name -> default (``inspect.Parameter.empty``
    if required). Collected over the MRO because subclasses forward ``**common`` to their parent."""
    params: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" not in klass.__dict__ or klass is object:
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                params[p.name] = p.default
    return params


def get_policy(name: str, **params: Any) -> Policy:
    """Instantiate the policy registered as ``name``; ValueError for unknown names or parameters."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(sorted(POLICIES))}")
    cls = POLICIES[name]
    accepted = policy_params(cls)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for policy {name!r}; valid: {', '.join(accepted)}"
        )
    missing = [p for p, default in accepted.items() if default is inspect.Parameter.empty and p not in params]
    if missing:
        raise ValueError(f"policy {name!r} requires parameter(s) {', '.join(missing)}")
    return cls(**params)
