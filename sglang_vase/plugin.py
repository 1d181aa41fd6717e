"""SGLang plugin entry point (group ``sglang.srt.plugins``): registers the patches in ``patches/``.

SGLang calls ``load`` in every process it starts (the launcher's, each scheduler's, the
detokenizer's). It does nothing unless the server was started by ``sglang_vase.launch_server``
(which sets SGLANG_VASE_CONFIG), so installing sglang-vase leaves plain SGLang untouched, and with
``--vase-policy none`` only the request check applies. ``registration`` records what it registered,
for ``scheduler_init`` to check that SGLang applied it.
"""

from __future__ import annotations

import logging

from sglang_vase.config import server_defaults
from sglang_vase.registration import register

logger = logging.getLogger(__name__)


def _active_patches():
    from sglang_vase.patches import all_patches

    defaults = server_defaults()
    if defaults is None:
        return []
    return [p for p in all_patches() if defaults.enabled or getattr(p, "ALWAYS", False)]


def load() -> None:
    from sglang_vase.patches import SGLANG_VERSION

    _cpu_route_store_kv()
    register(_active_patches(), SGLANG_VERSION)


def _cpu_route_store_kv() -> None:
    """On the CPU route, store KV with torch ops: SGLang picks ``sgl_kernel.store_cache_cpu`` on
    CPUs with AMX, which our ``sgl_kernel`` stand-in cannot provide. The flag is computed when
    ``sglang.srt.mem_cache.memory_pool`` is imported (before plugins load), so set it directly.
    """
    try:
        import sgl_kernel
    except ImportError:
        return
    if getattr(sgl_kernel, "IS_CPU_STANDIN", False):
        from sglang.srt.mem_cache import memory_pool

        memory_pool._cpu_has_amx_support = False
