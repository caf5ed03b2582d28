"""GPU checks through NVML (nvidia-ml-py, imported as ``pynvml``), and whether TVM and cupy see the same devices.

Every NVML call is guarded: no library, no driver, no permission or a call this GPU does not support becomes an
``unavailable`` check with the reason, never an exception. NVML indices follow PCI bus order; CUDA indices follow
CUDA_DEVICE_ORDER and CUDA_VISIBLE_DEVICES, so devices are matched by PCI bus id.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from workbench.env.report import Check, unavailable

# Clock event ("throttle") reason bits, nvmlClocksEventReason*.
REASONS = {0x1: "GpuIdle", 0x2: "ApplicationsClocksSetting", 0x4: "SwPowerCap", 0x8: "HwSlowdown",
           0x10: "SyncBoost", 0x20: "SwThermalSlowdown", 0x40: "HwThermalSlowdown", 0x80: "HwPowerBrakeSlowdown",
           0x100: "DisplayClockSetting"}
SW_THROTTLE = 0x4 | 0x20
HW_THROTTLE = 0x8 | 0x40 | 0x80
COMPUTE_MODES = {0: "Default", 1: "Exclusive_Thread", 2: "Prohibited", 3: "Exclusive_Process"}
# Per-lane GT/s and line-code efficiency per PCIe generation (gen6 uses FLIT mode, ~242/256).
_PCIE = {1: (2.5, 0.8), 2: (5.0, 0.8), 3: (8.0, 128 / 130), 4: (16.0, 128 / 130), 5: (32.0, 128 / 130),
         6: (64.0, 242 / 256)}
CLOCK_TOLERANCE = 0.97   # clocks are quantised in ~15 MHz steps


def pcie_peak_gbps(gen: int, width: int) -> float | None:
    """Raw link bandwidth per direction in GB/s (10^9), before protocol overhead (~85-90% is reachable)."""
    if gen not in _PCIE or not width:
        return None
    gts, eff = _PCIE[gen]
    return gts * eff * width / 8


def reason_names(bits: int) -> list[str]:
    return [n for b, n in REASONS.items() if bits & b] + ([f"0x{bits & ~0x1FF:x}"] if bits & ~0x1FF else [])


def cpu_list(cpus: set[int] | list[int]) -> str:
    """{0,1,2,5} -> '0-2,5' (the notation of taskset and /sys)."""
    out, run = [], []
    for c in sorted(cpus):
        if run and c != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(c)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


class Unavailable(Exception):
    """An NVML value that could not be read here; str() is the reason."""


def error_reason(e: BaseException) -> str:
    """One line that says why, for NVML errors and anything else a binding raises."""
    name = type(e).__name__
    hints = {"NVMLError_LibraryNotFound": "no NVIDIA driver on this machine (libnvidia-ml.so.1 not found)",
             "NVMLError_DriverNotLoaded": "the NVIDIA kernel driver is not loaded",
             "NVMLError_NoPermission": "no permission (needs root or access to /dev/nvidia*)",
             "NVMLError_NotSupported": "not supported on this GPU",
             "NVMLError_FunctionNotFound": "not provided by this driver version",
             "NVMLError_Uninitialized": "NVML not initialised",
             "NVMLError_GpuIsLost": "the GPU has fallen off the bus (GPU is lost)"}
    return f"{hints[name]} [{name}: {e}]" if name in hints else f"{name}: {e}"


def q(fn: Callable, *args: Any) -> Any:
    """Call an NVML getter; any failure becomes Unavailable(reason)."""
    try:
        return fn(*args)
    except Exception as e:   # noqa: BLE001 - NVMLError_*, AttributeError (old binding), ctypes errors
        raise Unavailable(error_reason(e)) from e


def qv(fn: Callable, *args: Any, default: Any = None) -> Any:
    """Like q() but returns ``default`` instead of raising."""
    try:
        return fn(*args)
    except Exception:   # noqa: BLE001
        return default


def _s(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def bus_id(N, h) -> str:
    """PCI bus id in the form sysfs and cupy use, e.g. '0000:18:00.0' (NVML's string has an 8-digit domain)."""
    p = q(N.nvmlDeviceGetPciInfo, h)
    return f"{int(p.domain):04x}:{int(p.bus):02x}:{int(p.device):02x}.0"


# --- per-GPU checks: each takes (N, handle, index, ctx) and returns a Check; ctx carries values between them ----

def _persistence(N, h, i, ctx) -> Check:
    pm = q(N.nvmlDeviceGetPersistenceMode, h)
    ok = pm == N.NVML_FEATURE_ENABLED
    return Check("persistence mode", "pass" if ok else "warn", "enabled" if ok else "disabled", "enabled",
                 "Without persistence mode the driver tears the GPU down when no process holds it, and the next "
                 "process pays seconds of initialisation and starts from idle clocks",
                 "" if ok else f"sudo nvidia-smi -i {i} -pm 1   (again after every reboot)", f"gpu{i}",
                 {"persistence_mode": int(pm)})


def _compute_mode(N, h, i, ctx) -> Check:
    m = int(q(N.nvmlDeviceGetComputeMode, h))
    status = {0: "pass", 2: "fail"}.get(m, "warn")
    return Check("compute mode", status, COMPUTE_MODES.get(m, str(m)), "Default",
                 "Prohibited forbids CUDA contexts; exclusive modes allow one process, so a worker process and "
                 "the notebook kernel cannot both use the GPU",
                 "" if m == 0 else f"sudo nvidia-smi -i {i} -c DEFAULT", f"gpu{i}", {"compute_mode": m})


def _auto_boost(N, h, i, ctx) -> Check:
    why = ("Auto boost lets the GPU change its clock by load and temperature on its own, so the same kernel takes "
           "different times")
    try:
        cur, default = q(N.nvmlDeviceGetAutoBoostedClocksEnabled, h)
    except Unavailable as e:
        if "NotSupported" in str(e):
            return Check("auto boost", "pass", "not supported (data-center GPU: clocks follow the application "
                         "and locked clocks, so there is nothing to disable)", "disabled or not supported", why, "",
                         f"gpu{i}", {"supported": False})
        raise
    ok = not cur
    return Check("auto boost", "pass" if ok else "warn", f"{'enabled' if cur else 'disabled'} "
                 f"(default {'enabled' if default else 'disabled'})", "disabled", why,
                 "" if ok else f"sudo nvidia-smi -i {i} --auto-boost-default=DISABLED", f"gpu{i}",
                 {"supported": True, "enabled": bool(cur), "default_enabled": bool(default)})


def _clock(N, h, i, ctx, kind: str) -> Check:
    cid = N.NVML_CLOCK_SM if kind == "SM" else N.NVML_CLOCK_MEM
    cur = int(q(N.nvmlDeviceGetClockInfo, h, cid))
    mx = int(q(N.nvmlDeviceGetMaxClockInfo, h, cid))
    app = qv(N.nvmlDeviceGetClock, h, cid, N.NVML_CLOCK_ID_APP_CLOCK_TARGET)
    app_def = qv(N.nvmlDeviceGetClock, h, cid, N.NVML_CLOCK_ID_APP_CLOCK_DEFAULT)
    ctx[f"{kind}_clock"], ctx[f"{kind}_max"] = cur, mx
    found = f"current {cur} MHz, max {mx} MHz" + (f", application target {app} MHz" if app is not None else "")
    low_app = app is not None and app < mx * CLOCK_TOLERANCE
    fix = ""
    if low_app:
        fix = (f"sudo nvidia-smi -i {i} -rac   (reset application clocks; or lock: sudo nvidia-smi -i {i} "
               f"{'-lgc' if kind == 'SM' else '-lmc'} {mx},{mx})")
    return Check(f"{kind} clock", "warn" if low_app else "pass", found,
                 f"application target = max ({mx} MHz)",
                 f"Kernels run at the application (or locked) {kind} clock when busy; a target below the maximum "
                 f"makes every inference slower than the hardware allows (the current clock at idle is expected "
                 f"to be lower: see 'clocks locked')", fix, f"gpu{i}",
                 {"current_mhz": cur, "max_mhz": mx, "app_target_mhz": app, "app_default_mhz": app_def})


def _sm_clock(N, h, i, ctx) -> Check:
    return _clock(N, h, i, ctx, "SM")


def _mem_clock(N, h, i, ctx) -> Check:
    return _clock(N, h, i, ctx, "MEM")


def _busy(N, h, ctx) -> tuple[bool, str]:
    """Is the GPU idle right now? (clock event reason GpuIdle, or 0% utilisation)."""
    reasons = ctx.get("reasons")
    util = qv(lambda: N.nvmlDeviceGetUtilizationRates(h).gpu)
    ctx["utilization"] = util
    if reasons is not None and reasons & 0x1:
        return False, "idle (event reason GpuIdle)"
    if util == 0:
        return False, "idle (0% utilisation)"
    return True, f"busy ({util}% utilisation)" if util is not None else "utilisation unknown"


def _reasons(N, h, i, ctx) -> Check:
    try:
        bits = int(q(N.nvmlDeviceGetCurrentClocksEventReasons, h))
        api = "ClocksEventReasons"
    except Unavailable:   # drivers before the rename (r535) only have the deprecated name
        bits = int(q(N.nvmlDeviceGetCurrentClocksThrottleReasons, h))
        api = "ClocksThrottleReasons"
    ctx["reasons"] = bits
    status = "fail" if bits & HW_THROTTLE else "warn" if bits & SW_THROTTLE else "pass"
    names = reason_names(bits)
    return Check("clock event reasons", status, f"0x{bits:x} ({', '.join(names) or 'none'})",
                 "no power, thermal or hardware slowdown",
                 "Power caps and thermal or hardware slowdowns lower the clock under load, so the same batch takes "
                 "longer than its profile; GpuIdle and ApplicationsClocksSetting are normal",
                 {"pass": "", "warn": f"check cooling and the power limit: nvidia-smi -i {i} -q -d PERFORMANCE,POWER",
                  "fail": f"hardware slowdown: inspect nvidia-smi -i {i} -q -d PERFORMANCE,TEMPERATURE,POWER and the "
                          "power supply / cooling"}[status],
                 f"gpu{i}", {"bits": bits, "names": names, "api": api})


def _locked(N, h, i, ctx) -> Check:
    why = ("If the SM clock drops when idle, the first inference after a quiet period runs while the clock ramps "
           "up (why sparse traffic sees higher latency); locked clocks keep one speed")
    cur, mx = ctx.get("SM_clock"), ctx.get("SM_max")
    if cur is None or mx is None:
        cur, mx = int(q(N.nvmlDeviceGetClockInfo, h, N.NVML_CLOCK_SM)), int(q(N.nvmlDeviceGetMaxClockInfo, h,
                                                                                N.NVML_CLOCK_SM))
    busy, state = _busy(N, h, ctx)
    pstate = qv(N.nvmlDeviceGetPerformanceState, h)
    data = {"sm_clock_mhz": cur, "max_mhz": mx, "busy": busy, "state": state, "pstate": pstate,
            "method": "NVML has no getter for locked clocks: inferred from the clock while idle"}
    fix = f"sudo nvidia-smi -i {i} -lgc {mx},{mx}   (reset: -rgc; again after every reboot)"
    high = cur >= mx * CLOCK_TOLERANCE
    if not busy and high:
        return Check("clocks locked", "pass", f"yes: {cur} MHz while {state}", f"held at {mx} MHz when idle", why,
                     "", f"gpu{i}", {**data, "locked": True})
    if not busy:
        return Check("clocks locked", "warn", f"no: {cur} MHz while {state} (max {mx} MHz)",
                     f"held at {mx} MHz when idle", why, fix, f"gpu{i}", {**data, "locked": False})
    if high:
        return unavailable("clocks locked", f"cannot tell: the GPU is {state} and at {cur} MHz; "
                           "`workbench floors` samples it idle and under load", why, group=f"gpu{i}",
                           wanted=f"held at {mx} MHz when idle", **data)
    return Check("clocks locked", "warn", f"no: {cur} MHz while {state} (max {mx} MHz)",
                 f"{mx} MHz under load", why, fix, f"gpu{i}", {**data, "locked": False})


def _power(N, h, i, ctx) -> Check:
    enforced = int(q(N.nvmlDeviceGetEnforcedPowerLimit, h))
    default = qv(N.nvmlDeviceGetPowerManagementDefaultLimit, h)
    usage = qv(N.nvmlDeviceGetPowerUsage, h)
    low = default is not None and enforced < default * 0.99
    w = lambda mw: f"{mw / 1000:.0f} W"   # noqa: E731
    found = f"limit {w(enforced)}" + (f" (default {w(default)})" if default else "") + \
        (f", drawing {w(usage)}" if usage is not None else "")
    return Check("power limit", "warn" if low else "pass", found, "the default limit",
                 "A power limit below the default makes the GPU lower its clock under heavy load (SwPowerCap)",
                 f"sudo nvidia-smi -i {i} -pl {default // 1000}" if low else "", f"gpu{i}",
                 {"enforced_mw": enforced, "default_mw": default, "usage_mw": usage})


def _pcie(N, h, i, ctx) -> Check:
    gen, width = int(q(N.nvmlDeviceGetCurrPcieLinkGeneration, h)), int(q(N.nvmlDeviceGetCurrPcieLinkWidth, h))
    max_gen, max_width = int(q(N.nvmlDeviceGetMaxPcieLinkGeneration, h)), int(q(N.nvmlDeviceGetMaxPcieLinkWidth, h))
    gpu_gen = qv(N.nvmlDeviceGetGpuMaxPcieLinkGeneration, h)
    busy, state = _busy(N, h, ctx)
    data = {"gen": gen, "width": width, "max_gen": max_gen, "max_width": max_width, "gpu_max_gen": gpu_gen,
            "busy": busy, "peak_gbps": pcie_peak_gbps(max_gen, max_width),
            "current_peak_gbps": pcie_peak_gbps(gen, width)}
    ctx["pcie"] = data
    why = ("Weights and inputs cross PCIe: a link trained below its maximum generation or width caps LOAD "
           "bandwidth (the generation drops at idle to save power and returns under load)")
    found = f"gen{gen} x{width} (max gen{max_gen} x{max_width}" + \
        (f", GPU supports gen{gpu_gen})" if gpu_gen and gpu_gen != max_gen else ")") + f", {state}"
    wanted = f"gen{max_gen} x{max_width} under load"
    if gpu_gen and gpu_gen > max_gen:
        return Check("PCIe link", "warn", found, f"gen{gpu_gen} (what the GPU supports)",
                     why + f"; this slot or platform limits the link to gen{max_gen}",
                     "move the GPU to a slot of its generation or check the BIOS PCIe speed setting", f"gpu{i}", data)
    if width < max_width:
        return Check("PCIe link", "warn", found, wanted, why + "; a narrower link than the slot's means a bad "
                     "seat, riser or BIOS setting", "reseat the GPU or check the BIOS / riser", f"gpu{i}", data)
    if gen < max_gen and busy:
        return Check("PCIe link", "warn", found, wanted, why, "check the BIOS PCIe speed and ASPM settings",
                     f"gpu{i}", data)
    note = " (below max only because idle)" if gen < max_gen else ""
    return Check("PCIe link", "pass", found + note, wanted, why, "", f"gpu{i}", data)


def _ecc(N, h, i, ctx) -> Check:
    cur, pending = q(N.nvmlDeviceGetEccMode, h)
    unc = qv(N.nvmlDeviceGetTotalEccErrors, h, N.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, N.NVML_VOLATILE_ECC)
    on = lambda v: "enabled" if v else "disabled"   # noqa: E731
    found = f"{on(cur)}" + (f" (pending {on(pending)} after reset)" if cur != pending else "") + \
        (f", {unc} uncorrected errors since boot" if unc else "")
    status = "warn" if cur != pending or unc else "pass"
    fix = ""
    if cur != pending:
        fix = f"reset the GPU or reboot to apply the pending ECC mode, or: sudo nvidia-smi -i {i} -e {int(cur)}"
    elif unc:
        fix = f"nvidia-smi -i {i} -q -d ECC,PAGE_RETIREMENT,ROW_REMAPPER; reset the GPU"
    return Check("ECC", status, found, "enabled (data-center default), no pending change, no uncorrected errors",
                 "ECC costs a little memory bandwidth but a pending mode change alters performance at the next "
                 "reset, and uncorrected errors crash kernels", fix, f"gpu{i}",
                 {"current": int(cur), "pending": int(pending), "uncorrected_volatile": unc})


def _affinity(N, h, i, ctx) -> Check:
    ncpu = os.cpu_count() or 1
    words = q(N.nvmlDeviceGetCpuAffinity, h, (ncpu + 63) // 64)
    near = {w * 64 + b for w, word in enumerate(words) for b in range(64) if int(word) >> b & 1}
    mine = os.sched_getaffinity(0)
    numa = None
    try:
        numa = int(Path(f"/sys/bus/pci/devices/{bus_id(N, h)}/numa_node").read_text())
    except (OSError, ValueError, Unavailable):
        pass
    data = {"near_cpus": cpu_list(near), "process_cpus": cpu_list(mine), "numa_node": numa}
    why = ("Launches and copies issued from CPUs on the other socket cross the CPU interconnect and add latency "
           "and jitter")
    found = f"near CPUs {cpu_list(near) or 'unknown'}" + (f" (NUMA node {numa})" if numa is not None and numa >= 0
                                                          else "") + f"; this process may run on {cpu_list(mine)}"
    if not near:
        return unavailable("CPU affinity", "NVML reports no CPU affinity", why, group=f"gpu{i}")
    ok = mine <= near
    fix = "" if ok else (f"numactl --cpunodebind={numa} --membind={numa} <command>" if numa is not None and numa >= 0
                         else f"taskset -c {cpu_list(near)} <command>")
    return Check("CPU affinity", "pass" if ok else "warn", found, f"run on CPUs {cpu_list(near)}", why, fix,
                 f"gpu{i}", data)


def _other_processes(N, h, i, ctx) -> Check:
    procs = q(N.nvmlDeviceGetComputeRunningProcesses, h)
    others = [p for p in procs if int(p.pid) != os.getpid()]
    mib = sum(int(p.usedGpuMemory or 0) for p in others) / 2**20
    found = "none" if not others else (f"{len(others)}: pids {', '.join(str(p.pid) for p in others[:8])}, "
                                       f"{mib:.0f} MiB")
    return Check("other processes", "warn" if others else "pass", found, "none besides this process",
                 "Other processes' kernels and copies share the SMs and PCIe link, so our timings change with their "
                 "load (pids are the host's: inside a container this process itself may be listed)",
                 f"nvidia-smi -i {i} --query-compute-apps=pid,process_name,used_memory --format=csv" if others else "",
                 f"gpu{i}", {"pids": [int(p.pid) for p in others], "used_mib": mib})


PER_GPU: list[Callable] = [_persistence, _compute_mode, _auto_boost, _sm_clock, _mem_clock, _reasons, _locked,
                           _power, _pcie, _ecc, _affinity, _other_processes]
_NAMES = {_persistence: "persistence mode", _compute_mode: "compute mode", _auto_boost: "auto boost",
          _sm_clock: "SM clock", _mem_clock: "MEM clock", _reasons: "clock event reasons", _locked: "clocks locked",
          _power: "power limit", _pcie: "PCIe link", _ecc: "ECC", _affinity: "CPU affinity",
          _other_processes: "other processes"}


def _guarded(fn: Callable, N, h, i: int, ctx: dict) -> Check:
    try:
        return fn(N, h, i, ctx)
    except Unavailable as e:
        return unavailable(_NAMES[fn], str(e), f"NVML query for {_NAMES[fn]} failed", group=f"gpu{i}")
    except Exception as e:   # noqa: BLE001 - a binding or driver surprise must not end the report
        return unavailable(_NAMES[fn], error_reason(e), f"NVML query for {_NAMES[fn]} failed", group=f"gpu{i}")


def _import_nvml():
    import pynvml   # nvidia-ml-py
    return pynvml


def nvml_devices() -> tuple[list[dict] | None, str]:
    """[{index, name, bus_id, uuid}] per GPU NVML sees (None and the reason if NVML is unavailable)."""
    try:
        N = _import_nvml()
        N.nvmlInit()
    except Exception as e:   # noqa: BLE001
        return None, error_reason(e)
    try:
        out = []
        for i in range(N.nvmlDeviceGetCount()):
            h = N.nvmlDeviceGetHandleByIndex(i)
            out.append({"index": i, "name": _s(qv(N.nvmlDeviceGetName, h, default="?")),
                        "bus_id": qv(bus_id, N, h), "uuid": _s(qv(N.nvmlDeviceGetUUID, h, default=""))})
        return out, ""
    except Exception as e:   # noqa: BLE001
        return None, error_reason(e)
    finally:
        qv(N.nvmlShutdown)


def gpu_checks(devices: bool = True) -> list[Check]:
    """Driver-wide checks, then the per-GPU checks, then (``devices``) whether TVM and cupy see the same GPUs."""
    checks: list[Check] = []
    nvml_devs: list[dict] | None = None
    why = "NVML reports the GPU's clocks, limits and link; without it no GPU setting can be checked"
    try:
        N = _import_nvml()
    except ImportError as e:
        checks.append(Check("nvml", "unavailable", f"nvidia-ml-py is not installed ({e})", "importable", why,
                            "pip install nvidia-ml-py", "driver"))
        N = None
    if N is not None:
        try:
            N.nvmlInit()
        except Exception as e:   # noqa: BLE001 - LibraryNotFound, DriverNotLoaded, NoPermission, OSError
            checks.append(unavailable("nvml", error_reason(e), why, group="driver", wanted="initialised"))
            N = None
    if N is not None:
        try:
            checks.append(_driver_check(N))
            try:
                count = int(q(N.nvmlDeviceGetCount))
            except Unavailable as e:
                count = 0
                checks.append(unavailable("GPUs", str(e), why, group="driver"))
            nvml_devs = []
            for i in range(count):
                try:
                    h = q(N.nvmlDeviceGetHandleByIndex, i)
                except Unavailable as e:
                    checks.append(unavailable("GPU", str(e), why, group=f"gpu{i}"))
                    continue
                ctx: dict[str, Any] = {}
                dev = {"index": i, "name": _s(qv(N.nvmlDeviceGetName, h, default="?")),
                       "bus_id": qv(bus_id, N, h)}
                nvml_devs.append(dev)
                checks.append(_identity(N, h, i, dev))
                checks += [_guarded(fn, N, h, i, ctx) for fn in PER_GPU]
        finally:
            qv(N.nvmlShutdown)
    if devices:
        checks += device_checks(nvml_devs)
    return checks


def _driver_check(N) -> Check:
    drv = _s(qv(N.nvmlSystemGetDriverVersion, default="?"))
    cuda = qv(N.nvmlSystemGetCudaDriverVersion_v2) or qv(N.nvmlSystemGetCudaDriverVersion)
    nv = _s(qv(N.nvmlSystemGetNVMLVersion, default="?"))
    count = qv(N.nvmlDeviceGetCount)
    cuda_s = f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else "?"
    ok = cuda is None or cuda >= 13000
    return Check("driver", "pass" if ok else "warn", f"driver {drv}, CUDA {cuda_s}, NVML {nv}, {count} GPU(s)",
                 "CUDA >= 13.0 (cupy-cuda13x, NVRTC 13 cubins)",
                 "The driver must support the CUDA version the kernels and cupy were built for",
                 "" if ok else "install an NVIDIA driver >= 580 (CUDA 13)", "driver",
                 {"driver": drv, "cuda_driver_version": cuda, "nvml": nv, "count": count})


def _identity(N, h, i: int, dev: dict) -> Check:
    mem = qv(N.nvmlDeviceGetMemoryInfo, h)
    cc = qv(N.nvmlDeviceGetCudaComputeCapability, h)
    mig = qv(N.nvmlDeviceGetMigMode, h)
    mig_on = bool(mig and mig[0])
    found = f"{dev['name']}, {dev['bus_id']}" + (f", {mem.total / 2**30:.0f} GiB" if mem else "") + \
        (f", sm_{cc[0]}{cc[1]}" if cc else "") + (", MIG enabled" if mig_on else "")
    return Check("GPU", "warn" if mig_on else "pass", found, "a whole GPU (MIG off)",
                 "Identifies the GPU; with MIG on, each instance has a fraction of the SMs and bandwidth",
                 f"sudo nvidia-smi -i {i} -mig 0" if mig_on else "", f"gpu{i}",
                 {**dev, "memory_total": mem.total if mem else None, "compute_capability": list(cc) if cc else None,
                  "mig": mig_on})


# --- do TVM and cupy see the same devices? ---------------------------------------------------------------------

def cupy_devices() -> tuple[list[dict] | None, str]:
    try:
        import cupy
    except Exception as e:   # noqa: BLE001 - ImportError, or a CUDA library missing at import
        return None, f"cupy not importable ({type(e).__name__}: {e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:   # noqa: BLE001 - CUDARuntimeError without a driver
        return [], f"cupy sees no CUDA devices ({error_reason(e)})"
    out = []
    for i in range(n):
        p = cupy.cuda.runtime.getDeviceProperties(i)
        out.append({"index": i, "name": _s(p["name"]),
                    "bus_id": f"{p['pciDomainID']:04x}:{p['pciBusID']:02x}:{p['pciDeviceID']:02x}.0"})
    return out, ""


def tvm_devices(limit: int = 64) -> tuple[list[dict] | None, str]:
    try:
        import tvm
        dev = tvm.runtime.cuda
    except Exception as e:   # noqa: BLE001
        return None, f"TVM runtime not importable ({type(e).__name__}: {e})"
    backend = ""
    try:   # a runtime-only TVM loads its CUDA backend only on request (the models layer knows how)
        from workbench.models.cubin_cache import ensure_cuda_backend
        ensure_cuda_backend()
    except Exception as e:   # noqa: BLE001 - no models layer, or no libcuda: TVM's own answer still counts
        backend = f"; CUDA backend: {type(e).__name__}: {e}"
    out = []
    try:
        for i in range(limit):
            d = dev(i)
            if not d.exist:
                break
            out.append({"index": i, "name": _s(d.device_name)})
    except Exception as e:   # noqa: BLE001 - a TVM built without CUDA
        return out, f"TVM CUDA query failed ({error_reason(e)}){backend}"
    return out, "" if out else f"TVM sees no CUDA devices (no driver, or a TVM built without CUDA){backend}"


def device_checks(nvml_devs: list[dict] | None, cupy_devs=None, tvm_devs=None) -> list[Check]:
    """Compare the CUDA devices TVM and cupy see (count and names), and map CUDA indices to NVML indices."""
    cdevs, creason = cupy_devices() if cupy_devs is None else cupy_devs
    tdevs, treason = tvm_devices() if tvm_devs is None else tvm_devs
    why = ("Weights are placed with cupy and run by TVM: both must mean the same GPU by the same index, or "
           "arrays land on one GPU and kernels run on another")
    names = lambda ds: [d["name"] for d in ds]   # noqa: E731
    data = {"cupy": cdevs, "tvm": tdevs, "nvml": nvml_devs, "cupy_reason": creason, "tvm_reason": treason,
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
    out = []
    if cdevs is None or tdevs is None or (not cdevs and not tdevs):
        reason = "; ".join(r for r in (creason, treason) if r) or "no CUDA devices"
        out.append(unavailable("TVM and cupy devices", reason, why, group="devices", wanted="same devices", **data))
    elif names(cdevs) == names(tdevs):
        out.append(Check("TVM and cupy devices", "pass", f"both see {len(cdevs)}: {', '.join(names(cdevs))}",
                         "same count and names", why, "", "devices", data))
    else:
        out.append(Check("TVM and cupy devices", "fail",
                         f"cupy sees {len(cdevs)} {names(cdevs)}, TVM sees {len(tdevs)} {names(tdevs)}",
                         "same count and names", why,
                         "check that both use the same CUDA driver and CUDA_VISIBLE_DEVICES", "devices", data))
    if cdevs and nvml_devs:
        by_bus = {d["bus_id"]: d["index"] for d in nvml_devs if d.get("bus_id")}
        mapping = {d["index"]: by_bus.get(d["bus_id"]) for d in cdevs}
        identity = all(c == n for c, n in mapping.items())
        order = os.environ.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
        out.append(Check("CUDA to NVML index", "pass" if identity else "warn",
                         ", ".join(f"cuda:{c} = nvml:{n}" for c, n in mapping.items()) + f" (CUDA_DEVICE_ORDER={order})",
                         "cuda:i = nvml:i",
                         "Clock and PCIe readings come from NVML by index; if CUDA numbers the GPUs differently they "
                         "are attributed to the wrong GPU (the workbench maps by PCI bus id)",
                         "" if identity else "export CUDA_DEVICE_ORDER=PCI_BUS_ID", "devices",
                         {"cuda_to_nvml": mapping}))
    return out


def nvml_index_for_cuda(cuda_index: int) -> int | None:
    """The NVML index of CUDA device ``cuda_index`` (matched by PCI bus id through cupy), or None."""
    cdevs, _ = cupy_devices()
    ndevs, _ = nvml_devices()
    if not cdevs or not ndevs or cuda_index >= len(cdevs):
        return None
    return next((d["index"] for d in ndevs if d["bus_id"] == cdevs[cuda_index]["bus_id"]), None)
