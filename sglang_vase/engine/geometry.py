"""Where a request's evictions fall: its budget B, recency window R and kept prompt (VASE_SPEC).

Every path that needs the B/R arithmetic asks one ``Geometry``: the engine's trigger and counters
(``RequestState``), admission's slot bounds, the reference replay and the fidelity benchmark. Lengths
are physical KV lengths n (slots a request's row holds). The first ``kept_prompt`` columns (the prompt with
keep_prompt, else none) are never evicted; the evictable length g = n - kept_prompt triggers an eviction
after a decode step when g > B and g % R == 0, and drops to B: K = B - R candidates are kept beside
the R newest tokens.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Geometry:
    budget: int
    window: int
    kept_prompt: int = 0  # leading columns never evicted: the prompt with keep_prompt

    @property
    def n_keep(self) -> int:
        """K = B - R: candidates an eviction keeps beside the recency window."""
        return self.budget - self.window

    @property
    def evicted_length(self) -> int:
        """Physical length right after an eviction: kept_prompt + B."""
        return self.kept_prompt + self.budget

    def triggers(self, n: int) -> bool:
        """Whether a decode step that leaves physical length ``n`` (the new token included) evicts."""
        g = n - self.kept_prompt
        return g > self.budget and g % self.window == 0

    def next_trigger(self, n: int) -> int:
        """The first physical length above ``n`` that triggers, evicting no earlier than that (a
        length at or below kept_prompt + B never triggers)."""
        return self.kept_prompt + (max(self.budget, n - self.kept_prompt) // self.window + 1) * self.window

    def evictions_in(self, prefill_len: int, new_tokens: int) -> int:
        """Evictions while a (re)prefill of ``prefill_len`` tokens goes on to sample ``new_tokens``.

        The prefill samples the first token; decode step k writes token k and samples token k + 1, at
        physical length prefill + k. The step that samples the last token finishes the request, which
        is then released, not evicted: triggers count for n up to prefill + new_tokens - 2, from the
        first one above the prefill, then every R steps (g drops to B at each)."""
        first, last = self.next_trigger(prefill_len), prefill_len + new_tokens - 2
        return 0 if first > last else 1 + (last - first) // self.window

    def will_evict(self, n: int, remaining_new_tokens: int) -> bool:
        """Whether a running request at physical length ``n`` (already evicted if due) reaches another
        trigger while sampling ``remaining_new_tokens`` more tokens (the last one never evicts)."""
        return self.next_trigger(n) <= n + remaining_new_tokens - 1

    def slot_bound(self, prefill_len: int, evicted: bool = False) -> int:
        """Most KV slots the request can hold from now on (VASE_SPEC, static footprint): kept_prompt +
        max(prefill - kept_prompt, B) + R until its first eviction after a (re)prefill of ``prefill_len``
        tokens, kept_prompt + B + R once ``evicted`` (it then oscillates between kept_prompt + B and that)."""
        if evicted:
            return self.evicted_length + self.window
        return self.kept_prompt + max(prefill_len - self.kept_prompt, self.budget) + self.window
