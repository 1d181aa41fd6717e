"""The query ring: post-RoPE queries of each request's last R tokens, the observation window that
the attention-scoring policies score with. Its whole life is this class:

- size: ``row_bytes`` per ring row (``L x R x H_q x D`` in the model dtype); ``engine.memory.Plan``
  charges ``pool // (B + R)`` rows plus the scratch row to the KV budget before SGLang sizes the pool
  (``patches/config_from_budget.py``);
- allocate: once per model runner, right after the KV pool and before CUDA-graph capture, so the
  forward's writes are recorded into the decode graph (``patches/alloc_memory_pool.py``);
- bind / release: a row per request that scores with queries and can reach its trigger, bound with
  its ``req_to_token`` row and released with it (``patches/req_to_token_pool_alloc.py``, ``_free.py``);
  admission lets such a request in only while a row is free (``patches/add_one_req.py``);
- write: inside every attention layer's forward, as plain tensor ops with fixed shapes and no host
  data (``patches/radix_attention_forward.py``); rows that hold no ring row write to scratch row 0;
- read: the evictor gathers each evicting request's window (``window_slots``, ``view``).
"""

from __future__ import annotations

import torch

from sglang_vase.engine.memory import ModelShape


class QueryRing:
    def __init__(self, pool_rows: int, rows: int, layers: int, window: int, q_heads: int, head_dim: int,
                 dtype, device):
        """``pool_rows``: SGLang's ``req_to_token`` rows; ``rows``: ring rows besides the scratch row."""
        self.window = window
        # [ring row, layer, position % window, query head, dim]
        self.buffer = torch.zeros((rows + 1, layers, window, q_heads, head_dim), dtype=dtype, device=device)
        # req_to_token row -> its ring row (0: the scratch row), read inside the forward
        self.row_of = torch.zeros(pool_rows, dtype=torch.int64, device=device)
        self._free = list(range(rows, 0, -1))

    @staticmethod
    def row_bytes(shape: ModelShape, window: int) -> int:
        return shape.layers * window * shape.q_heads * shape.head_dim * shape.dtype_bytes

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    @property
    def q_heads(self) -> int:
        return self.buffer.shape[3]

    # --- rows (host bookkeeping; the device map is written when a row is bound) ---------------
    def free_rows(self) -> int:
        return len(self._free)

    def bind(self, req_pool_idx: int) -> int:
        """Give the request in ``req_to_token`` row ``req_pool_idx`` a ring row; 0 if none is free."""
        if not self._free:
            return 0
        row = self._free.pop()
        self.row_of[req_pool_idx] = row
        return row

    def release(self, req_pool_idx: int, row: int) -> None:
        if row:
            self.row_of[req_pool_idx] = 0
            self._free.append(row)

    # --- the forward's writes (plain tensor ops: captured into the decode CUDA graph) ---------
    def record_decode(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, q: torch.Tensor) -> None:
        """One query per request: ``q`` is ``[bs, H_q, D]``, ``rows`` their ``req_to_token`` rows."""
        self.buffer[self.row_of[rows], layer, positions % self.window] = q.to(self.buffer.dtype)

    def record_extend(
        self, layer: int, rows: torch.Tensor, seq_lens: torch.Tensor, extend_lens: torch.Tensor,
        positions: torch.Tensor, q: torch.Tensor,
    ) -> None:
        """Prefill (or a chunk of it): keep the queries of each request's last ``window`` tokens.

        Tokens outside that tail are written to the scratch row 0 instead of being filtered out,
        which keeps every shape fixed and needs no host sync.
        """
        token_rows = torch.repeat_interleave(self.row_of[rows], extend_lens, output_size=q.shape[0])
        token_ends = torch.repeat_interleave(seq_lens, extend_lens, output_size=q.shape[0])
        in_tail = positions >= token_ends - self.window
        target_rows = torch.where(in_tail, token_rows, torch.zeros_like(token_rows))
        self.buffer[target_rows, layer, positions % self.window] = q.to(self.buffer.dtype)

    # --- the evictor's reads -----------------------------------------------------------------
    def window_slots(self, last: torch.Tensor, window: int) -> torch.Tensor:
        """Ring positions ``[Bq, window]`` of the ``window`` tokens up to true position ``last``
        (the same for every layer)."""
        offsets = torch.arange(window, device=last.device)
        return (last[:, None] - offsets[None, :]) % self.window

    def view(self, layers: range, q_heads: slice) -> torch.Tensor:
        """``[ring rows + 1, len(layers), window, heads, D]``: a view, read in place by the kernels."""
        return self.buffer[:, layers.start : layers.stop, :, q_heads]
