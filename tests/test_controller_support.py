"""Shared set-up for the controller tests (no tests here): a controller with real emulated workers on a
VirtualClock, a recorder, and checks over the recorded telemetry."""
from __future__ import annotations

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


def submit_at(clock, ctl, t, model_id, out, ids_out, **kw):
    def go():
        ids_out.append(ctl.submit(model_id, callback=out, **kw))
    clock.call_at(t, go)


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
