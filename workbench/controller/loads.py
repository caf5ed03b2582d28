"""Which model to load on which GPU, and which to evict: Clockwork's LoadTracker (clockwork.md §4.8).

Demand is measured in ns of batch-1 exec time, normalised to the capacity (= the default SLO): a request of
model m adds `exec_size = b1(m) * capacity / exec_slo` of exec demand until it completes, and
`lw_size = b1(m) * capacity / weights_slo` of load demand until it starts executing or `weights_slo` passes
(after that a load could no longer help it). A model's exec demand is spread over the GPUs that hold it in
proportion to their weight `capacity / outstanding` (less-loaded GPUs take more). A model's load priority on
a GPU that does not hold it is its load demand minus the part the GPUs holding it already serve; a GPU loads
the model of highest positive priority (so hot models get replicas when the GPUs holding them are
overloaded). Clockwork's gate compared a pointer with 0 (§8.7); here priority <= 0 means no load. A model
with no copy anywhere keeps a priority of at least its exec demand, so its pending requests get a copy even
after a failed load.

Evictions on a GPU take the least-recently-used model with no outstanding demand first, then the
least-recently-used model overall; models being loaded, and models with inferences in flight on that GPU,
are never evicted. Demand sums are integers, so they return exactly to 0. Priorities are recomputed lazily,
for the models whose demand changed since the last load decision (Clockwork's stale list).
"""
from __future__ import annotations

import heapq
from typing import Callable, Final

from workbench.controller import state
from workbench.controller.requests import Request
from workbench.controller.state import GPUState, ModelState

BASE_OUTSTANDING: Final = 1_000_000   # every GPU is assumed to have 1 ms of work outstanding (Clockwork)
MIN_SIZE: Final = 100_000             # demand of a request whose model has no batch-1 estimate yet (ns)


