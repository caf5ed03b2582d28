"""The weights cache of one GPU: a fixed number of pages of `page_size` bytes (Clockwork's PageCache built with
allowEvictions=false, clockwork.md §3.1). It never evicts: an allocation that does not fit fails, and the
controller decides what to evict.

An artifact's weights are a partition of its pages 0..P-1 into runs (manifest["weights"]["runs"]); a run of
length 1 may go to any free page, a run of length n > 1 (a tensor larger than a page) needs n contiguous
cache pages."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from workbench.worker.pools import RangeAllocator


class InsufficientCache(Exception):
    """The weights do not fit in the free pages (status LOAD_WEIGHTS_INSUFFICIENT_CACHE)."""


@dataclass(eq=False)
class Allocation:
    """Cache pages of one model's weights: `pages[i]` is the cache page holding the model's page i;
    `runs` lists (model_first_page, cache_first_page, n_pages) for every run."""
    pages: tuple[int, ...]
    runs: tuple[tuple[int, int, int], ...]
    freed: bool = False

    @property
    def num_pages(self) -> int:
        return len(self.pages)


def normalize_runs(runs: Sequence[Sequence[int]] | int) -> list[tuple[int, int]]:
    """`runs` as [(first_page, n), ...]; an int P means P single pages. Checks that the runs partition 0..P-1."""
    if isinstance(runs, int):
        return [(i, 1) for i in range(runs)]
    out = sorted((int(r[0]), int(r[1])) for r in runs)
    expect = 0
    for first, n in out:
        if first != expect or n <= 0:
            raise ValueError(f"weights runs {list(runs)!r} do not partition pages 0..P-1 (at page {expect})")
        expect += n
    return out


class PageCache:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(f"page cache needs num_pages > 0 and page_size > 0, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = RangeAllocator(num_pages)
        self._allocs: dict[int, Allocation] = {}   # id() -> live allocation, for exact accounting

    # -- accounting
    @property
    def free_pages(self) -> int:
        return self._free.free_units

    @property
    def used_pages(self) -> int:
        return self.num_pages - self._free.free_units

    @property
    def num_allocations(self) -> int:
        return len(self._allocs)

    def largest_free_run(self) -> int:
        return self._free.largest_free()

    def free_intervals(self) -> list[tuple[int, int]]:
        return self._free.intervals()

    def allocations(self) -> list[Allocation]:
        return list(self._allocs.values())

    # -- alloc / free
    def alloc(self, runs: Sequence[Sequence[int]] | int) -> Allocation:
        """Cache pages for a model whose pages are split into `runs`; all or nothing. Raises InsufficientCache."""
        runs_n = normalize_runs(runs)
        total = sum(n for _, n in runs_n)
        if total > self.free_pages:
            raise InsufficientCache(f"weights need {total} pages, {self.free_pages} of {self.num_pages} free")
        placed: list[tuple[int, int, int]] = []
        long_runs = sorted((r for r in runs_n if r[1] > 1), key=lambda r: -r[1])   # largest first
        try:
            for first, n in long_runs:
                c = self._free.alloc_contiguous(n)
                if c is None:
                    raise InsufficientCache(
                        f"weights need a run of {n} contiguous pages; {self.free_pages} pages free but the "
                        f"largest contiguous free run is {self._free.largest_free()}")
                placed.append((first, c, n))
            singles = [first for first, n in runs_n if n == 1]
            got = self._free.alloc_scattered(len(singles)) if singles else []
            if got is None:   # cannot happen after the total check, kept as a guard
                raise InsufficientCache(f"weights need {len(singles)} single pages, {self.free_pages} free")
            placed.extend((first, c, 1) for first, c in zip(singles, got))
        except InsufficientCache:
            for _, c, n in placed:
                self._free.free(c, n)
            raise
        pages = [0] * total
        for first, c, n in placed:
            for k in range(n):
                pages[first + k] = c + k
        a = Allocation(tuple(pages), tuple(sorted(placed)))
        self._allocs[id(a)] = a
        return a

    def free(self, a: Allocation) -> None:
        if a.freed or self._allocs.pop(id(a), None) is not a:
            raise ValueError("page cache: free of an allocation that is not live (double free)")
        a.freed = True
        for _, c, n in a.runs:
            self._free.free(c, n)

    def clear(self) -> None:
        """Free everything (ClearCache)."""
        for a in self._allocs.values():
            a.freed = True
        self._allocs.clear()
        self._free.reset()

    def state(self) -> dict:
        return {"page_size": self.page_size, "total_pages": self.num_pages, "free_pages": self.free_pages,
                "used_pages": self.used_pages, "allocations": self.num_allocations,
                "largest_free_run": self.largest_free_run()}
