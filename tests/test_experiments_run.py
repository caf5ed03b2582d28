"""`workbench run EXPERIMENT.toml --out DIR` end to end, as a subprocess: the real controller and emulated
workers in virtual time; the outputs exist and agree with each other; an interrupted run keeps its data."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from workbench.telemetry import read_telemetry

REPO = Path(__file__).resolve().parents[1]

SMALL = """\
name = "e2e"
description = "end-to-end test"
seed = 5
duration_s = 2
warmup_s = 0.5

[[models]]
name = "resnet50"
copies = 3

[workload]
kind = "closed_loop"
concurrency = 4
slo_ms = 50

[sweep]
"policy.name" = ["clockwork", "triton"]

[report]
bucket_s = 0.5
clockwork_tsv = true
"""

AZURE = """\
name = "e2e-azure"
duration_s = 3
[device]
workers = 2
[[models]]
name = "resnet18"
copies = 40
[[models]]
name = "mobilenet_v2"
copies = 40
[workload]
kind = "azure"
trace = "data/azure"
interval_s = 1.0
start_minute = 700
slo_ms = 100
spread = "even"
"""


def workbench(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "workbench", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, **kw)


@pytest.mark.slow
def test_run_writes_consistent_results(tmp_path):
    exp = tmp_path / "e2e.toml"
    exp.write_text(SMALL)
    out = tmp_path / "out"
    p = workbench("run", str(exp), "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "slo_ms" not in p.stdout and "policy=clockwork:" in p.stdout
    assert (out / "config.toml").read_text() == SMALL           # the exact configuration
    env = json.loads((out / "environment.json").read_text())
    assert env["packages"]["polars"] and env["device"]["kind"] == "emulated"
    assert env["emulation_profile"]["device"].startswith("NVIDIA H200")
    assert "checks" in env and env["checks_summary"]
    assert env["clocks"]["switch_interval_s"] == pytest.approx(0.005)   # virtual time: the interpreter's own
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is False and summary["runs_done"] == 2
    labels = [r["label"] for r in summary["runs"]]
    assert labels == ["policy=clockwork", "policy=triton"]
    for r in summary["runs"]:
        d = out / "runs" / r["label"]
        req, act = read_telemetry(d)
        # every request the workload sent is one row, and the summary counts what the files hold
        assert req.height == r["workload"]["submitted"] == r["recorded_requests"] > 100
        assert act.height == r["recorded_actions"] > 0
        s = r["summary"]
        window = req.filter((pl.col("arrival") >= r["t0_ns"] + 500_000_000)
                            & (pl.col("arrival") < r["t0_ns"] + 2_000_000_000))
        assert s["requests"] == window.height
        met = window.filter((pl.col("status") == "success") & (pl.col("completion") <= pl.col("deadline"))).height
        assert s["slo_met"] == met and s["slo_attainment"] == pytest.approx(met / window.height)
        assert sum(s["by_status"].values()) == s["requests"]
        assert (act["type"] == "INFER").sum() == s["actions"]["INFER"]["count"]
        ts = pl.read_parquet(d / "timeseries.parquet")
        assert ts["completed"].sum() == req.filter(pl.col("completion") > 0).height
        assert (d / "clockwork_request_log.tsv").read_text().count("\n") == req.height + 1
        assert pl.read_parquet(d / "prediction_errors.parquet").columns == ["type", "metric", "error_ms", "cdf"]
        assert (d / "cache.parquet").is_file()
    html = (out / "report.html").read_text()
    assert "policy=triton" in html and "vegaEmbed" in html and html.count("<div class='chart'") >= 5
    assert "https://" not in html.split("<script>")[0]          # no external resources before the bundle


@pytest.mark.slow
def test_azure_replay_over_shipped_trace(tmp_path):
    exp = tmp_path / "azure.toml"
    exp.write_text(AZURE)
    p = workbench("run", str(exp), "--out", str(tmp_path / "o"), "--quiet", "--no-report")
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((tmp_path / "o" / "summary.json").read_text())["runs"][0]
    req, act = read_telemetry(tmp_path / "o" / "runs" / "run")
    assert req.height == s["workload"]["submitted"] > 100
    assert set(req["model"].unique()) <= {"resnet18", "mobilenet_v2"}
    assert s["summary"]["cold_starts"] > 0 and (act["type"] == "LOAD_WEIGHTS").sum() > 0
    assert not (tmp_path / "o" / "report.html").exists()


def test_check_only_and_bad_file_exit_codes(tmp_path):
    exp = tmp_path / "e.toml"
    exp.write_text(SMALL)
    p = workbench("run", str(exp), "--check")
    assert p.returncode == 0 and "ok (2 runs: policy=clockwork, policy=triton)" in p.stdout
    exp.write_text(SMALL.replace("slo_ms = 50", "slo_ms = 0"))
    p = workbench("run", str(exp), "--out", str(tmp_path / "never"))
    assert p.returncode == 2
    assert "workbench run: error:" in p.stderr and "e.toml, line 14: workload.slo_ms: must be > 0" in p.stderr
    assert not (tmp_path / "never").exists()                    # rejected before anything ran


@pytest.mark.slow
def test_interrupted_run_keeps_what_it_recorded(tmp_path):
    exp = tmp_path / "long.toml"
    exp.write_text(SMALL.replace("duration_s = 2", "duration_s = 100000").replace(
        '[sweep]\n"policy.name" = ["clockwork", "triton"]\n', ""))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "run", str(exp), "--out", str(out)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        run_dir = out / "runs" / "run"
        while time.monotonic() < deadline:   # the first timed flush of the telemetry has happened
            if list(run_dir.glob("requests.part-*.parquet")):
                break
            time.sleep(0.2)
        else:
            pytest.fail("no telemetry part file appeared")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True
    r = summary["runs"][0]
    assert r["interrupted"] is True and "Interrupted" in r["error"]
    req, act = read_telemetry(run_dir)
    assert req.height == r["recorded_requests"] > 0 and act.height > 0
    assert (run_dir / "requests.parquet").is_file() and not list(run_dir.glob("*.part-*"))
    # nothing sent went unrecorded, except possibly the one request being submitted when the signal came
    assert r["workload"]["submitted"] - 1 <= req.height <= r["workload"]["submitted"]
    assert (out / "report.html").is_file()


CPU = """\
name = "e2e-cpu"
description = "real TVM-compiled mlp on the CPU worker, real time"
clock = "real"
duration_s = 2
warmup_s = 0.2
drain_s = 2

