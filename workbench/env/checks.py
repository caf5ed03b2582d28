"""Operating-system and process checks: limits, sysctls, CPU governor, clock source, CUDA environment variables,
the cubin cache and the kernel launcher's report. Pure Python, read from /proc and /sys: nothing heavy is imported.

``check()`` assembles these with the GPU checks (``workbench.env.nvml``) and, when measured, the physical floors.
"""
from __future__ import annotations

import glob
import json
import os
import resource
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Mapping

from workbench.env.interpreter import SWITCH_INTERVAL
from workbench.env.report import Check, CheckReport, unavailable

INF = resource.RLIM_INFINITY
# RLIMIT_NOFILE: Clockwork asks for >= 16k ("1024 is too low"). Below Linux's default soft limit the kernel, CUDA's
# device files and the models' files run out of descriptors during ordinary use: that is a failure, not a warning.
NOFILE_WANTED = 16384
NOFILE_MINIMUM = 1024
# vm.max_map_count: Clockwork wants 10,000,000 because it dlopens a private copy of each model's .so per instance.
# The workbench loads each b{N}.so once per process (kernels shared by every copy), so a model instance costs about
# 5 mappings per batch-size library (measured: TVM llvm .so = 5) plus 1-2 per pinned page and per large host array:
# budget 64 per instance. 262,144 leaves room for ~4,000 instances; fewer than 100 instances of headroom fails.
MAPS_PER_MODEL = 64
MAP_COUNT_WANTED = 262_144
MAP_MODELS_MINIMUM = 100
CUBIN_CACHE_VAR = "WORKBENCH_CUBIN_CACHE"
DEFAULT_CUBIN_CACHE = "~/.cache/workbench/cubin"
LAUNCH_REPORT_VAR = "WORKBENCH_LAUNCH_REPORT"   # same name as workbench.env.launcher.REPORT_VAR
CAP_SYS_NICE = 23
GOOD_CLOCKSOURCES = {"tsc", "kvm-clock", "arch_sys_counter", "hyperv_clocksource_tsc_page"}


def fmt_limit(v: int) -> str:
    return "unlimited" if v == INF else str(v)


def _limit_data(soft: int, hard: int) -> dict:
    return {"soft": None if soft == INF else soft, "hard": None if hard == INF else hard,
            "soft_unlimited": soft == INF, "hard_unlimited": hard == INF}


def _ge(v: int, wanted: int) -> bool:
    return v == INF or v >= wanted


def check_memlock() -> Check:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    why = ("Page-locked host memory is what makes weight transfers fast and their time predictable; the NVIDIA "
           "driver's cudaHostAlloc is not charged to this limit on Linux, but mlock(), RDMA and io_uring "
           "registrations are, and Clockwork asks for unlimited")
    fix = ("add '* soft memlock unlimited' and '* hard memlock unlimited' to /etc/security/limits.conf "
           "(containers: docker run --ulimit memlock=-1:-1), then log in again")
    status = "pass" if soft == INF else "warn"
    return Check("RLIMIT_MEMLOCK", status, f"soft {fmt_limit(soft)}, hard {fmt_limit(hard)} bytes", "unlimited",
                 why, fix, "os", _limit_data(soft, hard))


def check_nofile(environ: Mapping[str, str] | None = None) -> Check:
    env = os.environ if environ is None else environ
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_kernel = LAUNCH_REPORT_VAR in env
    why = ("Every model file, socket, pipe and CUDA device file holds a descriptor; at the limit loads fail with "
           "EMFILE. The workbench kernel launcher raises the soft limit to the hard limit before the kernel starts")
    limits_fix = (f"add '* soft nofile {NOFILE_WANTED * 4}' and '* hard nofile {NOFILE_WANTED * 4}' to "
                  "/etc/security/limits.conf and DefaultLimitNOFILE=65535 to /etc/systemd/system.conf and "
                  "/etc/systemd/user.conf, then log in again (containers: docker run --ulimit nofile=65536:65536)")
    if soft != INF and soft < NOFILE_MINIMUM:
        status = "fail"
    elif _ge(soft, NOFILE_WANTED):
        status = "pass"
    else:
        status = "warn"
    if _ge(hard, NOFILE_WANTED):
        fix = f"ulimit -n {fmt_limit(hard)}   (the Clockwork Workbench kernel does this itself: soft := hard)"
    else:
        fix = limits_fix
    found = f"soft {fmt_limit(soft)}, hard {fmt_limit(hard)}"
    if in_kernel:
        found += " (in the workbench kernel: soft already raised to hard)"
    elif status != "pass" and _ge(hard, NOFILE_WANTED):
        found += f" (the workbench kernel launcher raises soft to {fmt_limit(hard)})"
    return Check("RLIMIT_NOFILE", status, found, f">= {NOFILE_WANTED} (soft), >= {NOFILE_MINIMUM} at the very least",
                 why, "" if status == "pass" else fix, "os",
                 {**_limit_data(soft, hard), "in_kernel": in_kernel, "launcher_can_fix": _ge(hard, NOFILE_WANTED)})


