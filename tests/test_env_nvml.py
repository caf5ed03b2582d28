"""The NVML layer's error handling, run for real where there is no GPU, and its pure helpers.

On a machine with a GPU the "no driver" tests skip (tests/test_env_gpu.py covers that machine)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pynvml
import pytest

from workbench.env import nvml
from workbench.env.report import CheckReport

ROOT = Path(__file__).resolve().parents[1]


def _nvml_state() -> str | None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return type(e).__name__
    pynvml.nvmlShutdown()
    return None


no_nvml = pytest.mark.skipif(_nvml_state() is None, reason="NVML works here: the GPU tests cover this machine")


@no_nvml
def test_no_nvml_library_is_unavailable_with_the_reason_not_a_crash():
    checks = nvml.gpu_checks(devices=False)
    assert len(checks) == 1
    c = checks[0]
    assert (c.name, c.status, c.group) == ("nvml", "unavailable", "driver")
    assert _nvml_state() in c.found            # e.g. NVMLError_LibraryNotFound
    if _nvml_state() == "NVMLError_LibraryNotFound":
        assert "no NVIDIA driver" in c.found
    assert CheckReport(checks).exit_code == 0


@no_nvml
def test_device_checks_without_gpu_are_unavailable():
    checks = nvml.gpu_checks(devices=True)
    dev = next(c for c in checks if c.name == "TVM and cupy devices")
    assert dev.status == "unavailable" and dev.found
    assert "CUDA to NVML index" not in {c.name for c in checks}
    assert nvml.nvml_devices()[0] is None and nvml.nvml_index_for_cuda(0) is None


@no_nvml
def test_q_turns_a_real_nvml_error_into_unavailable():
    # NVML is not initialised (and has no library here): the binding raises a real NVMLError
    with pytest.raises(nvml.Unavailable, match="NVMLError"):
        nvml.q(pynvml.nvmlDeviceGetCount)
    assert nvml.qv(pynvml.nvmlDeviceGetCount, default="n/a") == "n/a"


def test_error_reasons_name_the_cause():
    e = pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)   # the binding maps codes to subclasses
    assert type(e).__name__ == "NVMLError_NotSupported"
    assert nvml.error_reason(e).startswith("not supported on this GPU")
    assert "no permission" in nvml.error_reason(pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION))
    assert nvml.error_reason(OSError("boom")) == "OSError: boom"


def test_missing_binding_is_unavailable_with_the_install_command():
    code = ("import sys, json; sys.modules['pynvml'] = None\n"
            "from workbench.env import nvml\n"
            "print(json.dumps([c.to_dict() for c in nvml.gpu_checks(devices=False)]))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    (c,) = json.loads(p.stdout)
    assert c["status"] == "unavailable" and "not installed" in c["found"] and c["fix"] == "pip install nvidia-ml-py"


def test_device_comparison_logic():
    h200 = {"index": 0, "name": "NVIDIA H200", "bus_id": "0000:18:00.0"}
    h200b = {"index": 1, "name": "NVIDIA H200", "bus_id": "0000:2a:00.0"}
    same = nvml.device_checks([h200, h200b], ([h200, h200b], ""), ([{"index": 0, "name": "NVIDIA H200"},
                                                                    {"index": 1, "name": "NVIDIA H200"}], ""))
    assert [c.status for c in same] == ["pass", "pass"]
    assert same[1].data["cuda_to_nvml"] == {0: 0, 1: 1}
    # cupy sees both, TVM one: a failure
    differ = nvml.device_checks(None, ([h200, h200b], ""), ([{"index": 0, "name": "NVIDIA H200"}], ""))
    assert differ[0].status == "fail" and "TVM sees 1" in differ[0].found
    # CUDA numbers the GPUs in another order than NVML: warn, with the fix
    swapped = nvml.device_checks([h200, h200b], ([{**h200b, "index": 0}, {**h200, "index": 1}], ""),
                                 ([{"index": 0, "name": "NVIDIA H200"}, {"index": 1, "name": "NVIDIA H200"}], ""))
    assert swapped[1].status == "warn" and swapped[1].data["cuda_to_nvml"] == {0: 1, 1: 0}
    assert swapped[1].fix == "export CUDA_DEVICE_ORDER=PCI_BUS_ID"
    missing = nvml.device_checks(None, (None, "cupy not importable"), ([], "TVM sees no CUDA devices"))
    assert missing[0].status == "unavailable" and "cupy not importable" in missing[0].found


def test_tvm_devices_runs_for_real():
    devs, reason = nvml.tvm_devices()
    assert devs is not None                    # TVM is installed in this environment
    if not devs:
        assert "no CUDA devices" in reason


def test_helpers():
    assert nvml.pcie_peak_gbps(5, 16) == pytest.approx(63.0, abs=0.1)
    assert nvml.pcie_peak_gbps(4, 16) == pytest.approx(31.5, abs=0.1)
    assert nvml.pcie_peak_gbps(3, 8) == pytest.approx(7.88, abs=0.01)
    assert nvml.pcie_peak_gbps(0, 16) is None
    assert nvml.reason_names(0) == []
    assert nvml.reason_names(0x1 | 0x4 | 0x40) == ["GpuIdle", "SwPowerCap", "HwThermalSlowdown"]
    assert nvml.reason_names(0x1000) == ["0x1000"]
    assert nvml.cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert nvml.cpu_list(set()) == ""
    assert nvml.cpu_list(os.sched_getaffinity(0))
