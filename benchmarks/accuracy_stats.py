"""Statistics of an accuracy grid (benchmarks/accuracy_grid.py): paired differences between two
systems over the same questions, and repetition loops in outputs.

Paired difference: for every question both systems answered, d_q = (its pass@1 under the system)
- (its pass@1 under the reference), each over that system's own samples of it; the mean of d_q
with a 95% normal interval (1.96 standard errors, the sample std of d_q / sqrt(#questions)).
Pairing over questions removes the spread of question difficulty that the two pass@1s share.

Loop: an output whose last ``tail`` tokens are mostly repetition. A tail position is "repeated"
when some ``ngram``-token span covering it occurs at least ``times`` (3) times in the tail; the
output loops when at least ``cover`` of its tail positions are repeated (and the tail holds at
least ``min_tokens``). A solution that restates a formula, or rewrites a code block once to fix
it, repeats spans twice and is not a loop; a model cycling through the same sentences repeats
them until it runs out of tokens (every cycle up to 170 tokens long shows 3 times in 512).
"""

from __future__ import annotations

import math
from collections import defaultdict

Z95 = 1.96
LOOP_TAIL = 512
LOOP_NGRAM = 16
LOOP_COVER = 0.5
LOOP_MIN_TOKENS = 64
LOOP_TIMES = 3


def per_question(records: list[dict]) -> dict[str, float]:
    """Each question's pass@1 over the samples ``records`` hold for it."""
    by_q = defaultdict(list)
    for r in records:
        by_q[r["qid"]].append(bool(r["correct"]))
    return {q: sum(v) / len(v) for q, v in by_q.items()}


def paired_difference(system: list[dict], reference: list[dict]) -> dict:
    """Mean per-question pass@1 difference (system - reference) over the questions both have."""
    a, b = per_question(system), per_question(reference)
    common = sorted(set(a) & set(b), key=int)
    d = [a[q] - b[q] for q in common]
    n = len(d)
    mean = sum(d) / n if n else float("nan")
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
    return {"diff": mean, "se": se, "ci95": [mean - Z95 * se, mean + Z95 * se], "n_questions": n}


def repeated_share(tokens: list[int], ngram: int = LOOP_NGRAM, times: int = LOOP_TIMES) -> float:
    """Share of positions covered by an ``ngram``-token span that occurs at least ``times`` times in ``tokens``."""
    if len(tokens) < times * ngram:
        return 0.0
    counts = defaultdict(int)
    spans = [tuple(tokens[i:i + ngram]) for i in range(len(tokens) - ngram + 1)]
    for s in spans:
        counts[s] += 1
    covered = [False] * len(tokens)
    for i, s in enumerate(spans):
        if counts[s] >= times:
            covered[i:i + ngram] = [True] * ngram
    return sum(covered) / len(tokens)


def is_loop(tokens: list[int], tail: int = LOOP_TAIL, ngram: int = LOOP_NGRAM, cover: float = LOOP_COVER,
            min_tokens: int = LOOP_MIN_TOKENS, times: int = LOOP_TIMES) -> bool:
    """Does the output end in a repetition loop (see the module docstring)?"""
    end = tokens[-tail:]
    return len(end) >= min_tokens and repeated_share(end, ngram, times) >= cover
