"""The emulated worker (virtual and real time): windows, cache accounting, status codes, determinism."""
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from workbench.clock import RealClock, VirtualClock
from workbench.contract import (FOREVER, ClearCache, EvictWeights, GetWorkerState, Infer, LoadModelFromDisk,
                                LoadWeights, Status, decode, encode)
from workbench.worker.config import WorkerConfig
from workbench.worker.emulated import EmulatedWorker
from workbench.worker.profile import Profile

MS = 1_000_000
PROFILE = Profile.load("h200")
R50 = PROFILE.models["resnet50"]


class Harness:
    """An emulated worker on a VirtualClock that records every result by action id."""

    def __init__(self, num_gpus=1, cache="128 MiB", seed=0, **cfg):
        self.clock = VirtualClock()
        self.results = {}
        self.dupes = []
        self.config = WorkerConfig.load(None, weights_cache_size=cache, **cfg)
        self.w = EmulatedWorker(self.clock, num_gpus, PROFILE, self.config, self._on, seed=seed)
        self.next_id = 1000

    def _on(self, r):
        if r.id in self.results:
            self.dupes.append(r)
        self.results[r.id] = r

    def submit(self, action, at=None):
        if at is None:
            self.w.submit(action)
        else:
            self.clock.call_at(at, self.w.submit, action)
        return action.id

    def run(self):
        self.clock.run()
        return self

    def do(self, action):
        self.submit(action)
        self.run()
        return self.results[action.id]

    def load_model(self, name="resnet50", copies=1, model_id=0):
        r = self.do(LoadModelFromDisk(id=self._id(), model_id=model_id, path=f"profile:{name}", copies=copies))
        assert r.ok, r.message
        return r

    def _id(self):
        self.next_id += 1
        return self.next_id


def test_load_infer_evict_roundtrip_and_state():
    h = Harness(num_gpus=2)
    r = h.load_model(copies=3)
    assert r.model_ids == (0, 1, 2) and r.batch_sizes == (1, 2, 4, 8, 16) and r.num_pages == 7
    assert r.weights_load_ns == R50.weights_load_ns and r.exec_ns[0] == R50.exec[1].p50_ns
    assert r.input_bytes == 3 * 224 * 224 * 4 and r.output_bytes == 4000
    lw = h.do(LoadWeights(id=1, model_id=1, gpu=1))
    assert lw.ok and lw.timing.duration > 0 and lw.timing.end - lw.timing.begin == lw.timing.duration
    inf = h.do(Infer(id=2, model_id=1, gpu=1, batch_size=3))
    assert inf.ok and inf.gpu == 1 and inf.batch_size == 3 and inf.gpu_clock == PROFILE.sm_clock_mhz
    # batch 3 runs on the compiled batch 4 (padding, as Clockwork)
    assert 0.9 < inf.exec.duration / R50.exec[4].p50_ns < 1.1
    assert inf.copy_input.end <= inf.exec.begin and inf.exec.end <= inf.copy_output.begin
    s = h.do(GetWorkerState(id=3)).state
    assert s["gpus"][1]["models"] == [1] and s["gpus"][1]["used_pages"] == 7 and s["gpus"][0]["used_pages"] == 0
    assert [m["model_id"] for m in s["models"]] == [0, 1, 2]
    assert h.do(EvictWeights(id=4, model_id=1, gpu=1)).ok
    assert h.do(GetWorkerState(id=5)).state["gpus"][1]["free_pages"] == 8
    assert h.do(Infer(id=6, model_id=1, gpu=1)).status == Status.EXEC_WEIGHTS_MISSING
    assert not h.dupes and h.w.check_consistency() == [] and h.w.in_flight() == 0


