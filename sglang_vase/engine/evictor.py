"""One eviction round for the requests that reached their trigger, batched across requests and layers.

For each request with physical length n (VASE_SPEC, "One eviction"; SGLANG_NOTES, "the key design
fact"):

    row      = req_to_token[r, :n]
    keep     = [L, H_kv, K] per-head indices into the n - R candidates
    per layer: K_l[row[0:K], h] = K_l[row[keep[l, h]], h]   (V likewise; through a temporary)
    new row  = row[0:K] ++ row[n-R:n]        the recency buffer moves by index only
    free       row[K:n-R]                    n - B slots back to the allocator
    length   = B;  position offset += n - B  RoPE positions stay absolute

Requests that share (settings, n) are selected together in one batched call per layer: in steady
state every request of one budget evicts at n = B + R, so a round is one batch.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

import torch

from sglang_vase.engine.selection import select_keep
from sglang_vase.engine.state import DeviceState, RequestState
from sglang_vase.kernels import compact_, score_candidates
from sglang_vase.kernels._dispatch import use_triton

# Debugging and tests: save every eviction's keep sets here (one file per request and eviction),
# so a reference can replay exactly what the engine kept. Costs a device-to-host copy per layer.
TRACE_DIR_ENV = "SGLANG_VASE_TRACE_DIR"


@dataclass
class Eviction:
    """A request due for eviction: its req_to_token row, physical length and state."""

    row: int
    length: int
    state: RequestState


def evict(
    due: list[Eviction],
    req_to_token: torch.Tensor,
    k_buffers: list[torch.Tensor],
    v_buffers: list[torch.Tensor],
    device: DeviceState,
) -> torch.Tensor:
    """Compact every due request's KV in place, rewrite its row, and update its state.

    Returns the slot ids the requests no longer use (the caller gives them back to the allocator
    and lowers each request's lengths to its budget).
    """
    groups: dict[tuple, list[Eviction]] = defaultdict(list)
    for e in due:
        groups[(e.state.params, e.length)].append(e)

    freed = []
    for (params, n), members in groups.items():
        policy = params.build_policy()
        b, r = params.budget, params.window
        k = b - r
        dev = req_to_token.device
        rows = torch.tensor([e.row for e in members], dtype=torch.int64, device=dev)
        seeds = torch.tensor([e.state.seed for e in members], dtype=torch.int64, device=dev)
        evictions = torch.tensor([e.state.evictions for e in members], dtype=torch.int64, device=dev)
        slots = req_to_token[rows, :n].long()  # [Bq, n]
        cand = slots[:, : n - r]
        last = n - 1 + device.position_offset[rows]  # true position of each request's newest token
        trace = [] if os.environ.get(TRACE_DIR_ENV) else None
        for layer, (k_buf, v_buf) in enumerate(zip(k_buffers, v_buffers)):
            keys = k_buf[cand].permute(0, 2, 1, 3)  # [Bq, H_kv, N, D]
            values = v_buf[cand].permute(0, 2, 1, 3)
            queries = device.window_queries(rows, layer, last, r) if policy.needs_queries else None
            keep = select_keep(policy, keys, values, queries, seeds, evictions, layer,
                               precomputed=kernel_scores(policy, k_buf, v_buf, cand, queries))
            compact_(k_buf, v_buf, cand, keep)
            if trace is not None:
                trace.append(keep.cpu())
        if trace is not None:
            _save_trace(members, n, torch.stack(trace, dim=1))
        # Recency buffer: slots n-R..n-1 move to columns K..B-1 by index.
        req_to_token[rows, k:b] = slots[:, n - r : n].to(req_to_token.dtype)
        device.position_offset[rows] += n - b
        freed.append(slots[:, k : n - r].reshape(-1))
        for e in members:
            e.state.evictions += 1
            e.state.evicted_tokens += n - b
    return torch.cat(freed)


def _save_trace(members: list[Eviction], n: int, keep: torch.Tensor) -> None:
    """keep: ``[Bq, L, H_kv, K]``."""
    folder = os.environ[TRACE_DIR_ENV]
    for j, e in enumerate(members):
        torch.save(
            {"rid": e.state.rid, "eviction": e.state.evictions, "length": n, "keep": keep[j].clone()},
            os.path.join(folder, f"{e.state.rid}-{e.state.evictions}.pt"),
        )


def kernel_scores(policy, k_buf, v_buf, cand, queries) -> dict | None:
    """On CUDA (or under the Triton interpreter), the attention score and value range straight from
    the KV pool with the scoring kernel: no [H_q, W, N] probability matrix in memory."""
    spec = policy.kernel_scoring() if policy.needs_queries else None
    if spec is None or not use_triton(k_buf, v_buf, cand):
        return None
    attn, vrange = score_candidates(k_buf, v_buf, cand, queries.transpose(1, 2), **spec)
    return {("attention", spec["temperature"], spec["smoothing"]): attn, ("value_range", spec["n_sink"]): vrange}
