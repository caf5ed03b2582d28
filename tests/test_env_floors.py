"""CPU floors measured for real (small sizes), the GPU part's absence reported, ratios, renderings, the CLI."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from workbench.env import floors as F
from workbench.env.checks import check

from no_gpu import run_without_gpu

ROOT = Path(__file__).resolve().parents[1]
PAGE, MODEL = 1 << 20, 6 << 20


@pytest.fixture(scope="module")
def measured():
    return F.measure(page_bytes=PAGE, model_bytes=MODEL, reps=4)


def test_cpu_floors_are_measured(measured):
    cpu = measured.cpu
    page, model = cpu.transfer("page"), cpu.transfer("model")
    assert (page.nbytes, model.nbytes) == (PAGE, MODEL)
    for t in (page, model):
        assert t.direction == "memcpy" and t.device == "cpu" and t.reps >= 3
        assert 0 < t.min_ns <= t.p50_ns <= t.max_ns
        assert t.gbps == pytest.approx(t.nbytes / t.p50_ns)
    for name in ("perf_counter", "monotonic"):
        tr = cpu.timer[name]
        assert 0 < tr["min_step_ns"] < 1e6 and tr["read_ns"] > 0 and 0 <= tr["zero_fraction"] < 1
    assert cpu.thread_wakeup_us > 0
    assert F.last() is measured


def test_gpu_part_names_why_it_is_missing():
    # a child that sees no CUDA device, so this runs on the H200 too (tests/test_env_gpu.py covers the GPU part)
    out = run_without_gpu(f"""
        import pytest
        from workbench.env import floors as F
        n, reason = F.cuda_device_count()
        assert n == 0 and reason, (n, reason)
        m = F.measure(page_bytes={PAGE}, model_bytes={MODEL}, reps=3)
        assert m.gpus == [] and m.gpu_reason == reason, (m.gpus, m.gpu_reason)
        with pytest.raises(KeyError, match="no GPU floors for cuda:0"):
            m.transfer_floor_ns({PAGE}, device=0)
        (c,) = [c for c in m.checks() if c.name == "GPU floors"]
        assert c.status == "unavailable" and c.found == reason, c
        print("reason:", reason)
    """)
    assert out.startswith("reason: ") and len(out.strip()) > len("reason:")


def test_transfer_floor_fits_the_two_points():
    t = lambda label, n, ns: F.Transfer("cuda:0", "h2d", "pinned", label, n, ns, ns, ns, 3, "cuda events")  # noqa
    g = F.GpuFloors(0, "test", [t("page", 1000, 110.0), t("model", 10000, 1010.0)])
    f = F.Floors(1000, 10000, None, [g])
    assert f.transfer_floor_ns(1000) == pytest.approx(110.0)
    assert f.transfer_floor_ns(10000) == pytest.approx(1010.0)
    assert f.transfer_floor_ns(5000) == pytest.approx(510.0)      # 10 ns fixed + 0.1 ns/byte
    assert f.load_ratio(1020.0, 10000) == pytest.approx(1020 / 1010)
    # noisy points (the small copy relatively slower than the fit allows) fall back to the big copy's bandwidth
    g.transfers[0] = t("page", 1000, 50.0)
    assert f.transfer_floor_ns(10000) == pytest.approx(1010.0)
    with pytest.raises(KeyError, match="no d2h pinned"):
        f.transfer_floor_ns(10, direction="d2h")


def test_cpu_transfer_floor_and_ratio(measured):
    fl = measured.transfer_floor_ns(MODEL, device="cpu")
    assert fl > 0
    assert measured.transfer_floor_ns(2 * MODEL, device="cpu") > fl
    assert F.ratio(2 * fl, fl) == pytest.approx(2.0)
    arr = F.ratio(np.array([fl, 3 * fl]), fl)
    assert arr.tolist() == pytest.approx([1.0, 3.0])
    s = F.ratio(pl.Series([fl, 2 * fl]), fl)
    assert s.to_list() == pytest.approx([1.0, 2.0])
    df = pl.DataFrame({"measured_duration": [fl, 4 * fl]}).with_columns(
        r=F.ratio(pl.col("measured_duration"), fl))
    assert df["r"].to_list() == pytest.approx([1.0, 4.0])
    for bad in (0, -1.0, None, float("nan"), "3"):
        with pytest.raises(ValueError, match="floor must be a positive number"):
            F.ratio(1.0, bad)


def test_renderings(measured):
    d = json.loads(json.dumps(measured.to_dict()))
    assert d["page_bytes"] == PAGE and d["cpu"]["transfers"][0]["gbps"] > 0
    df = measured.to_frame()
    assert df.columns == ["device", "measure", "value", "unit"] and df.height == len(measured.rows())
    assert "memcpy_model GB/s" in df["measure"].to_list()
    assert all(math.isfinite(v) for v in df["value"])
    assert "memcpy model (6 MiB)" in measured.to_text()
    assert measured.to_markdown().startswith("## Physical floors")
    assert "<table>" in measured._repr_html_()


def test_floors_go_into_the_check_report(measured):
    r = check(floors=measured, gpu=False)
    assert r.floors is measured
    assert {c.name for c in r if c.group == "floors"} >= {"cpu memcpy", "timer resolution"}
    d = json.loads(r.to_json())
    assert d["floors"]["cpu"]["transfers"][1]["nbytes"] == MODEL
    assert "Physical floors" in r.to_text() and "Physical floors" in r._repr_html_()
    # without an explicit argument the floors measured last in this process are included
    assert check(gpu=False).floors is F.last()


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="must be positive"):
        F.measure(page_bytes=0)


def test_probe_kernels_compile_to_a_cubin_without_a_gpu():
    cubin = F.compile_cubin(F.KERNELS_SRC, "sm_90")
    assert cubin.startswith(b"\x7fELF") and b"wb_busy" in cubin and b"wb_empty" in cubin
    with pytest.raises(RuntimeError, match="NVRTC compile for sm_90 failed"):
        F.compile_cubin("this is not CUDA", "sm_90")


def test_cli_floors_json_out(tmp_path):
    out = tmp_path / "f" / "floors.json"
    p = subprocess.run([sys.executable, "-m", "workbench", "floors", "--no-gpu", "--page-mib", "1", "--model-mb", "3",
                        "--reps", "3", "--json", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    d = json.loads(out.read_text())
    assert json.loads(p.stdout) == d
    assert d["gpus"] == [] and d["gpu_reason"] == "not requested"
    assert [t["nbytes"] for t in d["cpu"]["transfers"]] == [1 << 20, 3_000_000]
    bad = subprocess.run([sys.executable, "-m", "workbench", "floors", "--no-gpu", "--reps", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "must be positive" in bad.stderr
