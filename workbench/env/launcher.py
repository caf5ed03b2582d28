"""Kernel launcher of the "Clockwork Workbench" Jupyter kernel.

Sets the predictability environment Clockwork asks for *before* the kernel (and so CUDA) starts, then execs
ipykernel. What it cannot do it reports on stderr (shown in the Jupyter server log) and in the environment
variable WORKBENCH_LAUNCH_REPORT (JSON), which `workbench.check()` shows inside the kernel.
"""
from __future__ import annotations

import json
import os
import resource
import sys

REPORT_VAR = "WORKBENCH_LAUNCH_REPORT"


def _fmt(v: int) -> str:
    return "unlimited" if v == resource.RLIM_INFINITY else str(v)


def apply_environment(environ: dict | None = None) -> list[dict]:
    """Apply the predictability settings to this process; return one entry per setting: what was done or why not."""
    env = os.environ if environ is None else environ
    report = []
    env["CUDA_CACHE_DISABLE"] = "1"
    report.append({"setting": "CUDA_CACHE_DISABLE", "ok": True, "value": "1"})
    if "CUDA_FORCE_PTX_JIT" in env:
        del env["CUDA_FORCE_PTX_JIT"]
        report.append({"setting": "CUDA_FORCE_PTX_JIT", "ok": True, "value": "unset (was set)"})
    else:
        report.append({"setting": "CUDA_FORCE_PTX_JIT", "ok": True, "value": "unset"})
    for name in ("RLIMIT_NOFILE", "RLIMIT_MEMLOCK"):
        lim = getattr(resource, name)
        soft, hard = resource.getrlimit(lim)
        if soft == hard:
            report.append({"setting": name, "ok": True, "value": f"{_fmt(soft)} (soft = hard)"})
            continue
        try:
            resource.setrlimit(lim, (hard, hard))
            report.append({"setting": name, "ok": True, "value": f"{_fmt(soft)} -> {_fmt(hard)}"})
        except (ValueError, OSError) as e:
            report.append({"setting": name, "ok": False, "value": f"{_fmt(soft)}/{_fmt(hard)}",
                           "why": f"could not raise soft limit to hard: {e}"})
    return report


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    report = apply_environment()
    os.environ[REPORT_VAR] = json.dumps(report)
    for r in report:
        if not r["ok"]:
            print(f"[workbench launcher] WARNING {r['setting']}: {r['why']}", file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher", *argv])


if __name__ == "__main__":
    main()
