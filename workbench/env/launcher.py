"""Kernel launcher of the "Clockwork Workbench" Jupyter kernel.

Sets the predictability environment Clockwork asks for *before* the kernel (and so CUDA) starts, then execs
ipykernel. What it cannot do it reports on stderr (shown in the Jupyter server log) and in the environment
variable WORKBENCH_LAUNCH_REPORT (JSON), which `workbench.check()` shows inside the kernel.

Limits: the soft limit is raised to the hard limit (always allowed). Where the hard limit itself is below what the
workbench wants, raising it is attempted too; that needs CAP_SYS_RESOURCE (root), and a failure is reported, never
silent.
"""
from __future__ import annotations

import json
import os
import resource
import sys

REPORT_VAR = "WORKBENCH_LAUNCH_REPORT"
INF = resource.RLIM_INFINITY
# What the hard limits should allow (see workbench.env.checks for why): unlimited page-locked memory, and at
# least 16384 descriptors (65536 when the hard limit may be raised, capped by fs.nr_open).
WANTED = {"RLIMIT_MEMLOCK": INF, "RLIMIT_NOFILE": 16384}
NOFILE_RAISE_TO = 65536
FIXES = {"RLIMIT_MEMLOCK": "add '* soft memlock unlimited' and '* hard memlock unlimited' to "
                           "/etc/security/limits.conf (containers: --ulimit memlock=-1:-1)",
         "RLIMIT_NOFILE": "add '* soft nofile 65536' and '* hard nofile 65536' to /etc/security/limits.conf "
                          "(containers: --ulimit nofile=65536:65536)"}


def _fmt(v: int) -> str:
    return "unlimited" if v == INF else str(v)


def _ge(v: int, wanted: int) -> bool:
    return v == INF or (wanted != INF and v >= wanted)


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return NOFILE_RAISE_TO


def raise_limit(name: str) -> dict:
    """Raise soft to hard, and hard to the wanted value if it is below it. One report entry."""
    lim = getattr(resource, name)
    wanted = WANTED[name]
    soft, hard = resource.getrlimit(lim)
    before = f"{_fmt(soft)}/{_fmt(hard)}"
    problem = None
    if not _ge(hard, wanted):
        target = INF if wanted == INF else max(wanted, min(NOFILE_RAISE_TO, _nr_open()))
        try:
            resource.setrlimit(lim, (target, target))
            return {"setting": name, "ok": True, "value": f"{before} -> {_fmt(target)}/{_fmt(target)} "
                                                          "(hard limit raised)"}
        except (ValueError, OSError) as e:
            problem = (f"hard limit {_fmt(hard)} is below the wanted {_fmt(wanted)} and raising it needs "
                       f"CAP_SYS_RESOURCE (root): {e}")
    if soft == hard:
        value = f"{before} (soft = hard)"
    else:
        try:
            resource.setrlimit(lim, (hard, hard))
            value = f"{before} -> {_fmt(hard)}/{_fmt(hard)}"
        except (ValueError, OSError) as e:
            value = before
            problem = (f"{problem}; " if problem else "") + f"could not raise the soft limit to the hard limit: {e}"
    entry = {"setting": name, "ok": problem is None, "value": value}
    if problem:
        entry.update(why=problem, fix=FIXES[name])
    return entry


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
        report.append(raise_limit(name))
    return report


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    report = apply_environment()
    os.environ[REPORT_VAR] = json.dumps(report)
    for r in report:
        if not r["ok"]:
            print(f"[workbench launcher] WARNING {r['setting']}: {r['why']} (fix: {r['fix']})", file=sys.stderr,
                  flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher", *argv])


if __name__ == "__main__":
    main()
