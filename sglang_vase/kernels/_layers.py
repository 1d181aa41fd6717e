"""All layers in one launch: reach SGLang's per-layer KV buffers through offsets from the first.

SGLang allocates one K and one V tensor per layer. A kernel that covers every layer takes layer 0's
buffer as its base pointer and an int64 tensor of element offsets ``(data_ptr(l) - data_ptr(0)) /
itemsize``: pointer arithmetic, valid across allocations on the GPU and under the interpreter. The
buffers live as long as the server, so the offsets are computed and copied to the device once
(the startup warm-up, or the first round of a new chunk of layers) and cached by their addresses.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch


def layer_stack(layers: Sequence[torch.Tensor]) -> tuple[torch.Size, tuple[int, ...], torch.dtype]:
    """The common (shape, strides, dtype) of a layer list; raises unless every layer shares them."""
    if not layers:
        raise ValueError("need at least one layer")
    first = layers[0]
    for i, t in enumerate(layers):
        if t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"layer {i} is {tuple(t.shape)}/{t.stride()}/{t.dtype}/{t.device}; layer 0 is "
                             f"{tuple(first.shape)}/{first.stride()}/{first.dtype}/{first.device}")
    return first.shape, first.stride(), first.dtype


def layer_offsets(layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """int64 ``[L]`` on the layers' device: element offset of layer l's storage from layer 0's.

    Views of the same buffers at the same offset (a chunk of KV heads) share the offsets, and are
    keyed by their allocations; a new key's copy is pinned and non-blocking, so even a first use
    mid-serving (a new chunk of layers) does not wait for the device."""
    itemsize = layers[0].element_size()
    bases = tuple(t.untyped_storage().data_ptr() for t in layers)
    if any(t.storage_offset() != layers[0].storage_offset() for t in layers):
        raise ValueError("layer views must start at the same offset in their buffers")
    return _offsets(bases, itemsize, layers[0].device)


@lru_cache(maxsize=256)
def _offsets(pointers: tuple[int, ...], itemsize: int, device: torch.device) -> torch.Tensor:
    deltas = [p - pointers[0] for p in pointers]
    if any(d % itemsize for d in deltas):
        raise ValueError(f"layer buffers are not {itemsize}-byte aligned to one another")
    host = torch.tensor([d // itemsize for d in deltas], dtype=torch.int64)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