[device]
kind = "cpu"
gpus = 1

[worker]
weights_cache_size = "48 MiB"
io_pool_size = "8 MiB"
workspace_pool_size = "8 MiB"
host_io_pool_size = "8 MiB"

[[models]]
name = "mlp"
copies = 2
artifact = "ARTIFACT"

[workload]
kind = "poisson"
rate = 100
slo_ms = 100
"""


@pytest.mark.slow
def test_real_time_run_on_the_cpu_worker_with_a_compiled_model(tmp_path):
    from workbench.models import zoo
    from workbench.models.compiler import compile_model

    art = tmp_path / "mlp_cpu"
    compile_model(zoo.get("mlp"), art, target="cpu")
    exp = tmp_path / "cpu.toml"
    exp.write_text(CPU.replace("ARTIFACT", str(art)))
    p = workbench("run", str(exp), "--out", str(tmp_path / "o"), "--quiet", "--no-report")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((tmp_path / "o" / "summary.json").read_text())["runs"][0]
    req, act = read_telemetry(tmp_path / "o" / "runs" / "run")
    assert r["clock"] == "real" and r["simulated_s"] is None
    assert req.height == r["workload"]["submitted"] and 120 < req.height < 300     # Poisson 100 r/s for 2 s
    # how many meet the SLO depends on the machine's load (real time): only that some ran and all ended
    assert r["summary"]["by_status"].get("success", 0) > 0
    assert set(req["status"].unique()) <= {"success", "dropped", "timeout", "error", "rejected"}
    infer = act.filter((pl.col("type") == "INFER") & (pl.col("status") == 0))
    assert infer.height > 0 and (infer["measured_duration"] > 0).all()
    # the artifact had no measurements: it was profiled first, so even the first exec had a prediction
    assert (art / "measurements.json").is_file() and (infer["predicted_duration"] > 0).all()
    # the controller decided in this process with the switch interval lowered, and the record says so
    env = json.loads((tmp_path / "o" / "environment.json").read_text())
    assert env["clocks"]["switch_interval_s"] == pytest.approx(0.0005)


def test_report_can_be_rebuilt_from_the_files(tmp_path):
    exp = tmp_path / "e.toml"
    exp.write_text(SMALL.replace("duration_s = 2", "duration_s = 1").replace(
        '[sweep]\n"policy.name" = ["clockwork", "triton"]\n', ""))
    out = tmp_path / "o"
    assert workbench("run", str(exp), "--out", str(out), "-q", "--no-report").returncode == 0
    assert not (out / "report.html").exists()
    p = workbench("report", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    html = (out / "report.html").read_text()
    assert "e2e" in html and 'duration_s = 1' in html and "vegaEmbed('#c0'" in html
    p = workbench("report", str(tmp_path / "nothing"))
    assert p.returncode == 2 and "no summary.json" in p.stderr


def test_progress_bar_ends_at_its_total_without_a_warning(capsys):
    """200 virtual-time steps of a 1 s run: the bar is set to each position, not advanced by float steps whose
    sum overshot the total (tqdm then printed a TqdmWarning, "clamping frac", in the middle of the line)."""
    import warnings

    from workbench.experiments.runner import _Progress
    bar = _Progress(1.0, "t", enabled=True)
    step, t = 1.0 / 200, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        while t < 1.0:
            t = min(t + step, 1.0)
            bar.update_to(t, req=1)
        bar.update_to(1.0)
        assert bar._bar.n == 1.0 and bar.done == 1.0
        bar.close()
    assert "100%" in capsys.readouterr().err
