"""CurDKV leverage scores from a Gaussian sketch, and VaSE-DKV (the sketch redrawn every eviction)."""

from __future__ import annotations

import math

import torch

from sglang_vase.policies.base import EvictionInputs, Policy, check_int

# Noise stream of the projection (stream 0 is the selection's Gumbel noise).
_PROJECTION_STREAM = 1


class CurDKV(Policy):
    """CurDKV: top-k of ||K G||^2 ||V G||^2 (normalised per head, sinks set to 1), G fixed per request.

    G ~ N(0, 1) / sqrt(proj_dim) of shape [D, proj_dim]: one per batch element (request, layer),
    shared by its KV heads as in the paper. It depends on the request seed only, not on the
    eviction counter. In the single ``select()`` form the seed is drawn from the generator, so
    generators with the same seed reproduce G.

    Parameters (besides budget, window, n_sink, sort_kept):
        proj_dim: columns of G. Default 20.
    """

    name = "curdkv"
    resample_projection = False

    def __init__(self, budget: int, *, proj_dim: int = 20, **common):
        super().__init__(budget, **common)
        check_int("proj_dim", proj_dim, minimum=1)
        self.proj_dim = proj_dim

    def scores(self, x: EvictionInputs) -> torch.Tensor:
        shape = (x.keys.shape[-1], self.proj_dim)
        g = x.noise("normal", _PROJECTION_STREAM, shape, per_eviction=self.resample_projection)
        g = (g / math.sqrt(self.proj_dim)).unsqueeze(-3)  # [..., 1, D, r]: broadcast over KV heads
        lev = (x.keys.float() @ g).square().sum(-1) * (x.values.float() @ g).square().sum(-1)
        # The clamp keeps all-zero K or V (e.g. padding) finite instead of 0/0.
        lev = lev / lev.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        lev[..., : self.n_sink] = 1.0  # >= any normalised score
        return lev


class VaSEDKV(CurDKV):
    """VaSE-DKV: CurDKV with a fresh projection G at every eviction (keyed by seed and step).

    Parameters: as ``curdkv``.
    """

    name = "vase-dkv"
    resample_projection = True
