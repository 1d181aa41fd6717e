"""Device memory eviction needs beside the KV pool, planned before SGLang sizes the pool.

Two buffers live outside SGLang's pool:
- the query ring (``engine.ring``): ``L x R x H_q x D`` model-dtype values per ring row. Only
  a request that can reach its trigger holds a row, and a pool of T tokens holds at most
  T // (B + R) of them at the server's budget B, so the ring gets that many rows (capped by
  ``--max-running-requests``, which then caps what is charged too; ``--vase-ring-rows``
  overrides) plus one scratch row;
- the eviction workspace (``evictor``): the bound on an eviction round's transient memory.

Both are charged to the KV budget before the pool's token count is computed: with cell = KV bytes
per token, the pool gets T = (budget - workspace - scratch row) // (cell + row / (B + R)) tokens,
so T * cell + (T // (B + R)) * row never exceeds the budget.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """What the ring's size depends on, per tensor-parallel rank."""

    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    dtype_bytes: int  # the model dtype: the ring stores post-RoPE queries as the model computes them

    @classmethod
    def from_model_config(cls, model_config, tp_size: int = 1) -> "ModelShape":
        """From SGLang's ``ModelConfig`` (no weights needed)."""
        return cls(
            layers=model_config.num_attention_layers,
            q_heads=model_config.get_num_attention_heads(tp_size),
            kv_heads=model_config.get_num_kv_heads(tp_size),
            head_dim=model_config.head_dim,
            v_head_dim=model_config.v_head_dim,
            dtype_bytes=model_config.dtype.itemsize,
        )

    def kv_cell_bytes(self, kv_dtype_bytes: int | None = None) -> int:
        """KV bytes per token (SGLang's MHA cell size)."""
        return self.layers * self.kv_heads * (self.head_dim + self.v_head_dim) * (kv_dtype_bytes or self.dtype_bytes)


@dataclass(frozen=True)
class Plan:
    """How the eviction's buffers and the KV pool share one budget."""

    budget: int  # B of the server
    window: int  # R of the server (the ring's depth)
    ring_row_bytes: int
    workspace_bytes: int
    ring_rows: int | None = None  # fixed by --vase-ring-rows; None = T // (B + R)

    def fixed_bytes(self) -> int:
        """Charged whatever the pool size: the workspace, the scratch row, fixed ring rows."""
        return self.workspace_bytes + (1 + (self.ring_rows or 0)) * self.ring_row_bytes

    def per_token_bytes(self) -> float:
        """The ring's share per pool token when its rows follow the pool (T // (B + R) rows)."""
        return 0.0 if self.ring_rows is not None else self.ring_row_bytes / (self.budget + self.window)

    def pool_tokens(self, kv_budget_bytes: int, cell_bytes: int, max_rows: int | None = None) -> int:
        """Tokens a KV budget buys once the eviction's buffers are charged to it. ``max_rows`` (the
        user's --max-running-requests per worker) caps the rows the ring will get: once the pool
        holds more than that many requests at B + R, only those rows are charged and the rest of
        the budget buys tokens."""
        free = kv_budget_bytes - self.fixed_bytes()
        tokens = int(free // (cell_bytes + self.per_token_bytes()))
        if self.ring_rows is None and max_rows is not None and tokens // (self.budget + self.window) > max_rows:
            tokens = int((free - max_rows * self.ring_row_bytes) // cell_bytes)
        return max(0, tokens)

    def rows_for(self, pool_tokens: int, max_running_requests: int) -> int:
        """Ring rows for a pool of ``pool_tokens`` (at most one per running request)."""
        rows = self.ring_rows if self.ring_rows is not None else pool_tokens // (self.budget + self.window)
        return max(0, min(rows, max_running_requests))

    def ring_bytes(self, rows: int) -> int:
        return (rows + 1) * self.ring_row_bytes