def test_error_codes_for_bad_actions():
    h = Harness(cache="128 MiB")
    h.load_model(copies=2)
    assert h.do(LoadWeights(id=1, model_id=0, gpu=0)).ok
    cases = [
        (LoadWeights(id=10, model_id=1, gpu=0), Status.LOAD_WEIGHTS_INSUFFICIENT_CACHE),   # 7 of 8 pages used
        (LoadWeights(id=11, model_id=99, gpu=0), Status.LOAD_WEIGHTS_UNKNOWN_MODEL),
        (LoadWeights(id=12, model_id=0, gpu=3), Status.INVALID_GPU),
        (EvictWeights(id=13, model_id=99, gpu=0), Status.EVICT_WEIGHTS_UNKNOWN_MODEL),
        (EvictWeights(id=14, model_id=1, gpu=0), Status.EVICT_WEIGHTS_NOT_IN_CACHE),
        (Infer(id=15, model_id=99, gpu=0), Status.COPY_INPUT_UNKNOWN_MODEL),
        (Infer(id=16, model_id=0, gpu=0, batch_size=17), Status.COPY_INPUT_INVALID_BATCH_SIZE),
        (Infer(id=17, model_id=0, gpu=0, batch_size=0), Status.COPY_INPUT_INVALID_BATCH_SIZE),
        (Infer(id=18, model_id=0, gpu=0, batch_size=2, inputs=(np.zeros((2, 3, 224, 224), np.float64),)),
         Status.COPY_INPUT_INVALID_INPUT),
        (Infer(id=19, model_id=0, gpu=0, batch_size=2, inputs=(np.zeros((1, 3, 224, 224), np.float32),)),
         Status.COPY_INPUT_BAD_SIZES),
        (Infer(id=20, model_id=0, gpu=0, inputs=(np.zeros((1, 3, 224, 224), np.float32),) * 2),
         Status.COPY_INPUT_INVALID_INPUT),
        (Infer(id=21, model_id=1, gpu=0), Status.EXEC_WEIGHTS_MISSING),
        (LoadModelFromDisk(id=22, model_id=1, path="profile:resnet50"), Status.INVALID_MODEL_ID),
        (LoadModelFromDisk(id=23, model_id=50, path="profile:nope"), Status.INVALID_PATH),
        (LoadModelFromDisk(id=24, model_id=50, path="/no/such/dir"), Status.INVALID_PATH),
        (LoadModelFromDisk(id=25, model_id=50, path="profile:resnet50", copies=0), Status.INVALID_ACTION),
        (Infer(id=26, model_id=0, gpu=0, batch_size=1.5), Status.INVALID_ACTION),
        (LoadWeights(id=-1, model_id=0, gpu=0), Status.INVALID_ACTION),
    ]
    for action, _ in cases:
        h.submit(action)
    h.run()
    for action, status in cases:
        r = h.results[action.id]
        assert r.status == status, (action, r)
        assert r.message, "every error names the problem"
    assert "resnet50" in h.results[16].message and "1..16" in h.results[16].message
    assert h.do(Infer(id=30, model_id=0, gpu=0, batch_size=16)).ok   # the worker is still consistent
    assert h.w.check_consistency() == [] and not h.dupes


def test_zero_size_inputs_rejected_when_not_allowed():
    h = Harness(allow_zero_size_inputs=False)
    h.load_model()
    h.do(LoadWeights(id=1, model_id=0, gpu=0))
    assert h.do(Infer(id=2, model_id=0, gpu=0)).status == Status.COPY_INPUT_INVALID_INPUT
    assert h.do(Infer(id=3, model_id=0, gpu=0, inputs=(np.zeros((1, 3, 224, 224), np.float32),))).ok


def test_windows_never_early_and_too_late_rejected():
    h = Harness()
    h.load_model()
    h.do(LoadWeights(id=1, model_id=0, gpu=0))
    t = h.clock.now()
    r = h.do(Infer(id=2, model_id=0, gpu=0, earliest=t + 20 * MS, latest=t + 25 * MS))
    assert r.ok and r.exec.begin == t + 20 * MS                          # exactly at earliest, never before
    assert r.copy_input.begin == t + 20 * MS - h.config.copy_input_lead_in  # copy input leads by 5 ms
    t = h.clock.now()
    h.clock.run_until(t + 10 * MS)
    late = h.do(Infer(id=3, model_id=0, gpu=0, earliest=0, latest=t))
    assert late.status == Status.COPY_INPUT_TOO_LATE and late.sent > t
    assert h.do(LoadWeights(id=4, model_id=0, gpu=0, latest=t)).status == Status.LOAD_WEIGHTS_TOO_LATE
    assert h.do(EvictWeights(id=5, model_id=0, gpu=0, latest=t)).status == Status.EVICT_WEIGHTS_TOO_LATE
    assert h.do(GetWorkerState(id=6, latest=t)).status == Status.COULD_NOT_START_IN_TIME
    assert h.do(LoadModelFromDisk(id=7, model_id=5, path="profile:mlp", latest=t)).status == \
        Status.COULD_NOT_START_IN_TIME
    # exec cannot start by latest because the GPU is busy with a long batch: 81, the earlier one succeeds
    now = h.clock.now()
    h.submit(Infer(id=8, model_id=0, gpu=0, batch_size=16, earliest=now, latest=now + MS))
    h.submit(Infer(id=9, model_id=0, gpu=0, batch_size=1, earliest=now, latest=now + 2 * MS))
    h.run()
    assert h.results[8].ok and h.results[9].status == Status.EXEC_TOO_LATE
    assert h.w.check_consistency() == []


