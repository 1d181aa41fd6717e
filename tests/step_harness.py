"""Plain stand-ins for what ``engine.step`` asks of a scheduler: a request and a free list of slots
(no radix tree: no request holds tree columns, nothing to lock)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_vase.engine.state import RequestState


@dataclass
class Request:
    """``engine.step.Running`` for a request whose row holds only its own slots."""

    state: RequestState
    row: int
    length: int = 0
    protected: int = 0
    output_after_in_flight: int | None = None

    def release_tree(self) -> bool:
        return False

    def restore_tree(self) -> None:
        raise AssertionError("no tree lock was released")


class FreeList:
    """``engine.step.Slots`` over a list of slot ids; ``freed`` logs what came back, in order."""

    def __init__(self, slots):
        self.slots = [int(s) for s in slots]
        self.freed: list[int] = []

    def take(self) -> int:
        return self.slots.pop(0)

    def available(self) -> int:
        return len(self.slots)

    def alloc(self, count: int) -> torch.Tensor:
        out, self.slots = self.slots[:count], self.slots[count:]
        return torch.tensor(out, dtype=torch.int64)

    def free(self, slots: torch.Tensor) -> None:
        ids = slots.tolist()
        self.slots += ids
        self.freed += ids
