"""Plain-PyTorch reference of the engine's per-request eviction (see ``replay``)."""

from sglang_vase.reference.replay import EvictingDecoder, Row, generate, load_model, teacher_forced

__all__ = ["EvictingDecoder", "Row", "generate", "load_model", "teacher_forced"]
