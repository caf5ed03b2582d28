"""The kernel launcher, for real: a Jupyter kernel started from the installed kernel spec with a low soft
RLIMIT_NOFILE and CUDA_FORCE_PTX_JIT set must come up with soft = hard, the CUDA variables fixed, and a launch
report that `workbench.check()` shows; a limit it cannot raise is reported, not silently ignored."""
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import ipykernel  # noqa: F401 - the kernel the launcher starts
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from workbench.env.commands import KERNEL_NAME, install_kernel
from workbench.env.launcher import REPORT_VAR

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, os, resource
from workbench.env import checks
print(json.dumps({"nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
                  "memlock": resource.getrlimit(resource.RLIMIT_MEMLOCK),
                  "env": {k: os.environ.get(k) for k in ("CUDA_CACHE_DISABLE", "CUDA_FORCE_PTX_JIT")},
                  "report": json.loads(os.environ.get("WORKBENCH_LAUNCH_REPORT", "null")),
                  "checks": [c.to_dict() for c in checks.os_checks()],
                  "pid": os.getpid(), "uid": os.getuid()}))
"""


def _run_in_kernel(tmp_path, preexec_fn, env, code=PROBE) -> tuple[dict, str]:
    """Install the kernel spec under tmp_path, start it, run ``code``, return (its JSON output, kernel stderr)."""
    prefix = tmp_path / "prefix"
    install_kernel(prefix=str(prefix))
    ksm = KernelSpecManager(kernel_dirs=[str(prefix / "share" / "jupyter" / "kernels")])
    spec = ksm.get_kernel_spec(KERNEL_NAME)
    assert spec.argv[:3] == [sys.executable, "-m", "workbench.env.launcher"]
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
    km.connection_file = str(tmp_path / "kernel.json")
    err = open(tmp_path / "kernel.stderr", "w+")
    km.start_kernel(env=env, preexec_fn=preexec_fn, stderr=err, cwd=str(ROOT))
    kc = km.client()
    try:
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        out = []
        reply = kc.execute_interactive(code, timeout=60, output_hook=lambda m: out.append(m))
        assert reply["content"]["status"] == "ok", reply["content"]
        text = "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
        return json.loads(text), (tmp_path / "kernel.stderr").read_text()
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        err.close()


def _env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (REPORT_VAR, "CUDA_CACHE_DISABLE")}
    env.update(HOME=str(tmp_path / "home"), IPYTHONDIR=str(tmp_path / "ipython"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), PYTHONPATH=str(ROOT), **extra)
    return env


def test_kernel_starts_with_soft_nofile_raised_and_cuda_env_fixed(tmp_path):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def lower():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    got, stderr = _run_in_kernel(tmp_path, lower, _env(tmp_path, CUDA_FORCE_PTX_JIT="1"))
    soft_k, hard_k = got["nofile"]
    assert soft_k == hard_k >= hard                     # the launcher raised 256 to the hard limit (or beyond)
    assert got["env"] == {"CUDA_CACHE_DISABLE": "1", "CUDA_FORCE_PTX_JIT": None}
    rep = {r["setting"]: r for r in got["report"]}
    assert rep["RLIMIT_NOFILE"]["value"].startswith("256/")
    assert rep["RLIMIT_NOFILE"]["ok"] == (hard_k >= 16384)   # below that it must say it could not raise hard
    assert rep["CUDA_FORCE_PTX_JIT"]["value"] == "unset (was set)"
    checks = {c["name"]: c for c in got["checks"]}
    assert checks["RLIMIT_NOFILE"]["data"]["in_kernel"] is True
    assert checks["RLIMIT_NOFILE"]["data"]["soft"] == hard
    assert checks["CUDA_FORCE_PTX_JIT"]["status"] == "pass" and checks["CUDA_CACHE_DISABLE"]["status"] == "pass"
    assert checks["kernel launcher"]["status"] in ("pass", "warn")   # warn only if a hard limit could not be raised
    assert checks["kernel launcher"]["status"] == ("pass" if all(r["ok"] for r in got["report"]) else "warn")
    assert ("WARNING" in stderr) == (not all(r["ok"] for r in got["report"]))


CAP_SETPCAP, CAP_SYS_RESOURCE, PR_CAPBSET_DROP = 8, 24, 24


def _cap_eff() -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("CapEff:"))
    return int(line.split()[1], 16)


@pytest.mark.skipif(_cap_eff() >> CAP_SYS_RESOURCE & 1 and not _cap_eff() >> CAP_SETPCAP & 1,
                    reason="holds CAP_SYS_RESOURCE and cannot drop it (no CAP_SETPCAP)")
def test_limit_the_launcher_cannot_raise_is_reported_not_silent(tmp_path):
    """Started without CAP_SYS_RESOURCE and with hard RLIMIT_NOFILE 4096 (< 16384 wanted), the launcher raises soft
    to 4096, cannot raise hard, says so on stderr and in the report, and the check inside the kernel shows it."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    def drop():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))
        # drop CAP_SYS_RESOURCE from the bounding set: the exec'd kernel (even as root) no longer holds it
        if _cap_eff() >> CAP_SYS_RESOURCE & 1 and libc.prctl(PR_CAPBSET_DROP, CAP_SYS_RESOURCE, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")

    code = PROBE.replace('"uid": os.getuid()', '"uid": os.getuid(), "capeff": open("/proc/self/status").read()')
    got, stderr = _run_in_kernel(tmp_path, drop, _env(tmp_path), code)
    cap = int(next(x for x in got["capeff"].splitlines() if x.startswith("CapEff:")).split()[1], 16)
    assert not cap >> CAP_SYS_RESOURCE & 1
    assert got["nofile"] == [4096, 4096]
    rep = {r["setting"]: r for r in got["report"]}
    assert rep["RLIMIT_NOFILE"]["ok"] is False
    assert "CAP_SYS_RESOURCE" in rep["RLIMIT_NOFILE"]["why"] and "limits.conf" in rep["RLIMIT_NOFILE"]["fix"]
    assert rep["RLIMIT_NOFILE"]["value"] == "256/4096 -> 4096/4096"
    assert "[workbench launcher] WARNING RLIMIT_NOFILE" in stderr
    checks = {c["name"]: c for c in got["checks"]}
    assert checks["kernel launcher"]["status"] == "warn" and "CAP_SYS_RESOURCE" in checks["kernel launcher"]["found"]
    assert checks["RLIMIT_NOFILE"]["status"] == "warn" and checks["RLIMIT_NOFILE"]["data"]["soft"] == 4096


def test_apply_environment_in_a_child_process():
    """The launcher's settings without a kernel: a child with soft < hard and CUDA_FORCE_PTX_JIT gets them fixed."""
    code = ("import json, resource; from workbench.env.launcher import apply_environment\n"
            "env = {'CUDA_FORCE_PTX_JIT': '1'}\n"
            "rep = apply_environment(env)\n"
            "print(json.dumps({'env': env, 'rep': rep, 'nofile': resource.getrlimit(resource.RLIMIT_NOFILE)}))")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard)))
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["env"] == {"CUDA_CACHE_DISABLE": "1"}
    assert got["nofile"][0] == got["nofile"][1] >= hard
    nofile = next(r for r in got["rep"] if r["setting"] == "RLIMIT_NOFILE")
    assert nofile["value"].startswith("300/") and nofile["ok"] == (got["nofile"][1] >= 16384)
