"""Admission of evicting requests in SGLang's terms (sglang 0.5.23): what each one reserves.

SGLang reserves, for every running and new request, up to 4096 future tokens
(SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION) scaled by ``new_token_ratio``. An evicting request never
holds more than its slot bound, so it needs exactly what ``engine.admission`` computes, however
large, and no more. The patches of ``PrefillAdder`` use this module: the running-request estimate
(``prefill_adder``) is ``future_tokens``; ``add_one_req`` and ``add_chunked_req`` use
``reserve_as_bounded`` for the new request, and ``check_prefill`` admits it when it fits exactly
(``EXACT_FIT``); ``add_one_req_ignore_eos`` keeps the evicting requests out of SGLang's
whole-lifetime simulation for eviction-disabled ``ignore_eos`` requests. ``slot_capacity`` is what
one request can ever hold (``init_req_max_new_tokens``, ``add_request_to_queue``).

Pressure mode: when admission stops for want of slots (``NO_TOKEN``), ``add_one_req`` notes how many
free slots would have let it go on (``note_deficit``, in SGLang's own arithmetic); the next step's
eviction phase takes it (``take_deficit``) and evicts requests keeping their full cache until that
many are free.

With the radix cache, shared tree slots are counted once (SGLang counts the locked ones as held),
and a request whose next eviction releases its tree lock frees the tree columns only it holds: a
per-step census of the running requests' tree paths (``PrefixCensus``) says which those are.
"""

from collections import Counter
from contextlib import contextmanager

from sglang.srt.managers import schedule_policy

from sglang_vase.engine.admission import admission_slots, future_slots, releases_tree
from sglang_vase.engine.state import request_state

# The flag ``reserve_as_bounded`` sets on SGLang's ``PrefillBudget`` while its reservation is the
# exact bound; ``check_prefill`` then admits on an exact fit.
EXACT_FIT = "vase_exact"
# Set on the scheduler's tree cache (which admission and the eviction phase both reach): the free
# slots (allocator + evictable tree) the last admission would have needed to go on.
DEFICIT = "_vase_admission_target"


class PrefixCensus:
    """How many running requests lock each radix-tree node, and which lone holders release it at
    their next eviction (then it becomes evictable, and the eviction may reuse its slots)."""

    def __init__(self, tree, holders):
        self.tree = tree
        locked = [r for r in holders if r.lock is not None]
        paths = tree.tree_core.collect_path_info([r.lock.node for r in locked]) if locked else ()
        self.paths = {id(r): path for r, path in zip(locked, paths)}
        self.count = Counter(node.node_id for path in paths for node in path)
        self.releasing = {node.node_id for r, path in zip(locked, paths) if _releases(r) for node in path
                          if self.count[node.node_id] == 1}

    @classmethod
    def of(cls, adder) -> "PrefixCensus | None":
        """The census of this admission round (None without the radix cache)."""
        tree = adder.tree_cache
        if getattr(tree, "disable", True):
            return None
        census = getattr(adder, "_vase_census", None)
        if census is None:
            holders = list(adder.running_batch.reqs) if adder.running_batch is not None else []
            census = adder._vase_census = cls(tree, holders)
        return census

    def exclusive(self, req) -> int:
        """Tree columns only ``req`` locks, where its next eviction releases them."""
        return sum(n.path_end - n.path_start for n in self.paths.get(id(req), ()) if n.node_id in self.releasing)

    def taken_over(self, node) -> int:
        """Tree columns on the path to ``node`` (a new request's match) that a running request
        alone holds and counts on releasing: once shared they stay, so the newcomer pays for them."""
        if node is None or not self.releasing:
            return 0
        (path,) = self.tree.tree_core.collect_path_info([node])
        return sum(n.path_end - n.path_start for n in path if n.node_id in self.releasing)


def _releases(req) -> bool:
    st = request_state(req)
    return st is not None and releases_tree(st, req.kv.cache_protected_len) and not st.evictions


def _remaining_output(req) -> int:
    return max(0, req.sampling_params.max_new_tokens - len(req.output_ids))


def future_tokens(req, st, census: PrefixCensus | None = None) -> int:
    """Slots a running request may still add (``engine.admission.future_slots``)."""
    exclusive = census.exclusive(req) if census is not None else 0
    return future_slots(st, req.kv.kv_allocated_len, req.kv.cache_protected_len, _remaining_output(req), exclusive)


def admission_growth(req, st, census: PrefixCensus | None = None) -> int:
    """Slots a request being admitted may add after its prefill (its extend is charged apart)."""
    fill = len(req.full_untruncated_fill_ids)
    growth = admission_slots(st, fill, req.prefix_len, _remaining_output(req), radix=census is not None)
    if census is not None and st.kept_prompt == 0:
        growth += census.taken_over(req.last_node)
    return growth


@contextmanager
def reserve_as_bounded(adder, req):
    """Make SGLang's admission reserve the request's exact future slots, then restore it.

    Admission reads ``max_new_tokens - len(output_ids)`` as the future growth, clipped at
    CLIP_MAX_NEW_TOKENS (and takes a separate whole-lifetime simulation path for ignore_eos
    requests); presenting the bound there, with the clip lifted to it, keeps every admission check,
    chunking rule and budget update of SGLang's own code. SGLang adds a page per request for
    page alignment, which page size 1 never uses: the presented growth leaves it out again, so that
    the reservation is the exact bound (``check_prefill`` then admits on an exact fit).
    """
    st = request_state(req)
    if st is None:
        yield
        return
    sp = req.sampling_params
    growth = admission_growth(req, st, PrefixCensus.of(adder)) - adder.page_size
    saved = (sp.max_new_tokens, sp.ignore_eos, schedule_policy.CLIP_MAX_NEW_TOKENS)
    sp.max_new_tokens, sp.ignore_eos = len(req.output_ids) + growth, False
    schedule_policy.CLIP_MAX_NEW_TOKENS = max(saved[2], growth)
    setattr(adder.memory_budget, EXACT_FIT, True)
    try:
        yield
    finally:
        sp.max_new_tokens, sp.ignore_eos, schedule_policy.CLIP_MAX_NEW_TOKENS = saved
        setattr(adder.memory_budget, EXACT_FIT, False)


def slot_capacity(scheduler) -> int:
    """Most slots one request can ever hold: the pool, and its req_to_token row."""
    return min(scheduler.max_total_num_tokens, scheduler.req_to_token_pool.req_to_token.shape[1])


def note_deficit(adder, req) -> None:
    """After ``add_one_req`` stopped at ``req`` for want of slots: note how many free slots would
    have let it in, as SGLang counted (its extend tokens and reserved growth, as presented to
    admission, against the remaining budget), on top of those free now."""
    sp = req.sampling_params
    growth = min(max(sp.max_new_tokens - len(req.output_ids), 0), schedule_policy.CLIP_MAX_NEW_TOKENS)
    total = len(req.full_untruncated_fill_ids) - req.prefix_len + growth + adder.per_req_token_overhead
    free = adder.token_to_kv_pool_allocator.available_size() + adder.tree_cache.evictable_size()
    target = free + max(0, total - adder.rem_total_tokens)
    setattr(adder.tree_cache, DEFICIT, max(getattr(adder.tree_cache, DEFICIT, 0), target))


def take_deficit(tree_cache) -> int:
    """The free slots the last stuck admission needed (0 if none), cleared."""
    target = getattr(tree_cache, DEFICIT, 0)
    setattr(tree_cache, DEFICIT, 0)
    return target
