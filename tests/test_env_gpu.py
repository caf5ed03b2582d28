"""The checker and the floors on a real GPU (run on the H200: `pytest -m gpu tests/test_env_gpu.py`).

Values are compared with NVML read directly here; on an H200 they are also held to reference/h200-baseline.md
(persistence on, auto boost not supported, application clocks 1980/3201 = max, PCIe gen5 x16, CUDA >= 13)."""
import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_report():
    from workbench.env import nvml
    from workbench.env.report import CheckReport
    return CheckReport(nvml.gpu_checks(devices=True))


@pytest.fixture(scope="module")
def floors():
    from workbench.env import floors as F
    return F.measure(reps=10, devices=[0])


def _nvml():
    import pynvml as N
    N.nvmlInit()
    return N


def test_nvml_checks_report_the_values_nvml_gives(gpu_report):
    N = _nvml()
    try:
        assert gpu_report.get("driver").data["count"] == N.nvmlDeviceGetCount()
        h = N.nvmlDeviceGetHandleByIndex(0)
        g = lambda name: gpu_report.get(name, "gpu0")   # noqa: E731
        assert g("persistence mode").data["persistence_mode"] == N.nvmlDeviceGetPersistenceMode(h)
        assert g("compute mode").data["compute_mode"] == N.nvmlDeviceGetComputeMode(h)
        sm = g("SM clock").data
        assert sm["max_mhz"] == N.nvmlDeviceGetMaxClockInfo(h, N.NVML_CLOCK_SM)
        assert sm["app_target_mhz"] == N.nvmlDeviceGetClock(h, N.NVML_CLOCK_SM, N.NVML_CLOCK_ID_APP_CLOCK_TARGET)
        assert 0 < sm["current_mhz"] <= sm["max_mhz"]
        pcie = g("PCIe link").data
        assert (pcie["max_gen"], pcie["max_width"]) == (N.nvmlDeviceGetMaxPcieLinkGeneration(h),
                                                        N.nvmlDeviceGetMaxPcieLinkWidth(h))
        assert g("ECC").data["current"] == N.nvmlDeviceGetEccMode(h)[0]
        assert g("GPU").data["name"] == N.nvmlDeviceGetName(h)
    finally:
        N.nvmlShutdown()
    for c in gpu_report:
        # 'clocks locked' cannot tell while the GPU is busy; process lists may be hidden in containers
        if c.group == "gpu0" and c.name not in ("clocks locked", "other processes"):
            assert c.status in ("pass", "warn", "fail"), c   # a real answer, not 'unavailable'
    assert gpu_report.exit_code == (1 if gpu_report.failed() else 0)


def test_h200_matches_the_baseline(gpu_report):
    gpu = gpu_report.get("GPU", "gpu0")
    # the GPU suite runs on the H200 (reference/h200-baseline.md): another GPU here is a wrong machine, not a skip
    assert "H200" in gpu.data["name"], f"the GPU suite must run on the H200, this is a {gpu.data['name']}"
    g = lambda name: gpu_report.get(name, "gpu0")   # noqa: E731
    assert g("persistence mode").status == "pass"
    boost = g("auto boost")
    assert boost.status == "pass" and boost.data["supported"] is False and "not supported" in boost.found
    assert g("SM clock").data["max_mhz"] == g("SM clock").data["app_target_mhz"] == 1980
    assert g("MEM clock").data["max_mhz"] == 3201
    assert g("compute mode").data["compute_mode"] == 0
    assert (g("PCIe link").data["max_gen"], g("PCIe link").data["max_width"]) == (5, 16)
    assert g("PCIe link").data["peak_gbps"] == pytest.approx(63.0, abs=0.1)
    assert gpu.data["compute_capability"] == [9, 0]
    assert gpu_report.get("driver").data["cuda_driver_version"] >= 13000


def test_tvm_and_cupy_see_the_same_devices(gpu_report):
    import cupy
    dev = gpu_report.get("TVM and cupy devices")
    assert dev.status == "pass", dev
    assert len(dev.data["cupy"]) == cupy.cuda.runtime.getDeviceCount() == len(dev.data["tvm"])
    mapping = gpu_report.get("CUDA to NVML index").data["cuda_to_nvml"]
    assert set(mapping) == set(range(len(dev.data["cupy"]))) and None not in mapping.values()


