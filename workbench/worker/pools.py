"""Exact accounting of device and host memory: a range allocator (free intervals, merged on free) and the
byte pools built on it (io, workspace, host io; Clockwork's MemoryPool, clockwork.md §3.1).

Pools hand out offsets; the device that owns the pool maps an offset to memory (a slice of one cupy or numpy
buffer allocated once), so nothing is allocated from the system on the hot path."""
from __future__ import annotations

import bisect


class PoolExhausted(Exception):
    """An allocation that does not fit; the message says how much was asked and what is left."""


class RangeAllocator:
    """Free intervals of [0, size) in units (bytes or pages). Allocation takes from the start of an interval;
    freeing merges with the neighbours. Overlapping frees (double frees) raise."""

    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.size = size
        self._starts: list[int] = [0] if size else []
        self._len: dict[int, int] = {0: size} if size else {}
        self.free_units = size

    # -- queries
    def intervals(self) -> list[tuple[int, int]]:
        """Free (start, length) in address order."""
        return [(s, self._len[s]) for s in self._starts]

    def largest_free(self) -> int:
        return max(self._len.values(), default=0)

    # -- allocation
    def _take(self, start: int, n: int) -> int:
        """Take n units from the front of the free interval beginning at `start`."""
        length = self._len.pop(start)
        i = bisect.bisect_left(self._starts, start)
        if length == n:
            del self._starts[i]
        else:
            self._starts[i] = start + n
            self._len[start + n] = length - n
        self.free_units -= n
        return start

    def alloc_contiguous(self, n: int) -> int | None:
        """Best fit: the smallest free interval holding n units (keeps large intervals for large requests)."""
        if n <= 0:
            raise ValueError(f"allocation size must be > 0, got {n}")
        lens = self._len
        best, best_len = -1, 0
        for s in self._starts:
            length = lens[s]
            if length >= n and (best < 0 or length < best_len):
                best, best_len = s, length
                if length == n:
                    break
        if best < 0:
            return None
        # _take, inlined (the hot path allocates four times per Infer)
        del lens[best]
        i = bisect.bisect_left(self._starts, best)
        if best_len == n:
            del self._starts[i]
        else:
            self._starts[i] = best + n
            lens[best + n] = best_len - n
        self.free_units -= n
        return best

    def alloc_scattered(self, n: int) -> list[int] | None:
        """n single units from the smallest intervals first (large intervals stay whole for contiguous runs)."""
        if n > self.free_units:
            return None
        out: list[int] = []
        for s in sorted(self._starts, key=lambda s: self._len[s]):
            take = min(n - len(out), self._len[s])
            self._take(s, take)
            out.extend(range(s, s + take))
            if len(out) == n:
                break
        return out

    def free(self, start: int, n: int) -> None:
        if n <= 0 or start < 0 or start + n > self.size:
            raise ValueError(f"free of [{start}, {start + n}) outside [0, {self.size})")
        i = bisect.bisect_left(self._starts, start)
        prev_s = self._starts[i - 1] if i > 0 else None
        next_s = self._starts[i] if i < len(self._starts) else None
        if (prev_s is not None and prev_s + self._len[prev_s] > start) or (next_s is not None and next_s < start + n):
            raise ValueError(f"double free: [{start}, {start + n}) overlaps free space")
        self.free_units += n
        if prev_s is not None and prev_s + self._len[prev_s] == start:
            start, n = prev_s, self._len[prev_s] + n
            del self._starts[i - 1]
            i -= 1
            del self._len[prev_s]
        if next_s is not None and next_s == start + n:
            n += self._len.pop(next_s)
            del self._starts[i]
        self._starts.insert(i, start)
        self._len[start] = n

    def reset(self, taken: int = 0) -> None:
        """All free again, or all but [0, taken): O(1) (a pool's only allocation, taken or given back)."""
        rest = self.size - taken
        self._starts = [taken] if rest else []
        self._len = {taken: rest} if rest else {}
        self.free_units = rest


class MemoryPool:
    """A byte pool of fixed size (io, workspace or host io). `alloc` returns an offset into the pool's buffer or
    raises PoolExhausted; every allocation is tracked so `used` is exact and double frees are caught."""

    ALIGN = 256

    def __init__(self, name: str, size: int):
        self.name = name
        self.size = size
        self._ranges = RangeAllocator(size)
        self._live: dict[int, int] = {}   # offset -> aligned length

    @property
    def used(self) -> int:
        return self.size - self._ranges.free_units

    @property
    def allocations(self) -> int:
        return len(self._live)

    def alloc(self, nbytes: int) -> int:
        a = self.ALIGN
        length = -(-nbytes // a) * a
        if length < a:
            length = a
        if not self._live and length <= self.size:   # empty (an idle GPU's pools, every Infer): the front, in O(1)
            self._ranges.reset(length)
            self._live[0] = length
            return 0
        off = self._ranges.alloc_contiguous(length) if length <= self.size else None
        if off is None:
            raise PoolExhausted(f"{self.name} pool: {nbytes} bytes requested, {self.size - self.used} of "
                                f"{self.size} free (largest block {self._ranges.largest_free()}); raise "
                                f"{self.name}_pool_size in the worker config")
        self._live[off] = length
        return off

    def free(self, offset: int) -> None:
        length = self._live.pop(offset, None)
        if length is None:
            raise ValueError(f"{self.name} pool: free of offset {offset} that is not allocated")
        if self._live:
            self._ranges.free(offset, length)
        else:                                         # it was the only one: all free again, in O(1)
            self._ranges.reset()

    def clear(self) -> None:
        self._ranges.reset()
        self._live.clear()

    def state(self) -> dict:
        return {"size": self.size, "used": self.used, "allocations": self.allocations}