def test_evict_during_inference_gives_84_and_frees_everything():
    h = Harness()
    h.load_model()
    h.do(LoadWeights(id=1, model_id=0, gpu=0))
    t = h.clock.now()
    h.submit(Infer(id=2, model_id=0, gpu=0, batch_size=16, earliest=t))
    h.submit(EvictWeights(id=3, model_id=0, gpu=0), at=t + 3 * MS)   # exec of b16 takes ~9.8 ms
    h.run()
    assert h.results[3].ok
    assert h.results[2].status == Status.EXEC_CONCURRENT_WEIGHTS_MODIFICATION
    assert h.w.state()["gpus"][0]["free_pages"] == 8 and h.w.check_consistency() == []
    # a reload racing an inference is also caught
    h.do(LoadWeights(id=4, model_id=0, gpu=0))
    t = h.clock.now()
    h.submit(Infer(id=5, model_id=0, gpu=0, batch_size=16, earliest=t))
    h.submit(LoadWeights(id=6, model_id=0, gpu=0), at=t + 2 * MS)
    h.run()
    assert h.results[5].status == Status.EXEC_CONCURRENT_WEIGHTS_MODIFICATION and h.results[6].ok


def test_clear_cache_during_a_load_gives_54():
    h = Harness()
    h.load_model(copies=2)
    h.do(LoadWeights(id=1, model_id=0, gpu=0))
    t = h.clock.now()
    h.submit(EvictWeights(id=2, model_id=0, gpu=0))
    h.submit(LoadWeights(id=3, model_id=1, gpu=0))
    h.submit(ClearCache(id=4), at=t + R50.weights_load_ns // 2)
    h.run()
    assert h.results[3].status == Status.LOAD_WEIGHTS_CONCURRENT_MODIFICATION
    assert h.results[4].ok and h.w.state()["gpus"][0]["used_pages"] == 0 and h.w.check_consistency() == []


def test_one_exec_at_a_time_and_queue_order_is_earliest():
    h = Harness(num_gpus=2, cache="1 GiB")
    h.load_model(copies=4)
    for m in range(4):
        h.do(LoadWeights(id=m + 1, model_id=m, gpu=m % 2))
    t = h.clock.now()
    ids = []
    for i in range(40):
        m = i % 4
        ids.append(h.submit(Infer(id=100 + i, model_id=m, gpu=m % 2, batch_size=1 + i % 8,
                                  earliest=t + (40 - i) * 100_000)))
    h.run()
    for gpu in (0, 1):
        rs = sorted((h.results[i] for i in ids if h.results[i].gpu == gpu), key=lambda r: r.exec.begin)
        assert all(r.ok for r in rs)
        for a, b in zip(rs, rs[1:]):
            assert a.exec.end <= b.exec.begin, "two execs overlapped on one GPU"
        actions = {100 + i: t + (40 - i) * 100_000 for i in range(40)}
        assert [actions[r.id] for r in rs] == sorted(actions[r.id] for r in rs), "not run in earliest order"


def test_deterministic_with_a_seed():
    def trace(seed):
        h = Harness(seed=seed)
        h.load_model(copies=2)
        h.do(LoadWeights(id=1, model_id=0, gpu=0))
        for i in range(20):
            h.submit(Infer(id=10 + i, model_id=0, gpu=0, batch_size=1 + i % 16))
        h.run()
        return [(r.id, r.status, r.exec.begin, r.exec.duration, r.sent) for r in
                sorted(h.results.values(), key=lambda r: r.id) if hasattr(r, "exec")]
    assert trace(1) == trace(1)
    assert trace(1) != trace(2)


def test_thousand_copies_share_one_model_entry():
    h = Harness(cache="1 GiB")
    h.load_model(copies=1000)
    s = h.w.state()
    assert len(s["models"]) == 1000 and len(h.w.entries) == 1
    assert len({id(m.entry) for m in h.w.models.values()}) == 1
    assert h.do(LoadWeights(id=1, model_id=999, gpu=0)).ok


def test_results_encode_and_decode():
    h = Harness()
    h.load_model()
    h.do(LoadWeights(id=1, model_id=0, gpu=0))
    for r in (h.do(Infer(id=2, model_id=0, gpu=0)), h.do(GetWorkerState(id=3)), h.do(Infer(id=4, model_id=7))):
        assert decode(encode(r)) == r


def test_runs_on_a_real_clock():
    clock = RealClock()
    done = threading.Event()
    results = []

    def on(r):
        results.append(r)
        if len(results) == 4:
            done.set()
    w = EmulatedWorker(clock, 1, "h200", WorkerConfig.load(None, weights_cache_size="256 MiB"), on)
    try:
        w.submit(LoadModelFromDisk(id=1, model_id=0, path="profile:mlp"))
        w.submit(LoadWeights(id=2, model_id=0, gpu=0, earliest=clock.now() + 2 * MS))
        w.submit(Infer(id=3, model_id=0, gpu=0, earliest=clock.now() + 30 * MS))   # input copy at +25 ms
        w.submit(Infer(id=4, model_id=0, gpu=0, earliest=clock.now() + 30 * MS, latest=clock.now() - 1))
        assert done.wait(10)
        by = {r.id: r for r in results}
        assert by[1].ok and by[2].ok and by[3].ok, [r.message for r in results]
        assert by[4].status == Status.COPY_INPUT_TOO_LATE
        assert by[3].exec.begin >= by[3].received + 30 * MS - MS   # real monotonic times, at earliest
    finally:
        w.close()
        clock.close()
    assert w.check_consistency() == []


def test_close_answers_everything_in_flight():
    h = Harness()
    h.load_model()
    h.do(LoadWeights(id=1, model_id=0, gpu=0))
    t = h.clock.now()
    for i in range(5):
        h.submit(Infer(id=10 + i, model_id=0, gpu=0, earliest=t + i * MS))
    h.clock.run_until(t + MS // 2)
    h.w.close()
    assert all(h.results[10 + i].status == Status.SHUTTING_DOWN for i in range(5))
    h.w.submit(Infer(id=20, model_id=0, gpu=0))
    assert h.results[20].status == Status.SHUTTING_DOWN
    h.run()
    assert not h.dupes and h.w.check_consistency() == []


# ------------------------------------------------------------------------------- random action sequences
def actions_strategy(num_models=4, num_gpus=2):
    t = st.integers(0, 40 * MS)
    window = st.tuples(t, st.one_of(st.just(FOREVER), st.integers(0, 20 * MS)))
    model = st.integers(0, num_models)          # num_models = an unknown model
    gpu = st.integers(0, num_gpus)              # num_gpus = an invalid gpu

    def mk(kind, at, win, m, g, b):
        earliest, span = win
        latest = FOREVER if span == FOREVER else earliest + span
        if kind == "load":
            return at, LoadWeights(id=0, model_id=m, gpu=g, earliest=earliest, latest=latest)
        if kind == "evict":
            return at, EvictWeights(id=0, model_id=m, gpu=g, earliest=earliest, latest=latest)
        if kind == "clear":
            return at, ClearCache(id=0)
        if kind == "state":
            return at, GetWorkerState(id=0)
        return at, Infer(id=0, model_id=m, gpu=g, batch_size=b, earliest=earliest, latest=latest)
    one = st.builds(mk, st.sampled_from(["load", "load", "evict", "infer", "infer", "infer", "clear", "state"]),
                    t, window, model, gpu, st.integers(0, 20))
    return st.lists(one, max_size=40)


def run_sequence(h, seq):
    import dataclasses
    submitted = {}
    for i, (at, a) in enumerate(seq):
        a = dataclasses.replace(a, id=i)
        submitted[i] = a
        h.submit(a, at=at)
    h.run()
    return submitted


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seq=actions_strategy(), seed=st.integers(0, 3))
def test_random_sequences_keep_the_invariants(seq, seed):
    h = Harness(num_gpus=2, cache="176 MiB", seed=seed)   # 11 pages: room for one resnet50 and a bert? no
    h.load_model("resnet50", copies=2, model_id=0)
    h.load_model("bert_base", copies=1, model_id=2)       # 27 pages with a 6-page run: never fits
    h.load_model("mlp", copies=1, model_id=3)
    submitted = run_sequence(h, seq)
    assert not h.dupes, "an action was answered twice"
    assert set(submitted) <= set(h.results), "an action was never answered"
    assert h.w.in_flight() == 0
    assert h.w.check_consistency() == []
    lead = h.config.copy_input_lead_in
    for i, a in submitted.items():
        r = h.results[i]
        if isinstance(a, Infer) and r.ok:
            assert a.earliest <= r.exec.begin <= a.latest
            assert r.copy_input.begin >= a.earliest - lead and r.copy_input.begin <= a.latest
        if isinstance(a, LoadWeights) and r.ok:
            assert a.earliest <= r.timing.begin <= a.latest
        if r.status in (Status.LOAD_WEIGHTS_TOO_LATE, Status.EVICT_WEIGHTS_TOO_LATE, Status.COPY_INPUT_TOO_LATE,
                        Status.EXEC_TOO_LATE):
            assert r.sent > a.latest
        assert r.status not in (Status.LOAD_WEIGHTS_TOO_EARLY, Status.EVICT_WEIGHTS_TOO_EARLY,
                                Status.COPY_INPUT_TOO_EARLY, Status.EXEC_TOO_EARLY)
        if isinstance(a, LoadWeights) and a.model_id == 2 and a.gpu < 2:
            assert r.status in (Status.LOAD_WEIGHTS_INSUFFICIENT_CACHE, Status.LOAD_WEIGHTS_TOO_LATE)
    # cache contents agree with the last successful load/evict per (model, gpu), as seen in state()
    state = h.w.state()
    for g in state["gpus"]:
        assert g["used_pages"] == sum(7 if m < 2 else 1 for m in g["models"])


def test_task_telemetry_is_written_when_enabled(tmp_path):
    h = Harness(telemetry=True, log_dir=str(tmp_path))
    h.load_model()
    h.do(LoadWeights(id=1, model_id=0, gpu=0))
    h.do(Infer(id=2, model_id=0, gpu=0))
    h.do(Infer(id=3, model_id=0, gpu=0, latest=0))
    h.w.close()
    import csv
    [f] = list(tmp_path.glob("worker_emulated_*_task_telemetry.csv"))
    rows = list(csv.DictReader(f.open()))
    tasks = [(r["action_id"], r["task"], r["status"]) for r in rows]
    assert ("2", "inputs", "0") in tasks and ("2", "exec", "0") in tasks and ("2", "outputs", "0") in tasks
    assert ("3", "inputs", str(int(Status.COPY_INPUT_TOO_LATE))) in tasks


def test_unknown_profile_and_bad_profile_file(tmp_path):
    from workbench.worker.profile import ProfileError
    with pytest.raises(ProfileError, match="known profiles"):
        Profile.load("no_such_profile")
    bad = tmp_path / "p.json"
    bad.write_text('{"format": 1, "device": "x", "models": {}}')
    with pytest.raises(ProfileError, match="missing field"):
        Profile.load(bad)


def test_profile_roundtrip_and_exec_draws():
    import json
    import random
    from workbench.worker.profile import ExecDist
    p2 = Profile.from_json(json.loads(json.dumps(PROFILE.to_json())))
    assert p2.models["bert_base"].runs == PROFILE.models["bert_base"].runs
    d = ExecDist.fit([100] * 98 + [150, 200], keep_samples=False)
    assert d.p50_ns == 100 and d.sigma > 0
    rng = random.Random(0)
    draws = sorted(PROFILE.models["resnet50"].exec[1].draw(rng) for _ in range(2000))
    p50 = PROFILE.models["resnet50"].exec[1].p50_ns
    assert abs(draws[1000] / p50 - 1) < 0.002 and draws[1980] / p50 < 1.01
