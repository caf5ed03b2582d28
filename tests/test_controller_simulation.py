"""simulate(): a controller, emulated workers and a workload on a VirtualClock; deterministic and fast."""
import pytest

from workbench.cli import main as cli
from workbench.controller import simulate
from workbench.workload import AzureReplay, AzureTrace, ClosedLoop, Poisson

MS = 1_000_000


def test_same_seed_identical_outcomes_different_seed_differs():
    from workbench.telemetry.recorder import Recorder

    def run(seed):
        rec = Recorder()
        res = simulate({"resnet50": 30, "mobilenet_v2": 10}, num_gpus=2, workers=2, duration_s=2, seed=seed,
                       workload=lambda ids: Poisson(ids, rate=700, slo_ms=50, seed=seed), recorder=rec)
        return res, rec.requests(), rec.actions()
    a, ra, aa = run(1)
    b, rb, ab = run(1)
    c, rc, _ = run(2)
    assert a.statuses == b.statuses and ra.equals(rb) and aa.equals(ab)
    assert not ra.equals(rc)
    assert a.submitted == ra.height > 1000 and a.statuses["success"] > 0.95 * a.submitted
    assert a.speed > 1 and a.events > a.submitted


def test_arrivals_iterable_and_slo_per_request():
    arrivals = [(i * 2 * MS, i % 3, (20 if i % 2 else 200) * MS) for i in range(300)]
    res = simulate({"resnet50": 3}, arrivals=arrivals, duration_s=1)
    assert res.submitted == 300 and sum(res.statuses.values()) == 300
    assert res.statuses["rejected"] == 0
    with pytest.raises(ValueError, match="time order"):
        simulate({"resnet50": 1}, arrivals=[(5 * MS, 0), (1 * MS, 0)], duration_s=1)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="exactly one"):
        simulate({"resnet50": 1}, duration_s=1)
    with pytest.raises(ValueError, match="copies"):
        simulate({"resnet50": 0}, arrivals=[], duration_s=1)
    with pytest.raises(ValueError, match="duration_s"):
        simulate({"resnet50": 1}, arrivals=[], duration_s=0)


def test_azure_replay_and_closed_loop_workloads():
    trace = AzureTrace.open("data/azure")
    res = simulate({"resnet50": 150, "resnet18": 50}, num_gpus=1, workers=2, duration_s=60, seed=3,
                   workload=lambda ids: AzureReplay(trace, ids, scale=2.0, slo_ms=100, seed=3, minutes=1))
    assert res.submitted > 2000 and res.slo_attainment > 0.9
    assert res.workload["submitted"] == res.submitted
    res = simulate({"resnet50": 4}, duration_s=2, workload=lambda ids: ClosedLoop(ids, concurrency=4, slo_ms=100))
    assert res.statuses["success"] > 500


def test_cli_simulate(capsys):
    assert cli(["simulate", "--models", "resnet50:4", "--rate", "100", "--seconds", "2"]) == 0
    out = capsys.readouterr().out
    assert "clockwork:" in out and "goodput" in out
    assert cli(["simulate", "--models", "resnet50:x"]) == 2
    assert "NAME[:COPIES]" in capsys.readouterr().err
    for flag, bad in (("--rate", "inf"), ("--seconds", "nan"), ("--slo-ms", "0")):   # inf: "Probabilities contain NaN"
        assert cli(["simulate", flag, bad]) == 2
        assert f"{flag} must be a finite number > 0, got {float(bad)}" in capsys.readouterr().err


def test_telemetry_rows_follow_the_recorder_schema():
    """The controller writes rows positionally (Recorder.add_*_row): its column order must be the schema's."""
    import polars as pl
    from workbench.controller.controller import _ACTION_FIELDS, _REQUEST_FIELDS
    from workbench.telemetry.recorder import ACTION_FIELDS, REQUEST_FIELDS, Recorder
    assert _REQUEST_FIELDS == REQUEST_FIELDS and _ACTION_FIELDS == ACTION_FIELDS
    rec = Recorder()
    simulate({"resnet50": 4}, duration_s=0.5, recorder=rec, workload=lambda ids: Poisson(ids, rate=400, slo_ms=50))
    acts = rec.actions()
    inf = acts.filter(pl.col("type") == "INFER")
    assert (inf["gpu_clock_before"] > 0).all() and (inf["copies_loaded"] >= 1).all()
    assert (inf["requests_queued"] >= 0).all()
    reqs = rec.requests()
    assert reqs.height > 100 and set(reqs["status"]) <= {"success", "dropped"}
    assert (reqs.filter(pl.col("status") == "success")["latency"] > 0).all()
