"""Triton kernels for VaSE eviction, working directly on SGLang's per-layer KV buffers.

Both entry points take every layer's ``[S, H_kv, D]`` K and V buffers (SGLang's per-layer pool,
indexed by slot id) and a ``slots`` tensor ``[Bq, N]`` (the requests' ``req_to_token`` rows,
candidates only), and cover all layers in a fixed number of launches. They run Triton on CUDA
tensors it can load (or under ``TRITON_INTERPRET=1``) and the torch references otherwise.
"""

from sglang_vase.kernels.compaction import compact_, compact_reference_
from sglang_vase.kernels.scoring import score_candidates, score_candidates_reference

__all__ = ["compact_", "compact_reference_", "score_candidates", "score_candidates_reference"]
