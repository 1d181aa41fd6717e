"""The patches this process registered with SGLang's ``HookRegistry``, and the check that SGLang
applied them (it only logs a plugin that fails to apply).

``plugin.load`` registers the active patches here in every SGLang process; ``scheduler_init``
checks them once SGLang has applied the hooks. This module imports no patch, so the patch that
checks does not import the plugin that imports it.
"""

from __future__ import annotations

_registered: list[str] = []
_sglang_version = ""


def register(patches, sglang_version: str) -> None:
    """Register each patch's ``hook`` on its ``TARGET``; ``sglang_version`` is the one they were
    checked against."""
    global _sglang_version
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    _sglang_version = sglang_version
    for patch in patches:
        HookRegistry.register(patch.TARGET, patch.hook, HookType[patch.HOOK_TYPE])
        _registered.append(patch.TARGET)


def check_applied() -> None:
    """Raise if a registered patch did not apply. The registry's record is the truth: a target
    SGLang already decorates (``functools.wraps``) has ``__wrapped__`` either way."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    missing = [t for t in _registered if t not in HookRegistry._patched]
    if missing:
        raise RuntimeError(f"sglang-vase patches did not apply (is sglang {_sglang_version} installed?): {missing}")
