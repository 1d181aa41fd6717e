"""The evictor's debugging and test hooks, read from the environment once per process.

- ``SGLANG_VASE_TRACE_DIR``: save every eviction's keep sets there (one file per request and
  eviction), so a reference can replay exactly what the engine kept (``reference.engine_trace``).
  Costs a device-to-host copy per batch.
- ``SGLANG_VASE_TEST_FAIL_EVICTION``: ``"select:<text>"`` or ``"apply:<text>"`` (comma-separated)
  makes that phase raise for requests whose id contains <text> (as SGLang's ``SGLANG_TEST_RETRACT``
  forces retractions), to show that a failure stays with its request.

A server process reads them when it imports the engine; tests in one process swap ``HOOKS``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

TRACE_DIR_ENV = "SGLANG_VASE_TRACE_DIR"
FAULT_ENV = "SGLANG_VASE_TEST_FAIL_EVICTION"


@dataclass(frozen=True)
class Hooks:
    trace_dir: str | None = None
    faults: tuple[tuple[str, str], ...] = ()  # (phase, text in the request id)

    @classmethod
    def from_env(cls, env=os.environ) -> "Hooks":
        faults = []
        for spec in filter(None, env.get(FAULT_ENV, "").split(",")):
            phase, _, needle = spec.partition(":")
            if needle:
                faults.append((phase, needle))
        return cls(env.get(TRACE_DIR_ENV) or None, tuple(faults))

    def fail(self, phase: str, rids) -> None:
        """Raise for the first request id a fault names in this phase."""
        for where, needle in self.faults:
            for rid in rids:
                if where == phase and needle in rid:
                    raise RuntimeError(f"injected {phase} failure ({FAULT_ENV}) for request {rid}")

    def save_trace(self, records: list[dict]) -> None:
        """One file per record (``rid``, ``eviction``, ``keep`` and what else it carries)."""
        for record in records:
            torch.save(record, self._path(record["rid"], record["eviction"]))

    def discard_trace(self, rid: str, eviction: int) -> None:
        """Drop the trace of an eviction taken back (``RequestState.settle``): its index is reused."""
        path = self._path(rid, eviction)
        if os.path.exists(path):
            os.remove(path)

    def _path(self, rid: str, eviction: int) -> str:
        return os.path.join(self.trace_dir, f"{rid}-{eviction}.pt")


HOOKS = Hooks.from_env()