def _capabilities() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return None


def check_rtprio() -> Check:
    why = ("Real-time priority (SCHED_FIFO) keeps executor threads from being preempted by other work; without it "
           "the OS may delay a launch by a scheduler tick")
    if not hasattr(resource, "RLIMIT_RTPRIO"):
        return unavailable("RLIMIT_RTPRIO", f"not available on {sys.platform}", why, wanted="> 0")
    soft, hard = resource.getrlimit(resource.RLIMIT_RTPRIO)
    caps = _capabilities()
    has_nice = caps is not None and bool(caps >> CAP_SYS_NICE & 1)
    found = f"soft {fmt_limit(soft)}, hard {fmt_limit(hard)}" + (", CAP_SYS_NICE held" if has_nice else "")
    ok = has_nice or soft == INF or soft > 0
    return Check("RLIMIT_RTPRIO", "pass" if ok else "warn", found, "> 0 (or CAP_SYS_NICE)", why,
                 "" if ok else "add '* soft rtprio unlimited' and '* hard rtprio unlimited' to "
                               "/etc/security/limits.conf, then log in again",
                 "os", {**_limit_data(soft, hard), "cap_sys_nice": has_nice})


def map_count() -> int:
    """Memory mappings this process holds now (each dlopened .so segment, pinned buffer, big array is one)."""
    with open("/proc/self/maps", "rb") as f:
        return sum(1 for _ in f)


def check_max_map_count(path: str = "/proc/sys/vm/max_map_count") -> Check:
    why = (f"Each dlopened model library segment, pinned host buffer and large array is one memory mapping; at the "
           f"limit dlopen fails ('failed to map segment from shared object'). The workbench shares kernels between "
           f"copies, so it budgets ~{MAPS_PER_MODEL} mappings per model instance (Clockwork, which dlopens a copy "
           f"per instance, asks for 10,000,000)")
    fix = (f"sudo sysctl -w vm.max_map_count={MAP_COUNT_WANTED * 4}   (persist: echo "
           f"'vm.max_map_count={MAP_COUNT_WANTED * 4}' | sudo tee /etc/sysctl.d/90-workbench.conf)")
    try:
        limit = int(Path(path).read_text().split()[0])
        used = map_count()
    except (OSError, ValueError, IndexError) as e:
        return unavailable("vm.max_map_count", f"cannot read {path}: {e}", why, wanted=f">= {MAP_COUNT_WANTED}")
    models = max(0, limit - used) // MAPS_PER_MODEL
    status = "fail" if models < MAP_MODELS_MINIMUM else "pass" if limit >= MAP_COUNT_WANTED else "warn"
    return Check("vm.max_map_count", status,
                 f"{limit:,} ({used:,} used by this process: room for ~{models:,} model instances)",
                 f">= {MAP_COUNT_WANTED:,} (~{(MAP_COUNT_WANTED - used) // MAPS_PER_MODEL:,} instances)",
                 why, "" if status == "pass" else fix, "os",
                 {"limit": limit, "used": used, "model_instances": models, "maps_per_model": MAPS_PER_MODEL})


def check_governor(root: str = "/sys/devices/system/cpu") -> Check:
    why = ("A scaling governor other than 'performance' lowers the CPU clock when idle, so the first request after "
           "a quiet period pays for dispatch, launch and copies at a lower clock")
    fix = "echo performance | sudo tee /sys/devices/system/cpu/cpu*/cpufreq/scaling_governor"
    paths = sorted(glob.glob(f"{root}/cpu[0-9]*/cpufreq/scaling_governor"))
    if not paths:
        return unavailable("cpu governor", f"no cpufreq in {root} (a VM or container: the hypervisor sets the "
                           "frequency)", why, wanted="performance")
    govs = Counter()
    for p in paths:
        try:
            govs[Path(p).read_text().strip()] += 1
        except OSError as e:
            govs[f"unreadable ({e.strerror})"] += 1
    ok = set(govs) == {"performance"}
    found = ", ".join(f"{g} on {n} CPU{'s' if n > 1 else ''}" for g, n in govs.most_common())
    return Check("cpu governor", "pass" if ok else "warn", found, "performance on every CPU", why,
                 "" if ok else fix, "os", {"governors": dict(govs), "cpus": len(paths)})


