"""SGLang patches: one module per SGLang symbol sglang-vase changes (checked against sglang 0.5.23).

Each module names its ``TARGET`` (the dotted symbol), its ``HOOK_TYPE`` (a HookRegistry hook type
name) and a ``hook`` function; ``sglang_vase.plugin`` registers them through SGLang's plugin
mechanism, so they apply in every SGLang process, the spawned schedulers included. A patch imports
no other patch: what several share lives in ``sglang_vase`` (``admission_sglang``, ``request_stats``,
``registration``).
"""

import importlib
import pkgutil

SGLANG_VERSION = "0.5.23"


def all_patches():
    """Every patch module, in a stable order."""
    return [
        importlib.import_module(f"{__name__}.{m.name}")
        for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)
    ]
