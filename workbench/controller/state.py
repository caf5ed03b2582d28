"""The controller's view of models and GPUs (plain mutable records, guarded by the controller's lock)."""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from workbench.controller.estimates import ModelEstimates
from workbench.controller.tracker import Timeline

if TYPE_CHECKING:
    from workbench.controller.requests import Request


class ModelState:
    """One model instance (one model id): its profile, estimates, queue, placement and load demand."""

    def __init__(self, mid: int, name: str, path: str):
        self.id = mid
        self.name = name
        self.path = path
        self.ready = False                     # every worker has reported its LoadModelFromDisk result
        self.workers_reported: list[int] = []
        self.error = ""                        # why loading from disk failed (if it did)
        self.batch_sizes: tuple[int, ...] = ()  # sizes the scheduler may use (ascending)
        self.max_batch = 1
        self.input_bytes = 0
        self.input_specs: tuple | None = None    # ((shape, dtype), ...) per input when known (artifacts)
        self.output_bytes = 0
        self.weights_bytes = 0
        self.num_pages = 0
        self.est: ModelEstimates | None = None
        self.b1_ns = 0                         # batch-1 estimate at start-up (for slo_factor), fixed
        self.min_slo = 0                       # shortest admissible SLO: b1_ns + the controller's buffer
        # queue of pending requests: heap of (exec_deadline, seq, request); finalised ones are skipped lazily
        self.queue: list[tuple[int, int, Request]] = []
        self.n_queued = 0
        self.version = 0                       # bumped whenever the queue front may have changed
        # placement
        self.loaded: list[GPUState] = []       # GPUs holding ready weights
        self.loading: list[GPUState] = []      # GPUs with a LoadWeights in flight
        self.holding: list[GPUState] = []      # loaded + loading (the LoadTracker's `model.gpus`)
        # LoadTracker demand (clockwork.md §4.8)
        self.outstanding_exec = 0.0
        self.outstanding_lw = 0.0
        self.allocations: dict[int, float] = {}   # gpu index -> exec demand allocated there
        self.priority = 0.0
        self.is_empty = True
        self.last_used = 0
        self.stale = False
        self.load_version = 0

    def pad(self, n: int) -> int:
        """Smallest supported batch size >= n."""
        for b in self.batch_sizes:
            if b >= n:
                return b
        return self.batch_sizes[-1]

    def __repr__(self) -> str:
        return f"ModelState({self.id}, {self.name!r}, loaded={[g.index for g in self.loaded]})"


class GPUState:
    """One GPU of one worker: exec and PCIe timelines, weights cache occupancy, its infer strategy heap."""

    def __init__(self, index: int, worker: int, local: int, total_pages: int, page_size: int,
                 clock_mhz: int, future: int, lag: int):
        self.index = index          # global index over all workers' GPUs
        self.worker = worker        # worker index
        self.local = local          # GPU number on that worker
        self.exec = Timeline(future, lag)
        self.pcie = Timeline(future, lag)
        self.clock = clock_mhz
        self.total_pages = total_pages
        self.free_pages = total_pages
        self.page_size = page_size
        self.heap: list[tuple[int, int, int, ModelState]] = []   # (latest start time, seq, model version, model)
        self.loaded: OrderedDict[int, ModelState] = OrderedDict()   # LRU order, oldest first
        self.loading: dict[int, ModelState] = {}
        self.loads_outstanding = 0
        self.infers_outstanding = 0
        self.wake_at = -1           # time of the pending wake-up (-1: none)
        self.outstanding = 0.0      # LoadTracker: exec demand allocated here (ns, capacity-normalised)
        self.weight = 0.0
        self.failed = False         # out of service (its worker stopped answering, or restarted)
        self.reason = ""            # why it is out of service
        self.epoch = 0              # bumped when the controller's view of g is reset (failure, restart)
        self.timeouts = 0           # consecutive actions without an answer
        self.busy_models: dict[int, int] = {}
        self.placing: dict[int, int] = {}   # model id -> LoadWeights/EvictWeights in flight (any epoch)

    def __repr__(self) -> str:
        return f"GPU({self.worker}.{self.local}, pages {self.free_pages}/{self.total_pages})"


# ------------------------------------------------------------------------------ placement transitions
def begin_load(m: ModelState, g: GPUState) -> None:
    """A LoadWeights of m to g was sent: its pages are taken now, it is neither loadable nor evictable."""
    m.loading.append(g)
    m.holding.append(g)
    g.loading[m.id] = m
    g.loads_outstanding += 1
    g.free_pages -= m.num_pages


def finish_load(m: ModelState, g: GPUState, ok: bool) -> None:
    """The LoadWeights result arrived (or never will): m is ready on g, or its pages are given back."""
    m.loading.remove(g)
    del g.loading[m.id]
    g.loads_outstanding -= 1
    if ok:
        m.loaded.append(g)
        g.loaded[m.id] = m
    else:
        m.holding.remove(g)
        g.free_pages += m.num_pages


def unload(m: ModelState, g: GPUState) -> None:
    """An EvictWeights of m from g was sent (or g failed): the pages are free for the next load now."""
    m.loaded.remove(g)
    m.holding.remove(g)
    del g.loaded[m.id]
    g.free_pages += m.num_pages