def check_clocksource(path: str = "/sys/devices/system/clocksource/clocksource0") -> Check:
    why = ("Every timestamp (action windows, telemetry) reads the clock source; 'tsc' and 'kvm-clock' are read in "
           "user space in tens of ns, 'hpet'/'acpi_pm' need a system call costing microseconds")
    try:
        cur = Path(path, "current_clocksource").read_text().strip()
        avail = Path(path, "available_clocksource").read_text().split()
    except OSError as e:
        return unavailable("clocksource", f"cannot read {path}: {e.strerror}", why, wanted="tsc")
    ok = cur in GOOD_CLOCKSOURCES
    better = next((c for c in ("tsc", "kvm-clock") if c in avail), None)
    fix = (f"echo {better} | sudo tee {path}/current_clocksource" if better else
           "none available on this machine: expect microsecond clock reads")
    return Check("clocksource", "pass" if ok else "warn", f"{cur} (available: {' '.join(avail)})",
                 "tsc or kvm-clock", why, "" if ok else fix, "os", {"current": cur, "available": avail})


def check_cuda_cache_disable(environ: Mapping[str, str] | None = None) -> Check:
    env = os.environ if environ is None else environ
    v = env.get("CUDA_CACHE_DISABLE")
    why = ("With the driver's JIT cache off, a kernel shipped only as PTX is compiled at every load, so an "
           "accidental JIT shows up as a slow load instead of hiding in a per-machine disk cache; the workbench "
           "ships cubins and keeps its own cubin cache")
    ok = v == "1"
    return Check("CUDA_CACHE_DISABLE", "pass" if ok else "warn", "unset" if v is None else repr(v), "'1'", why,
                 "" if ok else "export CUDA_CACHE_DISABLE=1   (the Clockwork Workbench kernel sets it)",
                 "cuda-env", {"value": v})


def check_cuda_force_ptx_jit(environ: Mapping[str, str] | None = None) -> Check:
    env = os.environ if environ is None else environ
    v = env.get("CUDA_FORCE_PTX_JIT")
    why = ("CUDA_FORCE_PTX_JIT makes the driver ignore cubins and JIT-compile PTX at every module load (seconds per "
           "model), or fail the load when no PTX is embedded")
    ok = v is None or v.strip() in ("", "0")
    return Check("CUDA_FORCE_PTX_JIT", "pass" if ok else "fail", "unset" if v is None else repr(v), "unset", why,
                 "" if ok else "unset CUDA_FORCE_PTX_JIT   (the Clockwork Workbench kernel removes it)",
                 "cuda-env", {"value": v})


def check_cuda_launch_blocking(environ: Mapping[str, str] | None = None) -> Check:
    env = os.environ if environ is None else environ
    v = env.get("CUDA_LAUNCH_BLOCKING")
    why = "CUDA_LAUNCH_BLOCKING=1 makes every kernel launch wait for the GPU: a debugging aid that serialises work"
    ok = v is None or v.strip() in ("", "0")
    return Check("CUDA_LAUNCH_BLOCKING", "pass" if ok else "warn", "unset" if v is None else repr(v), "unset or 0",
                 why, "" if ok else "unset CUDA_LAUNCH_BLOCKING", "cuda-env", {"value": v})


def check_switch_interval() -> Check:
    si = sys.getswitchinterval()
    why = ("A thread that launches kernels waits up to this long for the GIL while any other Python thread runs: "
           "on the H200 one busy thread turned a 4.9 ms inference into 21 ms at 5 ms, 6.2 ms at 0.5 ms")
    ok = si <= SWITCH_INTERVAL
    return Check("python switch interval", "pass" if ok else "warn", f"{si * 1e3:g} ms",
                 f"<= {SWITCH_INTERVAL * 1e3:g} ms", why,
                 "" if ok else f"import sys; sys.setswitchinterval({SWITCH_INTERVAL})", "kernel", {"seconds": si})


