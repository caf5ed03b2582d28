"""Baseline policies in the same harness as Clockwork (peers.md §2.1-2.3), so telemetry compares row for row.

Both are deadline-unaware, as the systems they imitate: a request runs whenever its batch comes up; if its
deadline passes first the client is told `timeout` at the deadline (the callback contract), but the request
stays queued and still runs, wasting GPU time, as in Triton ("once scheduled, Triton can no longer reject").
Infers are sent with `latest = FOREVER` and at most `max_inflight` per GPU (a server keeps the GPU busy
without planning ahead). The worker runs one inference at a time per GPU, so models sharing a GPU take turns
in the order their batches became ready.

- `TritonPolicy` (Triton dynamic batcher + ModelMesh placement): one FIFO queue per model; a batch is ready
  when `max_batch` requests wait or the oldest has waited `max_queue_delay`; it takes up to `max_batch`
  requests (n runs on the smallest compiled size >= n). One copy per model, loaded on demand on the GPU with
  the most free weight pages, evicting least-recently-used models (by bytes, i.e. pages) until it fits.
- `RayServePolicy` (Ray Serve model multiplexing, `@serve.batch`): each GPU is a replica holding at most
  `max_models_per_replica` models (LRU by count, no memory awareness: a load that does not fit in the GPU
  fails like Ray's OOM). A request goes to the replica already holding its model with the fewest ongoing
  requests; if every such replica has `max_ongoing_requests` or more, another replica loads the model.
  Per (model, replica) a batch queue of `max_batch_size` with `batch_wait_timeout`.
"""
from __future__ import annotations

from collections import Counter, deque
from typing import TYPE_CHECKING, ClassVar, Final

from workbench.contract import FOREVER, Result
from workbench.controller import state
from workbench.controller.compiled import mypyc_attr
from workbench.controller.policy import Policy
from workbench.controller.requests import DONE, ERROR, TIMEOUT, Request
from workbench.controller.state import GPUState, ModelState

if TYPE_CHECKING:
    from workbench.controller.controller import ActionRecord

MS: Final = 1_000_000


class Lane:
    """The queue of one model on one GPU."""
    __slots__ = ("m", "g", "q", "in_ready", "timer", "inflight")

    def __init__(self, m: ModelState, g: GPUState):
        self.m = m
        self.g = g
        self.q: deque[Request] = deque()
        self.in_ready = False
        self.timer = False
        self.inflight = 0       # requests of this lane in Infers not yet answered


