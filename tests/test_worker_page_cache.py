"""PageCache and MemoryPool: exact accounting under random alloc/free sequences (hypothesis)."""
import pytest
from hypothesis import given, settings, strategies as st

from workbench.worker.page_cache import InsufficientCache, PageCache, normalize_runs
from workbench.worker.pools import MemoryPool, PoolExhausted, RangeAllocator

# A model's page layout: some runs of length > 1 (oversize tensors) then single pages.
layouts = st.lists(st.integers(1, 5), min_size=1, max_size=6).map(
    lambda lens: [(sum(lens[:i]), n) for i, n in enumerate(lens)])
ops = st.lists(st.one_of(st.tuples(st.just("alloc"), layouts), st.tuples(st.just("free"), st.integers(0, 50))),
               max_size=60)


def check_cache(cache: PageCache, live: list) -> None:
    pages = [p for a in live for p in a.pages]
    assert len(pages) == len(set(pages)), "a page is in two allocations"
    assert all(0 <= p < cache.num_pages for p in pages)
    assert cache.used_pages == len(pages) and cache.free_pages == cache.num_pages - len(pages)
    free = {p for s, n in cache.free_intervals() for p in range(s, s + n)}
    assert free.isdisjoint(pages) and len(free) + len(pages) == cache.num_pages, "page leaked or double counted"
    assert cache.num_allocations == len(live)


@settings(max_examples=300, deadline=None)
@given(num_pages=st.integers(1, 24), ops=ops)
def test_random_alloc_free_keeps_exact_accounting(num_pages, ops):
    cache = PageCache(num_pages, 4096)
    live = []
    for op, arg in ops:
        if op == "alloc":
            before = (cache.free_pages, cache.free_intervals())
            try:
                a = cache.alloc(arg)
            except InsufficientCache:
                assert (cache.free_pages, cache.free_intervals()) == before, "failed alloc changed the cache"
            else:
                live.append(a)
                for first, c, n in a.runs:   # every run is contiguous in the cache
                    assert list(a.pages[first:first + n]) == list(range(c, c + n))
                assert len(a.pages) == sum(n for _, n in arg)
        elif live:
            cache.free(live.pop(arg % len(live)))
        check_cache(cache, live)
    for a in live:
        cache.free(a)
    assert cache.free_pages == num_pages and cache.free_intervals() == [(0, num_pages)]


def test_alloc_fails_rather_than_evicts_and_names_the_shortfall():
    cache = PageCache(8, 16)
    a = cache.alloc(7)
    with pytest.raises(InsufficientCache, match="need 7 pages, 1 of 8 free"):
        cache.alloc(7)
    assert cache.used_pages == 7 and not a.freed


def test_contiguous_run_fails_on_fragmentation_even_with_enough_free_pages():
    cache = PageCache(6, 16)
    singles = [cache.alloc(1) for _ in range(6)]
    for a in singles[::2]:
        cache.free(a)                        # pages 0, 2, 4 free: 3 pages, none adjacent
    with pytest.raises(InsufficientCache, match="contiguous"):
        cache.alloc([(0, 2)])
    assert cache.free_pages == 3
    assert cache.alloc([(0, 1), (1, 1), (2, 1)]).num_pages == 3


def test_double_free_is_caught():
    cache = PageCache(4, 16)
    a = cache.alloc(2)
    cache.free(a)
    with pytest.raises(ValueError, match="double free"):
        cache.free(a)
    assert cache.free_pages == 4


def test_runs_must_partition_the_pages():
    with pytest.raises(ValueError, match="partition"):
        normalize_runs([(0, 2), (3, 1)])
    assert normalize_runs([(2, 1), (0, 2)]) == [(0, 2), (2, 1)]


def test_clear_frees_everything():
    cache = PageCache(10, 16)
    allocs = [cache.alloc([(0, 3), (3, 1)]), cache.alloc(2)]
    cache.clear()
    assert cache.free_pages == 10 and all(a.freed for a in allocs)


@settings(max_examples=200, deadline=None)
@given(size=st.integers(256, 8192), ops=st.lists(st.tuples(st.booleans(), st.integers(0, 3000)), max_size=50))
def test_memory_pool_accounting(size, ops):
    pool = MemoryPool("io", size)
    live: dict[int, int] = {}
    for is_alloc, n in ops:
        if is_alloc:
            try:
                off = pool.alloc(n)
            except PoolExhausted as e:
                assert "io_pool_size" in str(e)
                continue
            length = max(256, -(-n // 256) * 256)
            assert off % 256 == 0 and off + length <= size
            assert all(off + length <= o or o + l <= off for o, l in live.items()), "overlapping allocations"
            live[off] = length
        elif live:
            off = sorted(live)[n % len(live)]
            pool.free(off)
            del live[off]
        assert pool.used == sum(live.values()) and pool.allocations == len(live)
    for off in list(live):
        pool.free(off)
    assert pool.used == 0 and pool._ranges.intervals() == [(0, size)]
    with pytest.raises(ValueError):
        pool.free(0)


def test_an_empty_pools_allocation_and_its_only_allocations_free_are_exact():
    """The O(1) paths (an idle GPU's Infer): the first allocation takes the front, the rest stays one range; freeing
    the only allocation gives the whole pool back; neither is taken while another allocation lives."""
    pool = MemoryPool("workspace", 4096)
    assert pool.alloc(1000) == 0 and pool._ranges.intervals() == [(1024, 3072)]
    pool.free(0)
    assert pool.used == 0 and pool._ranges.intervals() == [(0, 4096)]
    a, b = pool.alloc(4096 - 256), pool.alloc(1)
    assert (a, b) == (0, 3840) and pool.used == 4096
    pool.free(a)
    assert pool._ranges.intervals() == [(0, 3840)] and pool.allocations == 1
    pool.free(b)
    assert pool._ranges.intervals() == [(0, 4096)]
    with pytest.raises(PoolExhausted, match="workspace_pool_size"):
        pool.alloc(4097)
    assert pool.used == 0 and pool.allocations == 0


def test_range_allocator_merges_neighbours():
    r = RangeAllocator(10)
    a, b, c = r.alloc_contiguous(3), r.alloc_contiguous(3), r.alloc_contiguous(4)
    r.free(a, 3)
    r.free(c, 4)
    r.free(b, 3)
    assert r.intervals() == [(0, 10)] and r.free_units == 10
