"""The Clockwork policy: INFER4/INFER5-style infer scheduling plus the LoadTracker's loads and evictions
(clockwork.md §4.5-4.8).

Infer scheduling, per GPU:
- Each model keeps its pending requests in a heap on the exec deadline (deadline - buffer). Whenever the
  front of a model's queue changes, every GPU holding the model gets a strategy (latest start time = front
  exec deadline - batch-1 estimate, model, version) in its heap; stale strategies are skipped lazily.
- A GPU takes strategies in latest-start-time order while its planned backlog is below `schedule_ahead`. When
  it is not, the GPU's next result schedules again (a batch sent then starts at the same planned time, with
  more requests to choose from); a wake-up at the moment the backlog falls below `schedule_ahead` is set only
  when the GPU would otherwise run dry before that result's batch could start.
- The batch for the model at the head ends by the earliest exec deadline in it; n requests run on the
  smallest compiled size >= n. `batching="front"`: INFER4's batch bump, the largest batch that meets the front
  request's deadline. `batching="efficient"` (default): among the feasible batches that cannot wait for the
  most urgent one, the largest (see `_serve_many`); it may skip old requests that only fit a small batch,
  as INFER4's per-(request, batch size) strategies did. Each Infer gets `earliest = now`,
  `latest = max(now + future + schedule_ahead, planned start + schedule_ahead)` (§4.7).
- A request that cannot finish in time on this GPU is left to another GPU holding the model if one can still
  finish it, else dropped at once with status dropped (the client is told; INFER5 dropped silently). The
  scan runs from the earliest deadline, not INFER4's inverted reverse scan (§8.7).
- Every result re-anchors the GPU's timeline (tracker.Timeline) and feeds the estimates.
- The most common case, a request for a model with nothing else queued, held by one GPU with room in its plan,
  is dispatched in one step (`_dispatch_alone`), with exactly the effects of queueing and scheduling it.

Loads: a pass runs at once when a request arrives for a model with no copy anywhere, and otherwise at most
every `load_interval` while some model has positive load priority (loads.LoadTracker); each GPU, least
loaded first, loads the model of highest priority while it has fewer than `max_loads` loads outstanding and
less than `schedule_ahead` planned on its PCIe timeline, evicting least-recently-used models to make room.

Decisions (documented here because the brief asks for them):
- SLOs below `schedule_ahead + buffer` are not clamped (Clockwork's unsigned clamp put the internal deadline
  after the client's). They are scheduled against their true deadline and succeed when the GPU's backlog is
  short enough; the controller rejects only SLOs below the batch-1 estimate + buffer, which nothing can meet.
- An Infer that failed because it could not start in time (the worker fell behind plan), or found no weights
  (the controller's view was wrong; the model is marked unloaded there), is not the requests' fault: they are
  queued again and dropped later only if they can no longer meet their deadline. Other worker errors end the
  requests with status error.
"""
from __future__ import annotations

import heapq
from bisect import bisect_left
from collections import Counter
from typing import TYPE_CHECKING, Any, ClassVar, Final

from workbench.contract import Result, Status
from workbench.controller.compiled import mypyc_attr
from workbench.controller.estimates import ModelEstimates
from workbench.controller.loads import MIN_SIZE, LoadTracker
from workbench.controller.policy import Policy
from workbench.controller.requests import DROPPED, INFLIGHT, QUEUED, Request
from workbench.controller.state import GPUState, ModelState

if TYPE_CHECKING:
    from workbench.controller.controller import ActionRecord, Controller

RETRYABLE: Final = frozenset({Status.COULD_NOT_START_IN_TIME, Status.COPY_INPUT_TOO_LATE, Status.EXEC_TOO_LATE,
                       Status.NETWORK_SEND_TOO_LATE, Status.EXEC_WEIGHTS_MISSING, Status.COPY_INPUT_UNKNOWN_MODEL,
                       Status.COPY_INPUT_IO_POOL_EXHAUSTED, Status.EXEC_WORKSPACE_POOL_EXHAUSTED,
                       Status.EXEC_CONCURRENT_WEIGHTS_MODIFICATION})
NOT_LOADED: Final = frozenset({Status.EXEC_WEIGHTS_MISSING, Status.COPY_INPUT_UNKNOWN_MODEL})


