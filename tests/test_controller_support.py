"""Shared set-up for the controller tests (no tests here): a controller with real emulated workers on a
VirtualClock, a recorder, and checks over the recorded telemetry."""
from __future__ import annotations

import threading
import time
from collections import defaultdict

from workbench.clock import VirtualClock
from workbench.controller.config import ControllerConfig
from workbench.controller.controller import Controller
from workbench.telemetry.recorder import Recorder
from workbench.worker.config import WorkerConfig
from workbench.worker.emulated import EmulatedWorker

MS = 1_000_000


def make(policy="clockwork", workers=1, gpus=1, models=(("resnet50", 4),), config=None, worker_config=None,
         seed=0, worker_cls=EmulatedWorker, **policy_options):
    clock = VirtualClock()
    rec = Recorder()
    ctl = Controller(clock, policy=policy, config=config or ControllerConfig(), recorder=rec, **policy_options)
    for w in range(workers):
        ctl.add_worker(lambda cb, w=w: worker_cls(clock, gpus, "h200", worker_config, cb, seed=seed * 100 + w))
    ids = []
    for name, copies in models:
        ids += ctl.load_model(f"profile:{name}", copies)
    ctl.wait_ready()
    return clock, ctl, ids, rec


class Outcomes:
    """Collects callbacks; checks each request is answered once and no later than its deadline."""

    def __init__(self, clock):
        self.clock = clock
        self.by_id = {}
        self.calls = defaultdict(int)
        self.late = []

    def __call__(self, o):
        self.calls[o.request_id] += 1
        self.by_id[o.request_id] = o
        if self.clock.now() > o.deadline and o.status != "rejected":
            self.late.append(o)

    def statuses(self):
        out = defaultdict(int)
        for o in self.by_id.values():
            out[o.status] += 1
        return dict(out)

    def check_once(self, submitted, ctl=None):
        if ctl is not None:
            assert ctl.errors == [], ctl.errors
        assert sorted(self.by_id) == sorted(submitted), "a request was never answered"
        assert all(n == 1 for n in self.calls.values()), "a request was answered twice"
        assert not self.late, f"answered after the deadline: {self.late[:3]}"


class Waiter(Outcomes):
    """Outcomes from clients on other threads; `done` is set once n requests are answered."""

    def __init__(self, clock, n):
        super().__init__(clock)
        self.n = n
        self.lock = threading.Lock()
        self.done = threading.Event()

    def __call__(self, o):
        with self.lock:
            super().__call__(o)
            if len(self.by_id) >= self.n:
                self.done.set()


