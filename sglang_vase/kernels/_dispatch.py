"""When the Triton kernels run instead of the torch references."""

from __future__ import annotations

import os

import torch


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton on CUDA tensors, or anywhere under ``TRITON_INTERPRET=1`` (the CPU test route).

    The interpreter flag is read by ``triton.jit`` when a kernel is defined, so it must be set before
    this package is imported; reading it again here keeps dispatch and kernel definitions in step.
    """
    return interpreting() or all(t.is_cuda for t in tensors)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pow2_at_least(n: int, floor: int = 16) -> int:
    """Block size covering ``n``; ``tl.dot`` needs every dimension >= 16."""
    return max(floor, 1 << max(0, n - 1).bit_length())
