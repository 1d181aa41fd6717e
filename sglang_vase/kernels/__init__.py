"""Triton kernels for VaSE eviction, working directly on SGLang's per-layer KV buffers.

Both entry points take one layer's ``k_buf``/``v_buf`` of shape ``[S, H_kv, D]`` indexed by slot id and
a ``slots`` tensor ``[Bq, N]`` (a request's ``req_to_token`` row, candidates only). They run Triton on
CUDA tensors (or under ``TRITON_INTERPRET=1``) and the torch references otherwise.
"""

from sglang_vase.kernels.compaction import compact_, compact_reference_
from sglang_vase.kernels.scoring import score_candidates, score_candidates_reference

__all__ = ["compact_", "compact_reference_", "score_candidates", "score_candidates_reference"]