def test_floors_on_the_gpu_are_sane(floors):
    """Relations and positivity only: how fast the H200 is belongs to bench/ (bench.floors), not to a test."""
    g = floors.gpu(0)
    assert g.errors == {}, g.errors
    assert {(t.direction, t.memory, t.label) for t in g.transfers} >= {
        (d, m, label) for d in ("h2d", "d2h") for m in ("pinned", "pageable") for label in ("model",)}
    for t in g.transfers:
        assert t.device == "cuda:0" and t.timer == "cuda events" and t.reps >= 3, t
        assert 0 < t.min_ns <= t.p50_ns <= t.max_ns and math.isfinite(t.max_ns), t     # the events resolved
        assert t.gbps == pytest.approx(t.nbytes / t.p50_ns) and t.gbps > 0
    h2d_pin, h2d_page = g.transfer("h2d", "pinned", "model"), g.transfer("h2d", "pageable", "model")
    assert h2d_pin.gbps > h2d_page.gbps                            # pinned beats the driver's bounce buffer
    assert g.transfer("d2h", "pinned", "model").gbps > g.transfer("d2h", "pageable", "model").gbps
    assert g.transfer("h2d", "pinned", "model").nbytes > g.transfer("h2d", "pinned", "page").nbytes
    for v in (g.launch_sync_us, g.launch_gpu_us, g.launch_host_us, g.event_resolution_us):
        assert 0 < v and math.isfinite(v), (g.launch_sync_us, g.launch_gpu_us, g.launch_host_us,
                                            g.event_resolution_us)
    assert g.launch_gpu_us < g.launch_sync_us                       # a launch+sync includes the kernel itself
    c = g.clock
    assert c["max_sm_mhz"] >= c["load_sm_mhz"] > 0
    assert c["load_samples"] >= 10
    assert c["load_pcie_gen"] and c["load_pcie_width"]
    # the floor model passes through the measured points
    assert floors.transfer_floor_ns(floors.model_bytes) == pytest.approx(h2d_pin.p50_ns, rel=0.02)
    assert floors.load_ratio(2 * h2d_pin.p50_ns, floors.model_bytes) == pytest.approx(2, rel=0.02)
    assert floors.launch_floor_ns(0) == pytest.approx(g.launch_sync_us * 1e3)
    checks = {c.name: c for c in floors.checks()}
    assert checks["cuda:0 pinned vs pageable"].status == "pass"
    assert checks["cuda:0 H2D pinned"].status in ("pass", "warn")
    json.dumps(floors.to_dict())


def test_pinned_memory_is_not_bound_by_memlock():
    """The memlock check warns (not fails) because cudaHostAlloc is not charged to RLIMIT_MEMLOCK: verify it."""
    code = ("import resource, numpy as np, cupy as cp\n"
            "n = 256 << 20\n"
            "host = np.frombuffer(cp.cuda.alloc_pinned_memory(n), np.uint8, n); host[:] = 7\n"
            "d = cp.empty(n, cp.uint8); d.set(host); cp.cuda.Device().synchronize()\n"
            "print(resource.getrlimit(resource.RLIMIT_MEMLOCK)[0], int(d[-1]))")

    def low():
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 << 10, 64 << 10))

    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       preexec_fn=low)
    assert p.returncode == 0, f"pinning 256 MiB under a 64 KiB memlock limit failed: RLIMIT_MEMLOCK must then be " \
                              f"a 'fail' check.\n{p.stderr[-2000:]}"
    assert p.stdout.split() == [str(64 << 10), "7"]


def test_check_cli_with_floors_on_the_gpu(tmp_path):
    env = {**os.environ, "CUDA_CACHE_DISABLE": "1"}
    p = subprocess.run([sys.executable, "-m", "workbench", "check", "--json", "--floors", "--model-mb", "50"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    d = json.loads(p.stdout)
    assert p.returncode == d["exit_code"] == (1 if any(c["status"] == "fail" for c in d["checks"]) else 0)
    groups = {c["group"] for c in d["checks"]}
    assert {"os", "cuda-env", "driver", "gpu0", "devices", "floors"} <= groups
    assert d["floors"]["gpus"][0]["transfers"][-1]["nbytes"] == 50_000_000