def cubin_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where compiled CUDA kernels are cached: the cache installed in this process, else what
    workbench.models.cubin_cache would use ($WORKBENCH_CUBIN_CACHE, else ~/.cache/workbench/cubin)."""
    env = os.environ if environ is None else environ
    if environ is None:
        try:
            from workbench.models import cubin_cache as cc
            cache = cc.installed() or cc.CubinCache()
            return Path(cache.dir).expanduser()
        except Exception:   # noqa: BLE001 - the models layer is absent or broken: the agreed rule still holds
            pass
    return Path(env.get(CUBIN_CACHE_VAR) or DEFAULT_CUBIN_CACHE).expanduser()


def check_cubin_cache(environ: Mapping[str, str] | None = None) -> Check:
    why = ("CUDA kernels are compiled once (NVRTC, ~6 s per model on the H200) and cached by source hash; a cached "
           "load takes ~5 ms, so a missing or unwritable cache puts compiles on the load path")
    path = cubin_cache_dir(environ)
    wanted = "an existing, writable directory (set WORKBENCH_CUBIN_CACHE to move it)"
    if path.exists() and not path.is_dir():
        return Check("cubin cache", "fail", f"{path} is not a directory", wanted, why,
                     f"rm {path}; mkdir -p {path}", "cuda-env", {"path": str(path)})
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), Path("/"))
        ok_parent = os.access(parent, os.W_OK)
        return Check("cubin cache", "warn" if ok_parent else "fail",
                     f"{path} does not exist yet ({parent} is {'writable' if ok_parent else 'NOT writable'})",
                     wanted, why, f"mkdir -p {path}", "cuda-env", {"path": str(path), "exists": False})
    files = size = 0
    per_arch: Counter = Counter()
    for f in path.rglob("*.cubin"):
        try:
            size += f.stat().st_size
        except OSError:
            continue
        files += 1
        per_arch[f.parent.name if f.parent != path else "-"] += 1
    free = shutil.disk_usage(path).free
    writable = os.access(path, os.W_OK)
    status = "fail" if not writable else "warn" if free < 1 << 30 else "pass"
    fix = {"fail": f"chmod u+w {path}   (or export {CUBIN_CACHE_VAR}=<a writable directory>)",
           "warn": f"free disk space on the filesystem of {path}", "pass": ""}[status]
    return Check("cubin cache", status,
                 f"{path}: {files} cubins"
                 + (f" ({', '.join(f'{a}: {n}' for a, n in sorted(per_arch.items()))})" if per_arch else "")
                 + f", {size / 2**20:.1f} MiB, {free / 2**30:.1f} GiB free"
                 + ("" if writable else ", NOT writable"),
                 wanted, why, fix, "cuda-env",
                 {"path": str(path), "exists": True, "files": files, "per_arch": dict(per_arch), "bytes": size,
                  "free_bytes": free,
                  "writable": writable})


def check_launch_report(environ: Mapping[str, str] | None = None) -> Check:
    env = os.environ if environ is None else environ
    why = ("The Clockwork Workbench kernel's launcher sets the CUDA variables and raises limits before CUDA starts; "
           "what it could not do is listed here")
    raw = env.get(LAUNCH_REPORT_VAR)
    if raw is None:
        return unavailable("kernel launcher", "not running in the Clockwork Workbench kernel "
                           f"({LAUNCH_REPORT_VAR} unset)", why, group="kernel", wanted="every setting applied")
    try:
        entries = json.loads(raw)
        bad = [e for e in entries if not e["ok"]]
    except (ValueError, TypeError, KeyError) as e:
        return Check("kernel launcher", "warn", f"unreadable report: {e}", "every setting applied", why,
                     "", "kernel", {"raw": raw})
    found = "; ".join(f"{e['setting']}: {e.get('value', '')}" + (f" ({e['why']})" if not e["ok"] else "")
                      for e in entries)
    return Check("kernel launcher", "warn" if bad else "pass", found, "every setting applied", why,
                 "; ".join(e.get("fix", "") for e in bad if e.get("fix")), "kernel", {"entries": entries})


def os_checks(environ: Mapping[str, str] | None = None) -> list[Check]:
    """Every check that needs no GPU (limits, sysctls, governor, clock source, CUDA variables, caches, launcher)."""
    return [check_memlock(), check_nofile(environ), check_rtprio(), check_max_map_count(), check_governor(),
            check_clocksource(), check_cuda_cache_disable(environ), check_cuda_force_ptx_jit(environ),
            check_cuda_launch_blocking(environ), check_cubin_cache(environ), check_launch_report(environ),
            check_switch_interval()]


def check(floors=None, gpu: bool = True, devices: bool = True) -> CheckReport:
    """Check this machine and process for predictable serving.

    floors: a measured ``Floors`` to include (``True`` measures them now; ``None`` includes the floors measured
    earlier in this process, if any; ``False`` includes none). gpu: run the NVML checks. devices: compare the devices TVM and cupy see
    (imports them, and may create a CUDA context).
    """
    from workbench.env import floors as floors_mod
    from workbench.env import nvml

    checks = os_checks()
    if gpu:
        checks += nvml.gpu_checks(devices=devices)
    if floors is True:
        floors = floors_mod.measure()
    elif floors is None:
        floors = floors_mod.last()
    elif floors is False:
        floors = None
    if floors is not None:
        checks += floors.checks()
    return CheckReport(checks, floors)