def _est(m: ModelState) -> ModelEstimates:
    """m's estimates (a model is only scheduled once it is ready, i.e. has them)."""
    est = m.est
    assert est is not None, f"model {m.id} has no estimates yet"
    return est


@mypyc_attr(allow_interpreted_subclasses=True)
class ClockworkPolicy(Policy):
    name: ClassVar[str] = "clockwork"
    expired_status: ClassVar[str] = DROPPED
    tracker: LoadTracker            # made by attach()

    def __init__(self, batching: str = "efficient") -> None:
        super().__init__()
        if batching not in ("efficient", "front"):
            raise ValueError(f"clockwork: batching must be 'efficient' or 'front', got {batching!r}")
        self.batching = batching
        self.efficient = batching == "efficient"
        self._seq = 0               # strategies pushed (their seq)
        self._dirty: dict[int, GPUState] = {}
        self._scheduling = False
        self._load_timer_at: int | None = None
        self._last_pass = -(1 << 62)
        self.counters: Counter[str] = Counter()
        self.n_batches = 0          # batches sent (counters["batches"], kept apart: the hot path avoids the Counter)

    def attach(self, ctl: Controller) -> None:
        super().attach(ctl)
        c = ctl.config
        self.sa = c.schedule_ahead
        self.future = c.future
        self.buffer = c.buffer
        self.max_loads = c.max_loads
        self.load_interval = c.load_interval
        self.max_lw_slo = c.max_loadweights_slo
        self.wake_margin = 1_000_000   # the result of an Infer arrives after exec ends (output copy, delivery)
        self.tracker = LoadTracker(ctl.gpus, c.default_slo)

    def on_gpu_added(self, g: GPUState) -> None:
        self.tracker.add_gpu(g)

    # ====================================================================================== requests
    def on_request(self, r: Request, now: int) -> None:
        m = r.model
        assert m is not None, "an admitted request names its model"
        loaded = m.loaded
        if not m.queue and len(loaded) == 1 and not self._dirty and not self._scheduling:
            g = loaded[0]
            if not g.heap and not g.failed and self._dispatch_alone(r, m, g, now):
                return
        est = _est(m)
        sa_buf = self.sa + self.buffer
        weights_slo = r.slo - (int(est.load.value) + m.b1_ns + sa_buf)
        if weights_slo > self.max_lw_slo:
            weights_slo = self.max_lw_slo
        if weights_slo < sa_buf:
            weights_slo = sa_buf
        self.tracker.add_request(r, m, now, r.exec_deadline - r.arrival, weights_slo)
        q = m.queue
        heapq.heappush(q, (r.exec_deadline, r.id, r))
        m.n_queued += 1
        bump = True
        if q[0][2].state != QUEUED:
            # requests finalized while queued (dropped at their deadline) leave their entries at the front. With
            # only those ahead of r, r is the front, and the GPUs may hold no entry for m any more (all served):
            # give them one, keeping valid the entries they hold (no new version), so their order stays as it was
            while q[0][2].state != QUEUED:
                heapq.heappop(q)
            bump = False
        if q[0][2] is r:
            self._requeue(m, bump)
            if self._dirty:
                self._run_dirty(now)
        if not m.holding:
            self._load_pass(now)            # cold: no copy anywhere, decide now
        elif self._load_timer_at is None and self.tracker.priority(m) > 0:
            self._kick_loads(now)           # the GPUs holding m are overloaded: consider a replica soon

    def _dispatch_alone(self, r: Request, m: ModelState, g: GPUState, now: int) -> bool:
        """The common case of a request arriving, done in one step: m has no other request queued, one GPU
        holds it, that GPU has nothing else to schedule and room in its plan, and r can make its deadline
        there. Exactly what `LoadTracker.add_request`, queueing r, `_requeue`, `_schedule`, `_serve`, `_dispatch`
        and the load check after would do then, in one step; False (nothing done) when the case does not apply.
        The request's load demand would be added and taken away again at once (executing), so it is never
        added: no expiry entry either (the tracker would find it with no demand left and skip it)."""
        free_at = g.exec.available(now)
        if free_at >= now + self.sa:
            return False
        est = _est(m)
        table = est._tables.get(g.clock)
        if table is None:
            table = est.exec_table(g.clock)
        e1 = table[0]
        if e1 > r.exec_deadline - free_at:
            return False
        tr = self.tracker                       # add_request: the exec demand
        exp = tr.expiry
        if exp and exp[0][0] < now:
            tr.check(now)
        b1 = m.b1_ns
        exec_slo = r.exec_deadline - r.arrival
        r.exec_size = ex = (b1 if b1 > MIN_SIZE else MIN_SIZE) * tr.capacity // (exec_slo if exec_slo > 1 else 1)
        m.outstanding_exec += ex
        tr._distribute(m)
        m.version += 2              # _requeue before and after the batch
        m.n_queued += 1
        self._dispatch(g, m, [r], e1, free_at, now)
        # the load check of on_request: m is held (by g); its priority is its load demand less what the GPUs
        # holding it serve, so it cannot be positive without load demand
        if self._load_timer_at is None and m.outstanding_lw > 0 and tr.priority(m) > 0:
            self._kick_loads(now)
        return True

    def queued_requests(self) -> list[Request]:
        return [e[2] for m in self.ctl.models.values() for e in m.queue if e[2].state == QUEUED]

    def on_finalized(self, r: Request, prev_state: int, now: int) -> None:
        m = r.model
        assert m is not None, "an admitted request names its model"
        if prev_state == QUEUED:
            m.n_queued -= 1
        ex = r.exec_size
        lw = r.lw_size
        if ex or lw:                        # LoadTracker.release([r], m), inlined
            r.exec_size = 0
            r.lw_size = 0
            tr = self.tracker
            if ex:
                m.outstanding_exec -= ex
                if lw:
                    m.outstanding_lw -= lw
                tr._distribute(m)           # tr._changed(m), inlined
                if not m.stale:
                    m.stale = True
                    tr.stale.append(m)
            else:
                m.outstanding_lw -= lw
                if not m.stale:
                    m.stale = True
                    tr.stale.append(m)

    # ====================================================================================== infer scheduling
    def _requeue(self, m: ModelState, bump: bool = True) -> None:
        """The front of m's queue may have changed: give every GPU holding m a fresh strategy (`bump`: and make
        the ones they hold stale)."""
        if bump:
            m.version += 1
        q = m.queue
        while q and q[0][2].state != QUEUED:
            heapq.heappop(q)
        if not q or not m.loaded:
            return
        ed = q[0][0]
        ver = m.version
        est = _est(m)
        dirty = self._dirty
        for g in m.loaded:
            if g.failed:
                continue
            t = est._tables.get(g.clock)
            if t is None:
                t = est.exec_table(g.clock)
            self._seq += 1
            heapq.heappush(g.heap, (ed - t[0], self._seq, ver, m))
            dirty[g.index] = g

    def _run_dirty(self, now: int) -> None:
        if self._scheduling:
            return
        self._scheduling = True
        try:
            dirty = self._dirty
            rounds = 0
            while dirty:
                rounds += 1
                if rounds > 10_000:   # GPUs handing the same work back and forth without time advancing
                    raise self.ctl.internal_error(f"scheduling loop at t={now}: GPUs {sorted(dirty)} keep "
                                                  f"rescheduling")
                idx = next(iter(dirty))
                self._schedule(dirty.pop(idx), now)
        finally:
            self._scheduling = False

    def _schedule(self, g: GPUState, now: int) -> None:
        if g.failed:
            return
        heap = g.heap
        limit = now + self.sa
        loaded = g.loaded
        ex = g.exec
        idle = 0
        while heap:
            free_at = ex.available(now)
            if free_at >= limit:
                # Enough planned. The next result (the head's) will schedule again, and batches dispatched then
                # start at free_at just the same, with more requests to choose from; only if the GPU would run
                # dry before an action sent at that result could start, wake up when the backlog falls below
                # schedule_ahead instead (Clockwork's scheduler threads poll for that moment).
                if free_at - ex.head_end() < self.future + self.wake_margin:
                    self._wake(g, free_at - self.sa + 1)
                return
            _, _, ver, m = heapq.heappop(heap)
            if ver != m.version or m.id not in loaded:
                continue
            self._serve(g, m, free_at, now)
            if free_at == ex.available(now):          # nothing sent: m handed back to this GPU again
                idle += 1
                if idle > 10_000:
                    raise self.ctl.internal_error(f"scheduling loop at t={now}: gpu {g.index} keeps getting "
                                                  f"model {m.id} back without sending anything")

    def _serve(self, g: GPUState, m: ModelState, free_at: int, now: int) -> None:
        """Run a batch of m's requests on g starting at free_at (dropping those that can no longer finish)."""
        if m.n_queued > 1 and self.efficient:
            self._serve_many(g, m, free_at, now)
            return
        q = m.queue
        table = _est(m).exec_table(g.clock)
        sizes = m.batch_sizes
        while True:
            while q and q[0][2].state != QUEUED:
                heapq.heappop(q)
            if not q:
                m.version += 1
                return
            r = q[0][2]
            slack = r.exec_deadline - free_at
            if table[0] > slack:
                if self._elsewhere(m, r, g, now):
                    self.counters["skipped"] += 1
                    return
                heapq.heappop(q)
                self._drop(r, free_at + table[0], now)
                continue
            n_avail = m.n_queued
            k = len(sizes) - 1
            while k > 0 and sizes[k - 1] >= n_avail:   # smallest size >= n_avail
                k -= 1
            while k > 0 and table[k] > slack:          # largest size that still meets the front's deadline
                k -= 1
            b = sizes[k]
            n = b if b < n_avail else n_avail
            reqs: list[Request] = []
            while len(reqs) < n:
                rr = heapq.heappop(q)[2]
                if rr.state == QUEUED:
                    reqs.append(rr)
            self._dispatch(g, m, reqs, table[k], free_at, now)
            break
        self._requeue(m)

    def _serve_many(self, g: GPUState, m: ModelState, free_at: int, now: int) -> None:
        """Several requests queued: choose among the feasible batches (clockwork.md §4.5, INFER4's strategies).

        Option k (batch size b_k) takes, in deadline order, up to b_k of the requests that can still finish at
        size k; its latest start time is its first request's exec deadline - est(b_k). The most urgent option
        U must start first; every option whose latest start comes before U would end conflicts with it (only
        one of them can still run), and among those the largest batch runs: U itself unless a batch that
        skips U's oldest requests serves more (INFER4 reached the same by ordering its per-(request, batch
        size) strategies by latest start and skipping older requests). Requests skipped stay queued (they
        may fit the next batch); those that cannot finish even alone are dropped (or left to another GPU
        holding the model that still can)."""
        table = _est(m).exec_table(g.clock)
        sizes = m.batch_sizes
        live = sorted(e for e in m.queue if e[2].state == QUEUED)
        thr0 = free_at + table[0]
        i0 = bisect_left(live, (thr0,))
        keep = []
        for j, e in enumerate(live[:i0]):   # cannot finish here even alone: drop, unless another GPU can
            if self._elsewhere(m, e[2], g, now):
                keep = live[j:i0]           # later deadlines: that GPU can finish them too
                self.counters["skipped"] += len(keep)
                break
            self._drop(e[2], thr0, now)
        cand = live[i0:]
        if not cand:
            # Nothing for this GPU. The GPU that can still serve the kept requests has been told (or is
            # loading m and will be when the load completes); telling this one again would loop.
            m.queue = keep                  # sorted: a valid heap
            return
        es = [e[0] for e in cand]
        n_live = len(cand)
        opts = []
        prev = 0
        for k, b in enumerate(sizes):
            i = bisect_left(es, free_at + table[k])
            f = n_live - i
            if f <= 0:
                continue
            n = b if b < f else f
            if n <= prev:                   # would run on a smaller compiled size: not a distinct option
                continue
            prev = sizes[k]
            opts.append((es[i] - table[k], k, i, n))
        urgent = min(opts)
        horizon = free_at + table[urgent[1]]
        best = urgent
        for o in opts:                      # the largest batch among those that cannot wait for the urgent one
            if o[0] < horizon and o[3] > best[3]:
                best = o
        _, k, i, n = best
        batch = cand[i:i + n]
        m.queue = keep + cand[:i] + cand[i + n:]    # still sorted: a valid heap
        self._dispatch(g, m, [e[2] for e in batch], table[k], free_at, now)
        self._requeue(m)

    def _dispatch(self, g: GPUState, m: ModelState, reqs: list[Request], predicted: int, free_at: int,
                  now: int) -> None:
        m.n_queued -= len(reqs)
        latest = now + self.future + self.sa
        if free_at + self.sa > latest:
            latest = free_at + self.sa
        self.ctl.send_infer(g, m, reqs, predicted, free_at, now, latest, now)
        self.tracker.executing(reqs, m, g)
        self.n_batches += 1

    def _drop(self, r: Request, earliest_end: int, now: int) -> None:
        self.ctl.finalize(r, DROPPED, now, f"cannot finish by its deadline: the earliest predicted end is "
                                           f"{(earliest_end - r.exec_deadline) / 1e6:.3f} ms after the exec "
                                           f"deadline (deadline - {self.buffer / 1e6:g} ms buffer)")

    def _elsewhere(self, m: ModelState, r: Request, g: GPUState, now: int) -> bool:
        """Another GPU holding m could still finish r in time: make sure it looks at m."""
        ed = r.exec_deadline
        est = _est(m)
        for h in m.loaded:
            if h is g or h.failed:
                continue
            e1 = est.exec_table(h.clock)[0]
            if h.exec.available(now) + e1 <= ed:
                self._seq += 1
                heapq.heappush(h.heap, (ed - e1, self._seq, m.version, m))
                self._dirty[h.index] = h
                return True
        for h in m.loading:
            if max(h.pcie.available(now), h.exec.available(now)) + est.exec_table(h.clock)[0] <= ed:
                return True
        return False

    def _wake(self, g: GPUState, t: int) -> None:
        if 0 <= g.wake_at <= t:
            return
        g.wake_at = t
        self.ctl.call_at(t, self._on_wake, (g, t))

    def _on_wake(self, arg: tuple[GPUState, int], now: int) -> None:
        g, t = arg
        if g.wake_at != t:          # superseded by an earlier wake-up, which has run
            return
        g.wake_at = -1
        self._dirty[g.index] = g
        self._run_dirty(now)

    # ====================================================================================== results
    def retry(self, rec: ActionRecord, result: Result, now: int) -> list[Request]:
        m, g = rec.model, rec.gpu
        assert m is not None and g is not None, "an Infer names its model and GPU"
        if result.status in NOT_LOADED and m.id in g.loaded and rec.epoch == g.epoch:   # our view was wrong
            self.tracker.unload(m, g)
            self.counters["repaired_placement"] += 1
        if not self.ctl.config.retry_window_errors or result.status not in RETRYABLE:
            return []
        again = []
        for r in rec.reqs:
            if r.state == INFLIGHT:
                r.state = QUEUED
                r.gpu = None
                r.batch_size = 0
                r.action_id = -1
                heapq.heappush(m.queue, (r.exec_deadline, r.id, r))
                m.n_queued += 1
                again.append(r)
        if again:
            self.counters["retried"] += len(again)
            self._requeue(m)
            if not m.holding:
                self._kick_loads(now)
        return again

    def on_infer_done(self, rec: ActionRecord, result: Result | None, now: int) -> None:
        g = rec.gpu
        assert g is not None, "an Infer names its GPU"
        if not g.failed and g.heap:     # (with nothing in its heap, scheduling g does nothing)
            self._dirty[g.index] = g
        if self._dirty and not self._scheduling:
            self._run_dirty(now)

    def on_load_done(self, rec: ActionRecord, result: Result | None, now: int) -> None:
        m, g = rec.model, rec.gpu
        assert m is not None and g is not None, "a LoadWeights names its model and GPU"
        if m.id not in g.loading:      # the GPU failed meanwhile and was cleared
            return
        ok = result is not None and result.ok
        self.tracker.finish_load(m, g, ok)
        self.counters["loads" if ok else "load_errors"] += 1
        if ok and not g.failed:
            self._requeue(m)
            self._run_dirty(now)
        elif result is not None and result.status == Status.LOAD_WEIGHTS_INSUFFICIENT_CACHE:
            # Enough free pages but not in the contiguous runs the model needs (a tensor larger than a page):
            # free one more least-recently-used model so the next attempt finds a longer hole.
            v = self.tracker.evict_candidate(g)
            if v is not None:
                self.ctl.send_evict(g, v, now)
                self.tracker.unload(v, g)
                self.counters["fragmentation_evictions"] += 1
        self._kick_loads(now)

    def on_evict_done(self, rec: ActionRecord, ok: bool, now: int) -> None:
        if not ok:
            self.counters["evict_errors"] += 1

    def on_gpu_failed(self, g: GPUState, now: int) -> None:
        """Take g out of service: nothing is scheduled there any more; its models must be loaded elsewhere."""
        for m in list(g.loading.values()):
            self.tracker.finish_load(m, g, False)
        for m in list(g.loaded.values()):
            self.tracker.unload(m, g)
            self._requeue(m)
        g.heap.clear()
        self._run_dirty(now)
        self._kick_loads(now)

    def on_gpu_revived(self, g: GPUState, now: int) -> None:
        for m in list(g.loaded.values()):   # adopted while g was out: give g their queues' fronts
            self._requeue(m)
        self._dirty[g.index] = g
        self._run_dirty(now)
        self._kick_loads(now)

    def adopt(self, m: ModelState, g: GPUState, now: int) -> None:
        self.tracker.begin_load(m, g)
        self.tracker.finish_load(m, g, True)
        if not g.failed:
            self._requeue(m)

    def forget(self, m: ModelState, g: GPUState, now: int) -> None:
        self.tracker.unload(m, g)
        self._requeue(m)
        if m.n_queued and not m.holding:
            self._kick_loads(now)

    # ====================================================================================== loads
    def _kick_loads(self, now: int) -> None:
        """A load pass soon (coalesced over load_interval)."""
        if self._load_timer_at is not None:
            return
        t = max(now, self._last_pass + self.load_interval)
        self._load_timer_at = t
        self.ctl.call_at(t, self._on_load_timer)

    def _on_load_timer(self, _arg: Any, now: int) -> None:
        self._load_timer_at = None
        self._load_pass(now)

    def _load_pass(self, now: int) -> None:
        self._last_pass = now
        tr = self.tracker
        tr.check(now)
        if not tr.wants_load():
            return
        ctl = self.ctl
        max_loads = self.max_loads
        # least-loaded GPUs choose first; GPUs with max_loads loads outstanding choose nothing (when every GPU
        # has, the pass is over: the wants_load() after each GPU would answer as the one above did)
        order = [(-g.weight, g.index, g) for g in ctl.gpus if not g.failed and g.loads_outstanding < max_loads]
        if not order:
            return
        order.sort()                    # (indices are unique: GPUs themselves are never compared)
        for _, _, g in order:
            while g.loads_outstanding < max_loads:
                pa = g.pcie.available(now)
                if pa >= now + self.sa:                     # the PCIe link has enough planned already:
                    t = pa - self.sa + 1                    # look again when it has not
                    if self._load_timer_at is None or self._load_timer_at > t:
                        self._load_timer_at = t
                        ctl.call_at(t, self._on_load_timer)
                    break
                total = g.total_pages       # (choose() calls fits at once: the loop variable is current)
                m = tr.choose(g, now, lambda m: m.num_pages <= total)
                if m is None or not self._make_room(g, m, now):
                    break
                latest = max(now + self.future + self.sa, pa + self.sa)
                ctl.send_load(g, m, _est(m).load_ns(), pa, now, latest, now)
                tr.begin_load(m, g)
                self.counters["loads_sent"] += 1
            if not tr.wants_load():
                return

    def _make_room(self, g: GPUState, m: ModelState, now: int) -> bool:
        tr = self.tracker
        while g.free_pages < m.num_pages:
            v = tr.evict_candidate(g)
            if v is None:
                return False
            self.ctl.send_evict(g, v, now)
            tr.unload(v, g)
            self.counters["evictions"] += 1
        return True

    def summary(self) -> dict:
        if self.n_batches:
            self.counters["batches"] = self.n_batches
        return {f"clockwork_{k}": v for k, v in sorted(self.counters.items())}
