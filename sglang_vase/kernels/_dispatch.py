"""When the Triton kernels run instead of the torch references: for the engine, ``Route.of`` decides
it from the KV pool's buffer, once per eviction group, and every kernel of the group follows it; a
kernel called without a route decides by its own tensors with the same rule."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Triton compiles loads of fp8 e4m3 only from compute capability 8.9 on (Ada, Hopper and later):
# below, it knows only fp8e5 and fp8e4b15 ("type fp8e4nv not supported in this architecture").
_FP8_E4M3 = {getattr(torch, name) for name in ("float8_e4m3fn", "float8_e4m3fnuz") if hasattr(torch, name)}
FP8_E4M3_MIN_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class Route:
    """Where eviction on one KV pool runs."""

    scoring: bool  # the Triton scoring kernel, which loads the KV dtype (not fp8 e4m3 below 8.9)
    compaction: bool  # the Triton compaction and noise kernels: they move raw bytes, any KV dtype

    @classmethod
    def of(cls, k_buf: torch.Tensor) -> "Route":
        return cls(scoring=use_triton(k_buf), compaction=use_triton(as_bytes(k_buf)))


def as_bytes(buf: torch.Tensor) -> torch.Tensor:
    """The buffer as same-size integers: compaction moves bytes, whatever the KV dtype (fp8 too)."""
    return buf.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[buf.element_size()])


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton on CUDA tensors it can load, or anywhere under ``TRITON_INTERPRET=1`` (the CPU test route).

    The interpreter flag is read by ``triton.jit`` when a kernel is defined, so it must be set before
    this package is imported; reading it again here keeps dispatch and kernel definitions in step.
    """
    if interpreting():
        return True
    if not all(t.is_cuda for t in tensors):
        return False
    return all(triton_loads(t.dtype, torch.cuda.get_device_capability(t.device)) for t in tensors)


def triton_loads(dtype: torch.dtype, capability: tuple[int, int]) -> bool:
    """Whether a Triton kernel can load ``dtype`` on a GPU of ``capability``: an fp8 e4m3 KV cache
    (``--kv-cache-dtype fp8_e4m3``) below 8.9 (Ampere, Turing) is scored by the torch path, which
    converts it in PyTorch's own kernels. (Compaction moves raw bytes, whatever the dtype.)"""
    return dtype not in _FP8_E4M3 or tuple(capability) >= FP8_E4M3_MIN_CAPABILITY


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pow2_at_least(n: int, floor: int = 16) -> int:
    """Block size covering ``n``; ``tl.dot`` needs every dimension >= 16."""
    return max(floor, 1 << max(0, n - 1).bit_length())
