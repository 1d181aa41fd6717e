"""Replay what a server evicted: the keep sets an engine wrote to ``SGLANG_VASE_TRACE_DIR`` (one file
per request and eviction) applied by the plain-PyTorch reference to the same prompt, compared
token by token with the server's greedy output and logprobs. The proof that SGLang's per-head
compaction with true positions computes what the reference computes on the same keep sets."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import torch

from sglang_vase.policies.base import Policy
from sglang_vase.reference.replay import EvictingDecoder


@dataclass(frozen=True)
class TraceReplay:
    steps: int  # output tokens compared
    traces: int  # eviction files the engine wrote for the request
    evictions: int  # evictions the reference made on the same schedule
    first_mismatch: int | None  # first step whose greedy token differs, None if none does
    max_logprob_error: float  # over each step's chosen and top tokens
    keep_agreement: float  # share of (eviction, layer) keep sets the reference would also select


def replay_engine_trace(model, policy: Policy, prompt_ids: list[int], output: dict, trace_dir: str,
                        keep_prompt: bool = False) -> TraceReplay:
    """``output``: the server's /generate answer for ``prompt_ids`` (greedy, ``return_logprob`` with
    ``top_logprobs_num``) under ``policy`` (and ``keep_prompt``, as the request set it)."""
    meta, out_ids = output["meta_info"], output["output_ids"]
    files = sorted(glob.glob(os.path.join(trace_dir, f"{meta['id']}-*.pt")),
                   key=lambda p: int(p.rsplit("-", 1)[1][:-3]))
    recorded = {t["eviction"]: t["keep"] for t in map(torch.load, files)}
    agree = []

    def engine_keep(eviction, layer):
        # Also what the reference itself would keep from the same state: selection agrees too.
        agree.append(torch.equal(ref.select_layer(layer).cpu(), recorded[eviction][layer]))
        return recorded[eviction][layer]

    ref = EvictingDecoder(model, policy, seed=meta["vase"]["seed"], keep_override=engine_keep, keep_prompt=keep_prompt)
    logits = ref.prefill(prompt_ids)
    max_err, mismatch = 0.0, None
    for step, token in enumerate(out_ids):
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        if mismatch is None and int(logprobs.argmax()) != token:
            mismatch = step
        max_err = max(max_err, abs(float(logprobs[token]) - meta["output_token_logprobs"][step][0]))
        for lp, tok, _ in meta["output_top_logprobs"][step]:
            max_err = max(max_err, abs(float(logprobs[tok]) - lp))
        if step + 1 < len(out_ids):  # the engine never feeds its last output token back
            logits = ref.step(token)
    return TraceReplay(len(out_ids), len(files), ref.evictions, mismatch, max_err,
                       sum(agree) / max(1, len(agree)))
