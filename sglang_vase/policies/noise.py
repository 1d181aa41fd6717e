"""Counter-based random numbers: reproducible per request, batched, no host sync.

A serving system needs every request's evictions to be reproducible from its own seed, whatever
else shares its batch, and the engine evicts many requests and layers in one batched call on the
GPU. A ``torch.Generator`` per request would force a Python loop; instead every random number is a
hash of (seed, stream, element index). ``seed`` and ``stream`` are int64 tensors broadcast over the
leading batch dimensions, so request ``r`` at eviction ``e`` of layer ``l`` gets the same numbers on
CPU and CUDA, alone or batched.

The hash is Chris Wellons' ``lowbias32`` applied to 32-bit lanes held in int64 (masking keeps every
intermediate non-negative, so shifts are logical and the low 32 bits of products are exact).
"""

from __future__ import annotations

from typing import Callable

import torch

_MASK32 = 0xFFFFFFFF


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _mix(seed: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per (seed, stream), using all 64 bits of the seed."""
    h = _lowbias32(seed & _MASK32)
    h = _lowbias32(h ^ ((seed >> 32) & _MASK32) ^ 0x9E3779B9)
    return _lowbias32(h ^ (stream & _MASK32) ^ 0x85EBCA6B)


def hashed_uniform(
    seed: torch.Tensor, stream: torch.Tensor, shape: tuple[int, ...], offset: int = 0
) -> torch.Tensor:
    """Uniform(0, 1) fp32 of ``batch + shape``; ``seed``/``stream`` are int64 of the batch shape.

    Element ``i`` (row-major over ``shape``) is the hash of ``offset + i``: a slice of a larger draw
    is that slice's numbers. Values lie strictly inside (0, 1), so ``log`` and ``-log(-log(u))`` are
    finite. ``kernels.noise.hashed_uniform`` computes the same numbers in one Triton launch.
    """
    seed = torch.as_tensor(seed, dtype=torch.int64)
    stream = torch.as_tensor(stream, dtype=torch.int64, device=seed.device)
    key = _mix(seed, stream).reshape(*seed.shape, *([1] * len(shape)))
    numel = 1
    for s in shape:
        numel *= s
    idx = torch.arange(offset, offset + numel, device=seed.device, dtype=torch.int64).reshape(shape)
    bits = _lowbias32(_lowbias32(idx ^ key) + key)
    # 23 bits, so that the largest value, 1 - 2**-24, is exact in fp32 (with 24 bits it rounds to 1.0,
    # and the Gumbel noise of a 1.0 is +inf).
    return ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))


# Draws take the uniform source as an argument: this module's, or its Triton twin (same numbers).
Uniform = Callable[[torch.Tensor, torch.Tensor, tuple, int], torch.Tensor]


def gumbel(seed: torch.Tensor, stream: torch.Tensor, shape: tuple[int, ...], offset: int = 0,
           uniform: Uniform = hashed_uniform) -> torch.Tensor:
    """Standard Gumbel noise: ``-log(-log(U))``."""
    return -torch.log(-torch.log(uniform(seed, stream, shape, offset)))


def normal(seed: torch.Tensor, stream: torch.Tensor, shape: tuple[int, ...],
           uniform: Uniform = hashed_uniform) -> torch.Tensor:
    """Standard normal noise by Box-Muller over two halves of one hashed uniform draw.

    Both uniforms come from ``stream`` itself (not from derived streams such as ``2 * stream``,
    which would coincide with the streams that other draws use and correlate them).
    """
    u = uniform(seed, stream, (2, *shape), 0)
    u1, u2 = u.unbind(dim=torch.as_tensor(seed).dim())
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)


def seed_from_generator(generator: torch.Generator | None) -> int:
    """Draw a 62-bit request seed from a torch generator (the single-request reference form)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())
