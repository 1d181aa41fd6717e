"""The counter-based uniform noise of ``sglang_vase.policies.noise`` in one launch.

``policies.noise.hashed_uniform`` (the reference) hashes (seed, stream, element index) with about fifty
int64 tensor ops, each the size of the draw: at an eviction of every layer at once that is the
largest share of the round's launches and of its transient memory. This kernel computes the same
32-bit hash in uint32 registers (the reference masks every step to 32 bits: wrapping multiplies and
logical shifts are the same arithmetic) and the same 23-bit float, so its numbers are bit for bit
the reference's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _lowbias32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit(do_not_specialize=["numel", "offset"])
def _uniform_kernel(seed_ptr, stream_ptr, out_ptr, numel, offset, BLOCK: tl.constexpr):
    element = tl.program_id(0).to(tl.int64)  # one batch element (request, layer)
    seed = tl.load(seed_ptr + element)
    stream = tl.load(stream_ptr + element)
    # _mix(seed, stream): all 64 bits of the seed, the low 32 of the stream.
    h = _lowbias32((seed & 0xFFFFFFFF).to(tl.uint32))
    h = _lowbias32(h ^ ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32) ^ 0x9E3779B9)
    key = _lowbias32(h ^ (stream & 0xFFFFFFFF).to(tl.uint32) ^ 0x85EBCA6B)
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    index = ((offset + i) & 0xFFFFFFFF).to(tl.uint32)
    bits = _lowbias32(_lowbias32(index ^ key) + key)
    u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    tl.store(out_ptr + element * numel + i, u, mask=i < numel)


def hashed_uniform(seed: torch.Tensor, stream: torch.Tensor, shape: tuple[int, ...], offset: int = 0) -> torch.Tensor:
    """``policies.noise.hashed_uniform`` (same arguments, same numbers) on a device Triton runs on."""
    batch = torch.broadcast_shapes(seed.shape, stream.shape)
    seed = seed.to(torch.int64).expand(batch).reshape(-1)
    stream = stream.to(seed.device, torch.int64).expand(batch).reshape(-1)
    numel = 1
    for s in shape:
        numel *= s
    out = torch.empty(*batch, *shape, dtype=torch.float32, device=seed.device)
    if out.numel():
        _uniform_kernel[(seed.numel(), triton.cdiv(numel, BLOCK))](seed, stream, out, numel, offset, BLOCK=BLOCK)
    return out