class LoadTracker:
    def __init__(self, gpus: list[GPUState], capacity: int, scan_limit: int = 64):
        if capacity <= 0:
            raise ValueError(f"load tracker capacity must be > 0 ns, got {capacity}")
        self.capacity = int(capacity)
        self.gpus = gpus                 # shared with the controller (it grows as workers report)
        for g in gpus:
            self.add_gpu(g)
        self.expiry: list[tuple[int, int, Request]] = []   # (time, seq, request): when its load demand lapses
        self.stale: list[ModelState] = []
        self.heap: list[tuple[float, int, int, int, ModelState]] = []   # (-priority, -last_used, id, load_version, m)
        self._live_hint = 0              # entries left by the last compaction
        self.scan_limit = scan_limit
        self._seq = 0                    # expiry entries pushed (their seq)
        self._used = 0                   # model uses (their order: last_used)

    def add_gpu(self, g: GPUState) -> None:
        g.outstanding = float(BASE_OUTSTANDING)
        g.weight = self.capacity / BASE_OUTSTANDING

    # ------------------------------------------------------------------------------------ demand
    def add_request(self, r: Request, m: ModelState, now: int, exec_slo: int, weights_slo: int) -> None:
        exp = self.expiry
        if exp and exp[0][0] < now:
            self.check(now)
        b1 = m.b1_ns
        size = (b1 if b1 > MIN_SIZE else MIN_SIZE) * self.capacity    # unprofiled models still create demand
        r.exec_size = ex = size // (exec_slo if exec_slo > 1 else 1)
        r.lw_size = lw = size // (weights_slo if weights_slo > 1 else 1)
        self._seq += 1
        heapq.heappush(exp, (now + weights_slo, self._seq, r))
        m.outstanding_exec += ex
        m.outstanding_lw += lw
        self._distribute(m)
        if not m.stale:
            m.stale = True
            self.stale.append(m)

    def executing(self, reqs: list[Request], m: ModelState, g: GPUState) -> None:
        """The requests were sent to g: their load demand ends; m was used on g."""
        lw = 0
        for r in reqs:
            lw += r.lw_size
            r.lw_size = 0
        m.outstanding_lw -= lw
        self._used += 1
        m.last_used = self._used
        if not m.stale:            # exec demand (what _distribute spreads) is unchanged
            m.stale = True
            self.stale.append(m)

    def release(self, reqs: list[Request], m: ModelState) -> None:
        """The requests are finalised: all their remaining demand ends."""
        ex = lw = 0
        for r in reqs:
            ex += r.exec_size
            lw += r.lw_size
            r.exec_size = 0
            r.lw_size = 0
        if ex:
            m.outstanding_exec -= ex
            m.outstanding_lw -= lw
            self._changed(m)
        elif lw:
            m.outstanding_lw -= lw
            self._stale(m)

    def check(self, now: int) -> None:
        """Expire the load demand of requests whose weights_slo has passed."""
        exp = self.expiry
        while exp and exp[0][0] < now:
            r = heapq.heappop(exp)[2]
            if r.lw_size:
                m = r.model
                assert m is not None, "an admitted request names its model"
                m.outstanding_lw -= r.lw_size
                r.lw_size = 0
                self._stale(m)

    def _changed(self, m: ModelState) -> None:
        self._distribute(m)
        if not m.stale:
            m.stale = True
            self.stale.append(m)

    def _stale(self, m: ModelState) -> None:
        if not m.stale:
            m.stale = True
            self.stale.append(m)

    def _distribute(self, m: ModelState) -> None:
        cap = self.capacity
        holding = m.holding
        alloc = m.allocations
        if len(holding) == 1 and len(alloc) == 1:      # fast path: one copy, adjust by the change
            g = holding[0]
            old = alloc.get(g.index)
            if old is not None:
                a = m.outstanding_exec
                if a != old:
                    g.outstanding += a - old
                    g.weight = cap / g.outstanding
                    alloc[g.index] = a
                return
        elif not holding and not alloc:
            return
        gpus = self.gpus
        if alloc:
            for gi, a in m.allocations.items():
                g = gpus[gi]
                g.outstanding -= a
                g.weight = cap / g.outstanding
            m.allocations = {}
        if not holding:
            return
        if len(holding) == 1:
            g = holding[0]
            a = m.outstanding_exec
            m.allocations = {g.index: a}
            g.outstanding += a
            g.weight = cap / g.outstanding
            return
        total_w = 0.0
        for g in holding:
            total_w += g.weight
        alloc = {}
        for g in holding:
            share = int(m.outstanding_exec * (g.weight / total_w))
            alloc[g.index] = share
            g.outstanding += share
            g.weight = cap / g.outstanding
        m.allocations = alloc

    # ---------------------------------------------------------------------------------- priorities
    def priority(self, m: ModelState) -> float:
        """Load demand of m not served by the GPUs holding it (> 0: another copy would help)."""
        lw = m.outstanding_lw
        holding = m.holding
        if not holding:   # no copy anywhere: every pending request needs one (also after a failed load)
            return float(lw if lw > m.outstanding_exec else m.outstanding_exec)
        prio = float(lw)
        if lw > 0:
            total_w = 0.0
            for g in holding:
                total_w += g.weight
            cap = self.capacity
            for g in holding:
                required = lw * (g.weight / total_w)
                prio -= cap * required / g.outstanding
        return prio

    def _update_priority(self, m: ModelState) -> None:
        prio = self.priority(m)
        lw = m.outstanding_lw
        m.priority = prio
        m.is_empty = lw == 0 and m.outstanding_exec == 0
        m.load_version += 1
        if prio > 0:
            heapq.heappush(self.heap, (-prio, -m.last_used, m.id, m.load_version, m))

    def refresh(self) -> None:
        for m in self.stale:
            m.stale = False
            self._update_priority(m)
        self.stale.clear()
        heap = self.heap
        if len(heap) > 4096 and len(heap) > 4 * self._live_hint:   # mostly superseded entries: compact
            heap[:] = [e for e in heap if e[3] == e[4].load_version]
            heapq.heapify(heap)
            self._live_hint = len(heap)

    def wants_load(self) -> bool:
        """Some model may have positive load priority (after a refresh)."""
        self.refresh()
        heap = self.heap
        while heap and (heap[0][3] != heap[0][4].load_version):
            heapq.heappop(heap)
        return bool(heap)

    def choose(self, g: GPUState, now: int, fits: Callable[[ModelState], bool]) -> ModelState | None:
        """The model of highest positive load priority that g does not hold and can make room for."""
        self.check(now)
        self.refresh()
        heap = self.heap
        aside: list[tuple[float, int, int, int, ModelState]] = []
        chosen = None
        while heap and len(aside) < self.scan_limit:
            e = heap[0]
            m = e[4]
            if e[3] != m.load_version or not m.ready:
                heapq.heappop(heap)
                continue
            if m.id in g.loaded or m.id in g.loading or not fits(m):
                aside.append(heapq.heappop(heap))
                continue
            chosen = m
            break
        for e in aside:
            heapq.heappush(heap, e)
        return chosen

    # ----------------------------------------------------------------------------------- placement
    def begin_load(self, m: ModelState, g: GPUState) -> None:
        state.begin_load(m, g)
        self._used += 1
        m.last_used = self._used
        self._distribute(m)
        self._update_priority(m)   # at once: the next GPU in this pass must see the new copy

    def finish_load(self, m: ModelState, g: GPUState, ok: bool) -> None:
        state.finish_load(m, g, ok)
        self._changed(m)

    def unload(self, m: ModelState, g: GPUState) -> None:
        state.unload(m, g)
        self._changed(m)

    @staticmethod
    def evict_candidate(g: GPUState) -> ModelState | None:
        """Least-recently-used model on g with no demand, else least-recently-used overall; never one with
        inferences in flight on g."""
        busy = g.busy_models
        fallback = None
        for mid, m in g.loaded.items():
            if busy.get(mid):
                continue
            if m.outstanding_exec == 0 and m.outstanding_lw == 0:
                return m
            if fallback is None:
                fallback = m
        return fallback
