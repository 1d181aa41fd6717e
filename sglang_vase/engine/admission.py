"""How many KV slots an evicting request may still take: what admission reserves for it.

SGLang's admission (``PrefillAdder``) counts as held the slots each request owns
(``[cache_protected_len, kv_allocated_len)`` of its row) and, once, the radix-tree slots locked by
running requests; it reserves each running request's future growth on top. An evicting request's
growth is bounded by its slot bound (``RequestState.slot_bound``) instead of its remaining output.

With the radix cache, a request's first columns (``protected``) are tree slots. An eviction copies
the kept ones into slots the request owns (copy-on-evict, ``engine.evictor``), after which, in the
paper's mode, it reads no tree slot and releases its tree lock: the tree columns that only it held
(``exclusive``) become evictable and can be the very slots the copy takes. Its own slots never exceed
``own_bound``; N requests on one shared P-token prefix therefore reserve P + N x own_bound.
"""

from __future__ import annotations

from sglang_vase.engine.state import RequestState


def releases_tree(st: RequestState, protected: int) -> bool:
    """Whether its next eviction ends its reads of tree columns (the paper's mode: no kept prompt),
    so that the tree columns only it holds become evictable."""
    return protected > 0 and st.kept_prompt == 0


def own_bound(st: RequestState, protected: int, exclusive: int = 0) -> int:
    """Most slots it can hold beyond the shared tree columns from now on: its own slots plus the
    ``exclusive`` tree columns until its next eviction, its own slots after it (the kept prompt's columns
    it keeps reading from the tree excluded). ``exclusive`` counts only where the eviction releases
    them (``releases_tree``)."""
    if not releases_tree(st, protected):
        exclusive = 0
    after = st.geometry.slot_bound(st.prefill_len, evicted=True) - min(protected, st.kept_prompt)
    before = st.slot_bound() - protected + exclusive
    return max(before, after)


def future_slots(st: RequestState, length: int, protected: int, remaining_output: int, exclusive: int = 0) -> int:
    """Slots a running request at physical length ``length`` may still add to what SGLang counts
    as held (its own slots and the ``exclusive`` tree columns), sampling ``remaining_output`` more
    tokens. Bounded by its remaining output too, unless its next eviction copies shared tree
    columns, which takes more slots at once than one decode step adds."""
    if not releases_tree(st, protected):
        exclusive = 0
    held = length - protected + exclusive
    growth = max(0, own_bound(st, protected, exclusive) - held)
    if protected > st.kept_prompt and st.geometry.will_evict(length, remaining_output):
        return growth
    return min(remaining_output, growth)


def admission_slots(st: RequestState, fill: int, matched: int, remaining_output: int, radix: bool) -> int:
    """Slots a request being admitted may add after its prefill of ``fill`` tokens, ``matched`` of
    them already in the tree. With the radix cache its prefill inserts the whole fill into the tree
    (tree columns it alone holds: ``fill - matched``); without, it owns all of them."""
    protected, exclusive = (fill, fill - matched) if radix else (0, 0)
    return future_slots(st, fill, protected, remaining_output, exclusive)