@mypyc_attr(allow_interpreted_subclasses=True)
class QueueingBaseline(Policy):
    """Shared machinery: lanes, ready queues, on-demand loads with LRU eviction."""
    expired_status: ClassVar[str] = TIMEOUT

    def __init__(self, max_batch: int, batch_delay: int, max_inflight: int = 2, max_loads: int = 2):
        super().__init__()
        if max_batch < 1 or batch_delay < 0 or max_inflight < 1 or max_loads < 1:
            raise ValueError(f"{type(self).__name__}: max_batch, max_inflight and max_loads must be >= 1 and "
                             f"the batch delay >= 0 (got {max_batch}, {max_inflight}, {max_loads}, {batch_delay})")
        self.max_batch = max_batch
        self.batch_delay = batch_delay
        self.max_inflight = max_inflight
        self.max_loads = max_loads
        self.lanes: dict[tuple[int, int], Lane] = {}
        self.ready: dict[int, deque[Lane]] = {}
        self.want_load: dict[tuple[int, int], tuple[ModelState, GPUState]] = {}   # loads waiting for room
        self.queued: dict[int, int] = {}   # gpu index -> requests waiting in its lanes
        self.counters: Counter[str] = Counter()

    def on_gpu_added(self, g: GPUState) -> None:
        self.ready[g.index] = deque()
        self.queued[g.index] = 0

    # -- policy-specific
    def route(self, m: ModelState, now: int) -> GPUState | None:
        raise NotImplementedError

    def make_room(self, g: GPUState, m: ModelState, now: int) -> bool:
        raise NotImplementedError

    # -- requests
    def lane(self, m: ModelState, g: GPUState) -> Lane:
        key = (m.id, g.index)
        ln = self.lanes.get(key)
        if ln is None:
            ln = self.lanes[key] = Lane(m, g)
        return ln

    def on_request(self, r: Request, now: int) -> None:
        m = r.model
        assert m is not None, "an admitted request names its model"
        g = self.route(m, now)
        if g is None:
            self.ctl.finalize(r, ERROR, now, "no GPU can hold the model (every replica is busy or too small)")
            return
        ln = self.lane(m, g)
        ln.q.append(r)
        self.queued[g.index] += 1
        if m.id in g.loaded:
            g.loaded.move_to_end(m.id)
            self._check_ready(ln, now)
            self._pump(g, now)
        elif m.id not in g.loading:
            self._want(m, g, now)

    def _check_ready(self, ln: Lane, now: int) -> None:
        if ln.in_ready or not ln.q:
            return
        if len(ln.q) >= self.max_batch or now >= ln.q[0].arrival + self.batch_delay:
            ln.in_ready = True
            self.ready[ln.g.index].append(ln)
        elif not ln.timer:
            ln.timer = True
            self.ctl.call_at(ln.q[0].arrival + self.batch_delay, self._on_lane_timer, ln)

    def _on_lane_timer(self, ln: Lane, now: int) -> None:
        ln.timer = False
        if ln.m.id in ln.g.loaded:
            self._check_ready(ln, now)
            self._pump(ln.g, now)

    def _pump(self, g: GPUState, now: int) -> None:
        ready = self.ready[g.index]
        ctl = self.ctl
        while ready and g.infers_outstanding < self.max_inflight and not g.failed:
            ln = ready.popleft()
            ln.in_ready = False
            m = ln.m
            if not ln.q or m.id not in g.loaded:
                continue
            n = min(len(ln.q), self.max_batch, m.max_batch)
            reqs = [ln.q.popleft() for _ in range(n)]
            self.queued[g.index] -= n
            assert m.est is not None, "a ready model has estimates"
            est = m.est.exec_table(g.clock)[m.batch_sizes.index(m.pad(n))]
            begin = g.exec.available(now)
            ctl.send_infer(g, m, reqs, est, begin, now, FOREVER, now)
            ln.inflight += n
            g.loaded.move_to_end(m.id)
            self.counters["batches"] += 1
            self._check_ready(ln, now)

    def on_finalized(self, r: Request, prev_state: int, now: int) -> None:
        pass   # expired requests stay queued and still run

    def queued_requests(self) -> list[Request]:
        return [r for ln in self.lanes.values() for r in ln.q if r.state != DONE]

    # -- results
    def on_infer_done(self, rec: ActionRecord, result: Result | None, now: int) -> None:
        m, g = rec.model, rec.gpu
        assert m is not None and g is not None, "an Infer names its model and GPU"
        ln = self.lanes.get((m.id, g.index))
        if ln is not None:
            ln.inflight -= rec.batch_size
        self._pump(g, now)
        self._retry_loads(now)

    def on_load_done(self, rec: ActionRecord, result: Result | None, now: int) -> None:
        m, g = rec.model, rec.gpu
        assert m is not None and g is not None, "a LoadWeights names its model and GPU"
        if m.id not in g.loading:
            return
        ok = result is not None and result.ok
        state.finish_load(m, g, ok)
        self.counters["loads" if ok else "load_errors"] += 1
        ln = self.lanes.get((m.id, g.index))
        if ok:
            if ln is not None:
                self._check_ready(ln, now)
                self._pump(g, now)
        elif ln is not None and self.retry_fragmented(result, g, m, now):
            pass
        elif ln is not None:   # the model cannot be loaded there: its queued requests fail (Ray/Triton: error)
            self.queued[g.index] -= len(ln.q)
            while ln.q:
                self.ctl.finalize(ln.q.popleft(), ERROR, now, f"loading model {m.id} on worker {g.worker} gpu "
                                                              f"{g.local} failed")
        self._retry_loads(now)

    def retry_fragmented(self, result: Result | None, g: GPUState, m: ModelState, now: int) -> bool:
        """A load that failed for want of contiguous pages: evict one more model and try again (False: no)."""
        return False

    def on_gpu_failed(self, g: GPUState, now: int) -> None:
        for m in list(g.loading.values()):
            state.finish_load(m, g, False)
        for m in list(g.loaded.values()):
            state.unload(m, g)
        for (mid, gi), ln in list(self.lanes.items()):
            if gi == g.index:
                self.queued[gi] -= len(ln.q)
                while ln.q:
                    self.ctl.finalize(ln.q.popleft(), ERROR, now, f"worker {g.worker} gpu {g.local} failed")

    def on_gpu_revived(self, g: GPUState, now: int) -> None:
        self._retry_loads(now)
        self._pump(g, now)

    # -- loads
    def _want(self, m: ModelState, g: GPUState, now: int) -> None:
        self.want_load[(m.id, g.index)] = (m, g)
        self._retry_loads(now)

    def _retry_loads(self, now: int) -> None:
        if not self.want_load:
            return
        for key, (m, g) in list(self.want_load.items()):
            if m.id in g.loaded or m.id in g.loading or g.failed:
                del self.want_load[key]
                continue
            if g.loads_outstanding >= self.max_loads or not self.make_room(g, m, now):
                continue
            del self.want_load[key]
            begin = g.pcie.available(now)
            assert m.est is not None, "a ready model has estimates"
            self.ctl.send_load(g, m, m.est.load_ns(), begin, now, FOREVER, now)
            state.begin_load(m, g)
            self.counters["loads_sent"] += 1

    def evict(self, g: GPUState, m: ModelState, now: int) -> None:
        self.ctl.send_evict(g, m, now)
        state.unload(m, g)
        self.counters["evictions"] += 1
        ln = self.lanes.get((m.id, g.index))
        if ln is not None and ln.q:    # requests still wait for it there: load it again later
            self.want_load[(m.id, g.index)] = (m, g)

    def summary(self) -> dict:
        return {f"{self.name}_{k}": v for k, v in sorted(self.counters.items())}