def process_worker_killed_is_reloaded_and_serves_again(device, cfg, path, wait_s, **worker_kw):
    """A real executor process (ProcessWorker on `device`) killed with SIGKILL while serving 2 copies of the mlp
    at `path`: requests in flight end once (success, error or dropped), the controller hears the restart
    (on_restart), loads the model from disk again and serves every request after it; `wait_s` bounds each wait."""
    import os
    import signal

    import numpy as np

    from workbench.clock import RealClock
    from workbench.worker.process import ProcessWorker
    clock = RealClock()
    ctl = Controller(clock)
    restarts = []
    try:
        ctl.add_worker(lambda cb: ProcessWorker(device, cfg, cb, on_restart=restarts.append, **worker_kw))
        ids = ctl.load_model(str(path), 2)
        ctl.wait_ready(2 * wait_s)
        x = np.zeros(128, np.float32)

        def batch(n, slo_ms):
            w = Waiter(clock, n)
            for i in range(n):
                ctl.submit(ids[i % 2], inputs=x, slo=slo_ms * MS, callback=w)
            return w
        first = batch(20, 5000)
        assert first.done.wait(wait_s) and first.statuses() == {"success": 20}, first.statuses()
        os.kill(ctl.workers[0].pid, signal.SIGKILL)
        during = batch(10, 3000)
        assert during.done.wait(wait_s)
        deadline = time.monotonic() + 2 * wait_s
        while (not restarts or any(g.failed for g in ctl.gpus)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert restarts == [1] and not any(g.failed for g in ctl.gpus), (restarts, ctl.gpus, ctl.summary())
        assert set(during.statuses()) <= {"success", "error", "dropped"}
        after = batch(20, 5000)
        assert after.done.wait(wait_s) and after.statuses() == {"success": 20}, \
            (after.statuses(), [o.message for o in after.by_id.values() if o.status != "success"][:3], ctl.summary())
        assert ctl.summary()["worker_restarts"] == 1
        assert all(n == 1 for w in (first, during, after) for n in w.calls.values())
    finally:
        ctl.close()
        clock.close()


def submit_at(clock, ctl, t, model_id, out, ids_out, **kw):
    def go():
        ids_out.append(ctl.submit(model_id, callback=out, **kw))
    clock.call_at(t, go)



def arrivals(clock, ctl, ids, out, n, gap, slo=100 * MS, t0=None):
    """n requests `gap` apart from t0 (default now), round-robin over `ids`; returns their ids."""
    rids = []
    t0 = clock.now() if t0 is None else t0
    for i in range(n):
        submit_at(clock, ctl, t0 + i * gap, ids[i % len(ids)], out, rids, slo=slo)
    return rids

def exec_overlaps(actions):
    """(worker, gpu, a, b) for every pair of successful Infer execs that overlap on one GPU."""
    df = actions.filter((actions["type"] == "INFER") & (actions["status"] == 0)).sort("measured_begin")
    bad = []
    last = {}
    for row in df.iter_rows(named=True):
        key = (row["worker"], row["gpu"])
        prev = last.get(key)
        if prev is not None and row["measured_begin"] < prev["measured_end"]:
            bad.append((key, prev["action_id"], row["action_id"]))
        if prev is None or row["measured_end"] > prev["measured_end"]:
            last[key] = row
    return bad


__all__ = ["make", "Outcomes", "submit_at", "exec_overlaps", "MS", "WorkerConfig", "ControllerConfig"]


class FaultyWorker:
    """A real EmulatedWorker behind a faulty link, for fault tests (same constructor as EmulatedWorker).

    - `hold(t0, t1)`: the worker hangs from t0 to t1: every result it produces in that window is held back and
      delivered, in order, at t1 (t1 = None: never; the worker has stopped answering).
    - `delay(fn)`: `fn(result) -> ns` extra delay for each result (a slow link, a stalled process).
    - `crash_at(t)`: the worker dies at t, as `ProcessWorker` reports it: every action not yet answered gets one
      RUNTIME_ERROR, a fresh worker (no models, empty caches) replaces it, then `on_restart(restarts)`."""

    def __init__(self, clock, num_gpus, profile, config, on_result, seed=0):
        self.clock, self.on_result, self.seed = clock, on_result, seed
        self._args = (num_gpus, profile, config)
        self.num_gpus = num_gpus
        self.on_restart = None
        self.restarts = 0
        self.gen = 0
        self.holds = []               # (t0, t1 or None)
        self.delay_fn = None
        self.undelivered = {}         # action id -> action submitted and not yet answered to the controller
        self.delivered = 0
        self.inner = self._new_inner()

    def _new_inner(self):
        from workbench.worker.emulated import EmulatedWorker
        n, profile, config = self._args
        return EmulatedWorker(self.clock, n, profile, config, lambda r, g=self.gen: self._produced(g, r),
                              seed=self.seed + 1000 * self.gen)

    def hold(self, t0, t1=None):
        self.holds.append((t0, t1))

    def delay(self, fn):
        self.delay_fn = fn

    def crash_at(self, t):
        self.clock.call_at(t, self.crash)

    def submit(self, action):
        self.undelivered[action.id] = action
        self.inner.submit(action)

    def _produced(self, gen, r):
        if gen != self.gen:
            return                     # from a crashed generation: already answered with RUNTIME_ERROR
        now = self.clock.now()
        t = now + (self.delay_fn(r) if self.delay_fn else 0)
        for t0, t1 in self.holds:
            if t0 <= now and (t1 is None or now < t1):
                t = max(t, 1 << 62) if t1 is None else max(t, t1)
        if t >= 1 << 62:
            return                     # never answered
        if t > now:
            self.clock.call_at(t, self._deliver, gen, r)
        else:
            self._deliver(gen, r)

    def _deliver(self, gen, r):
        if gen != self.gen or self.undelivered.pop(r.id, None) is None:
            return
        self.delivered += 1
        self.on_result(r)

    def crash(self):
        from workbench.contract import Status, error
        now = self.clock.now()
        old, self.gen = self.inner, self.gen + 1
        dead, self.undelivered = self.undelivered, {}
        old.close()                    # its SHUTTING_DOWN answers belong to the dead generation: dropped
        for a in dead.values():
            self.on_result(error(a, Status.RUNTIME_ERROR, "executor process died (test crash)", now, now))
        self.inner = self._new_inner()
        self.restarts += 1
        if self.on_restart is not None:
            self.on_restart(self.restarts)

    def state(self):
        return self.inner.state()

    def close(self):
        self.inner.close()


def check_view_matches_workers(ctl):
    """The controller's placement and page accounting agree with what each worker's cache really holds."""
    for w, worker in enumerate(ctl.workers):
        st = worker.state()
        for g in ctl.worker_gpus[w]:
            gs = st["gpus"][g.local]
            if g.failed:
                continue
            assert sorted(g.loaded) == gs["models"], (g, sorted(g.loaded), gs["models"])
            assert not g.loading
            assert g.free_pages == gs["free_pages"], (g, g.free_pages, gs["free_pages"])


def check_quiet(ctl):
    """Nothing left in flight or planned anywhere, every counter back to zero."""
    assert ctl._actions == {} or all(r.type.name == "GET_WORKER_STATE" for r in ctl._actions.values()), \
        list(ctl._actions.values())[:3]
    for g in ctl.gpus:
        assert g.exec.jobs == {} and g.pcie.jobs == {}, g
        assert g.infers_outstanding == 0 and g.loads_outstanding == 0 and not g.busy_models, g
        assert g.free_pages == g.total_pages - sum(m.num_pages for m in [*g.loaded.values(), *g.loading.values()])


__all__ += ["FaultyWorker", "check_view_matches_workers", "check_quiet"]
