"""Prometheus counters for evictions (with ``--enable-metrics``), in the scheduler process.

Created lazily from the scheduler's metrics-collector hook: ``prometheus_client`` must not be
imported before SGLang sets its multiprocess directory, which happens after plugins load.
"""

from __future__ import annotations

_COUNTERS: dict | None = None
_LABELS: dict = {}


def init(labels: dict) -> None:
    global _COUNTERS, _LABELS
    from prometheus_client import Counter, Gauge

    names = list(labels)
    _LABELS = labels
    _COUNTERS = {
        "evictions": Counter("sglang:vase_evictions_total", "Request evictions performed by sglang-vase", names),
        "freed": Counter("sglang:vase_freed_slots_total", "KV slots freed by sglang-vase evictions", names),
        "forced": Counter("sglang:vase_forced_evictions_total",
                          "Evictions the KV pool's shortage forced (pressure mode)", names),
        "forced_freed": Counter("sglang:vase_forced_freed_slots_total",
                                "KV slots freed by evictions the pool's shortage forced", names),
        "kv_used": Gauge(
            "sglang:vase_kv_used_slots", "KV slots held by running requests after evictions", names,
            multiprocess_mode="mostrecent",
        ),
    }


def enabled() -> bool:
    return _COUNTERS is not None


def record_evictions(requests: int, freed_slots: int, forced: bool = False) -> None:
    """Count a round's evictions; ``forced`` ones (pressure mode) are counted again on their own."""
    _COUNTERS["evictions"].labels(**_LABELS).inc(requests)
    _COUNTERS["freed"].labels(**_LABELS).inc(freed_slots)
    if forced:
        _COUNTERS["forced"].labels(**_LABELS).inc(requests)
        _COUNTERS["forced_freed"].labels(**_LABELS).inc(freed_slots)


def record_kv_used(slots: int) -> None:
    _COUNTERS["kv_used"].labels(**_LABELS).set(slots)