@mypyc_attr(allow_interpreted_subclasses=True)
class TritonPolicy(QueueingBaseline):
    name: ClassVar[str] = "triton"

    def __init__(self, max_batch: int = 16, max_queue_delay: int = 1 * MS, max_inflight: int = 2,
                 max_loads: int = 2):
        super().__init__(max_batch, max_queue_delay, max_inflight, max_loads)

    def route(self, m: ModelState, now: int) -> GPUState | None:
        if m.holding:
            return m.holding[0]
        for key in [k for k in self.want_load if k[0] == m.id]:   # already waiting for a load somewhere
            return self.want_load[key][1]
        gpus = [g for g in self.ctl.gpus if not g.failed and g.total_pages >= m.num_pages]
        if not gpus:
            return None
        return max(gpus, key=lambda g: (g.free_pages, -g.infers_outstanding, -g.index))

    def retry_fragmented(self, result: Result | None, g: GPUState, m: ModelState, now: int) -> bool:
        """ModelMesh accounts bytes, not page runs: when the worker finds no hole long enough, free the
        least-recently-used idle model and load again."""
        from workbench.contract import Status
        if result is None or result.status != Status.LOAD_WEIGHTS_INSUFFICIENT_CACHE:
            return False
        victim = next((v for mid, v in g.loaded.items() if not g.busy_models.get(mid)), None)
        if victim is None:
            return False
        self.evict(g, victim, now)
        self.want_load[(m.id, g.index)] = (m, g)
        self.counters["fragmentation_evictions"] += 1
        return True

    def make_room(self, g: GPUState, m: ModelState, now: int) -> bool:
        """ModelMesh: evict least-recently-used models (not busy) until the pages fit."""
        if g.free_pages >= m.num_pages:
            return True
        busy = g.busy_models
        victims, free = [], g.free_pages
        for mid, v in g.loaded.items():          # oldest first
            if busy.get(mid):
                continue
            victims.append(v)
            free += v.num_pages
            if free >= m.num_pages:
                break
        if free < m.num_pages:
            return False
        for v in victims:
            self.evict(g, v, now)
        return True


@mypyc_attr(allow_interpreted_subclasses=True)
class RayServePolicy(QueueingBaseline):
    name: ClassVar[str] = "ray"

    def __init__(self, max_models_per_replica: int = 3, max_batch_size: int = 16,
                 batch_wait_timeout: int = 10 * MS, max_ongoing_requests: int = 5, max_inflight: int = 2,
                 max_loads: int = 2):
        super().__init__(max_batch_size, batch_wait_timeout, max_inflight, max_loads)
        if max_models_per_replica < 1 or max_ongoing_requests < 1:
            raise ValueError(f"ray: max_models_per_replica and max_ongoing_requests must be >= 1 "
                             f"(got {max_models_per_replica}, {max_ongoing_requests})")
        self.max_models = max_models_per_replica
        self.max_ongoing = max_ongoing_requests

    def _ongoing(self, m: ModelState, g: GPUState) -> int:
        ln = self.lanes.get((m.id, g.index))
        return len(ln.q) + ln.inflight if ln is not None else 0

    def _replica_load(self, g: GPUState) -> int:
        """Requests queued or running on replica g."""
        return self.queued[g.index] + g.infers_outstanding

    def route(self, m: ModelState, now: int) -> GPUState | None:
        holders = [g for g in m.holding if not g.failed]
        pending = [self.want_load[k][1] for k in self.want_load if k[0] == m.id]
        holders += [g for g in pending if g not in holders]
        best = min(holders, key=lambda g: (self._ongoing(m, g), g.index)) if holders else None
        if best is not None and self._ongoing(m, best) < self.max_ongoing:
            return best
        others = [g for g in self.ctl.gpus if not g.failed and g not in holders]
        if not others:
            return best
        g = min(others, key=lambda g: (self._replica_load(g), g.index))
        self.counters["scale_out" if holders else "cold_routes"] += 1
        return g

    def make_room(self, g: GPUState, m: ModelState, now: int) -> bool:
        """Ray: at most max_models_per_replica models; evict the least-recently-used one (not busy)."""
        busy = g.busy_models
        while len(g.loaded) + len(g.loading) >= self.max_models:
            victim = next((v for mid, v in g.loaded.items() if not busy.get(mid)), None)
            if victim is None:
                return False
            self.evict(g, victim, now)
        return True
