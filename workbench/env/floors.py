"""Physical floors: the best this machine can do, measured, so that every LOAD and INFER figure can be shown as a
ratio to it.

GPU (cupy, CUDA events, per visible device): pinned and pageable host->device and device->host copies of one page
and of one whole model, kernel-launch latency (empty kernel: launch+sync, back-to-back from the host, and the GPU's
own per-kernel cost), CUDA event resolution, and the SM clock idle and under load (NVML, sampled while a busy kernel
runs and copies cross PCIe). CPU: memcpy of a page and of a model (numpy), timer resolution, and thread wake-up.

Only ``tvm``-free imports: runs on the GPU machine's runtime-only environment.
"""
from __future__ import annotations

import html
import os
import socket
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from workbench.env.report import Check, unavailable

PAGE_BYTES = 16 * 2**20          # the worker's weight page
MODEL_BYTES = 100 * 10**6        # a whole ~100 MB model (ResNet-50 fp32 is 102 MB)
_LAST: "Floors | None" = None
H2D, D2H = 1, 2                  # cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost

KERNELS_SRC = r"""
extern "C" __global__ void wb_empty() {}
extern "C" __global__ void wb_busy(float* out, unsigned long long ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  float a = threadIdx.x, b = 1.0001f;
  do {
    for (int k = 0; k < 256; ++k) a = fmaf(a, b, 0.5f);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (t - t0 < ns);
  if (a == -1.0f) out[0] = a;   // never true: keeps the loop from being optimised away
}
"""


def ratio(measured: Any, floor: float) -> Any:
    """measured / floor (>= 1 when the floor is a lower bound). Works for numbers, numpy arrays and polars
    Series/expressions, so telemetry columns can be divided by a floor directly."""
    if floor is None or not isinstance(floor, (int, float, np.floating, np.integer)) or not floor > 0:
        raise ValueError(f"floor must be a positive number, got {floor!r}: was it measured on this device?")
    return measured / floor


def _stats(xs: list[float]) -> tuple[float, float, float]:
    return float(statistics.median(xs)), float(min(xs)), float(max(xs))


@dataclass
class Transfer:
    """One copy size/kind, timed ``reps`` times. Times in ns; GB/s = 10^9 bytes/s."""
    device: str          # "cuda:0" or "cpu"
    direction: str       # h2d | d2h | memcpy
    memory: str          # pinned | pageable | host
    label: str           # page | model
    nbytes: int
    p50_ns: float
    min_ns: float
    max_ns: float
    reps: int
    timer: str           # "cuda events" or "perf_counter"
    wall_p50_ns: float | None = None   # host wall time of the same copy incl. the synchronise

    @property
    def gbps(self) -> float:
        return self.nbytes / self.p50_ns

    @property
    def best_gbps(self) -> float:
        return self.nbytes / self.min_ns

    @property
    def key(self) -> str:
        return f"{self.direction}_{self.memory}_{self.label}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gbps": self.gbps, "best_gbps": self.best_gbps, "key": self.key}


def _fit(transfers: list[Transfer]) -> tuple[float, float]:
    """(fixed ns, ns per byte) through the page and model points: t(n) = a + b*n (a clamped at 0)."""
    pts = sorted(transfers, key=lambda t: t.nbytes)
    if len(pts) == 1 or pts[0].nbytes == pts[-1].nbytes:
        return 0.0, pts[-1].p50_ns / pts[-1].nbytes
    (n0, t0), (n1, t1) = (pts[0].nbytes, pts[0].p50_ns), (pts[-1].nbytes, pts[-1].p50_ns)
    b = (t1 - t0) / (n1 - n0)
    a = t0 - b * n0
    if b <= 0 or a < 0:   # noise: fall back to the large copy's bandwidth alone
        return 0.0, t1 / n1
    return a, b


@dataclass
class GpuFloors:
    device: int
    name: str
    transfers: list[Transfer] = field(default_factory=list)
    launch_sync_us: float | None = None       # p50 host time of launch + stream synchronize (empty kernel)
    launch_host_us: float | None = None       # host cost per launch, back-to-back launches
    launch_gpu_us: float | None = None        # GPU time per empty kernel when queued back-to-back
    event_resolution_us: float | None = None  # smallest nonzero elapsed between back-to-back events
    event_zero_fraction: float | None = None  # share of back-to-back event pairs that read 0
    event_empty_kernel_us: float | None = None  # p50 of events around one empty kernel
    clock: dict[str, Any] = field(default_factory=dict)   # idle/load SM and memory clocks, reasons, PCIe under load
    kernel_source: str = ""                   # how the probe kernels were compiled
    errors: dict[str, str] = field(default_factory=dict)  # part -> why it could not be measured

    def transfer(self, direction: str, memory: str, label: str) -> Transfer | None:
        return next((t for t in self.transfers if (t.direction, t.memory, t.label) == (direction, memory, label)),
                    None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["transfers"] = [t.to_dict() for t in self.transfers]
        return d


@dataclass
class CpuFloors:
    transfers: list[Transfer] = field(default_factory=list)
    timer: dict[str, Any] = field(default_factory=dict)    # per clock: min nonzero step, cost per read, declared
    thread_wakeup_us: float | None = None                   # p50 Event.set() -> waiting thread running

    def transfer(self, label: str) -> Transfer | None:
        return next((t for t in self.transfers if t.label == label), None)

    def to_dict(self) -> dict[str, Any]:
        return {"transfers": [t.to_dict() for t in self.transfers], "timer": self.timer,
                "thread_wakeup_us": self.thread_wakeup_us}


@dataclass
class Floors:
    page_bytes: int
    model_bytes: int
    cpu: CpuFloors | None
    gpus: list[GpuFloors]
    gpu_reason: str = ""          # why there are no GPU floors
    host: str = field(default_factory=socket.gethostname)
    created: float = field(default_factory=time.time)
    seconds: float = 0.0          # how long the measurement took

    # --- floors to compare against --------------------------------------------------------------------------
    def gpu(self, device: int = 0) -> GpuFloors:
        for g in self.gpus:
            if g.device == device:
                return g
        raise KeyError(f"no GPU floors for cuda:{device} ({self.gpu_reason or 'not measured'}); "
                       f"measured: {[g.device for g in self.gpus]}")

    def transfer_floor_ns(self, nbytes: int, device: str | int = 0, direction: str = "h2d",
                          memory: str = "pinned") -> float:
        """Least time to move ``nbytes`` here: t = fixed + nbytes * ns_per_byte, fitted through the measured page
        and model copies. ``device`` "cpu" (memcpy) or a CUDA index."""
        if device == "cpu":
            if self.cpu is None or not self.cpu.transfers:
                raise KeyError("no CPU floors measured")
            pts = self.cpu.transfers
        else:
            g = self.gpu(int(str(device).removeprefix("cuda:")))
            pts = [t for t in g.transfers if t.direction == direction and t.memory == memory]
            if not pts:
                raise KeyError(f"no {direction} {memory} floors for cuda:{g.device}: {g.errors}")
        a, b = _fit(pts)
        return a + b * nbytes

    def load_ratio(self, measured_ns: Any, nbytes: int, device: str | int = 0) -> Any:
        """A measured LOAD (weights host->device, pinned) as a multiple of the floor for that many bytes."""
        return ratio(measured_ns, self.transfer_floor_ns(nbytes, device))

    def launch_floor_ns(self, device: int = 0) -> float:
        """Least host time for one kernel launch + synchronize (an INFER cannot be faster)."""
        g = self.gpu(device)
        if g.launch_sync_us is None:
            raise KeyError(f"launch latency not measured on cuda:{device}: {g.errors.get('launch')}")
        return g.launch_sync_us * 1e3

    # --- renderings -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"page_bytes": self.page_bytes, "model_bytes": self.model_bytes, "host": self.host,
                "created": self.created, "seconds": self.seconds, "gpu_reason": self.gpu_reason,
                "cpu": None if self.cpu is None else self.cpu.to_dict(), "gpus": [g.to_dict() for g in self.gpus]}

    def rows(self) -> list[dict[str, Any]]:
        """(device, measure, value, unit) rows: the headline figures."""
        out = []
        for g in self.gpus:
            dev = f"cuda:{g.device}"
            for t in g.transfers:
                out.append({"device": dev, "measure": f"{t.key} GB/s", "value": t.gbps, "unit": "GB/s"})
            for k, unit in (("launch_sync_us", "us"), ("launch_host_us", "us"), ("launch_gpu_us", "us"),
                            ("event_resolution_us", "us"), ("event_empty_kernel_us", "us")):
                if getattr(g, k) is not None:
                    out.append({"device": dev, "measure": k, "value": float(getattr(g, k)), "unit": unit})
            for k in ("idle_sm_mhz", "load_sm_mhz", "load_sm_min_mhz", "after_idle_sm_mhz", "max_sm_mhz",
                      "load_mem_mhz"):
                if g.clock.get(k) is not None:
                    out.append({"device": dev, "measure": k, "value": float(g.clock[k]), "unit": "MHz"})
        if self.cpu is not None:
            for t in self.cpu.transfers:
                out.append({"device": "cpu", "measure": f"memcpy_{t.label} GB/s", "value": t.gbps, "unit": "GB/s"})
            for name, v in self.cpu.timer.items():
                out.append({"device": "cpu", "measure": f"{name} step", "value": float(v["min_step_ns"]),
                            "unit": "ns"})
            if self.cpu.thread_wakeup_us is not None:
                out.append({"device": "cpu", "measure": "thread_wakeup_us", "value": self.cpu.thread_wakeup_us,
                            "unit": "us"})
        return out

    def to_frame(self):
        import polars as pl
        return pl.DataFrame(self.rows(), schema={"device": pl.String, "measure": pl.String, "value": pl.Float64,
                                                 "unit": pl.String})

    def _table(self) -> list[tuple[str, str, str]]:
        """(device, measure, value) lines for text/markdown/HTML."""
        mb = lambda n: f"{n / 2**20:.0f} MiB" if n % 2**20 == 0 else f"{n / 1e6:.0f} MB"   # noqa: E731
        out = []
        for g in self.gpus:
            dev = f"cuda:{g.device} {g.name}"
            for t in g.transfers:
                out.append((dev, f"{t.direction.upper()} {t.memory} {t.label} ({mb(t.nbytes)})",
                            f"{t.gbps:.1f} GB/s (p50 {t.p50_ns / 1e3:.0f} us, best {t.best_gbps:.1f} GB/s)"))
            if g.launch_sync_us is not None:
                out.append((dev, "kernel launch + sync (empty kernel)", f"{g.launch_sync_us:.1f} us"))
                out.append((dev, "kernel launch back-to-back: host / GPU per kernel",
                            f"{g.launch_host_us:.2f} us / {g.launch_gpu_us:.2f} us"))
            if g.event_resolution_us is not None:
                out.append((dev, "CUDA event resolution (smallest nonzero)",
                            f"{g.event_resolution_us:.3f} us ({g.event_zero_fraction:.0%} of pairs read 0)"))
            if g.event_empty_kernel_us is not None:
                out.append((dev, "events around one empty kernel (p50)", f"{g.event_empty_kernel_us:.2f} us"))
            c = g.clock
            if c.get("load_sm_mhz") is not None:
                out.append((dev, "SM clock idle / under load (p50, min) / max",
                            f"{c.get('idle_sm_mhz')} / {c['load_sm_mhz']:.0f} ({c.get('load_sm_min_mhz')}) / "
                            f"{c.get('max_sm_mhz')} MHz; {c.get('after_idle_sm_mhz')} MHz after "
                            f"{c.get('idle_seconds')} s idle"))
            if c.get("load_pcie"):
                out.append((dev, "PCIe under load", c["load_pcie"]))
            for part, why in g.errors.items():
                out.append((dev, f"{part}: not measured", why))
        if not self.gpus:
            out.append(("cuda", "GPU floors", f"not measured: {self.gpu_reason}"))
        if self.cpu is not None:
            for t in self.cpu.transfers:
                out.append(("cpu", f"memcpy {t.label} ({mb(t.nbytes)})",
                            f"{t.gbps:.1f} GB/s (p50 {t.p50_ns / 1e3:.0f} us)"))
            for name, v in self.cpu.timer.items():
                out.append(("cpu", f"{name} resolution: smallest step / cost per read",
                            f"{v['min_step_ns']:.0f} ns / {v['read_ns']:.0f} ns (declared {v['declared_ns']:g} ns)"))
            if self.cpu.thread_wakeup_us is not None:
                out.append(("cpu", "thread wake-up (Event.set -> running, p50)", f"{self.cpu.thread_wakeup_us:.0f} us"))
        return out

    def to_text(self) -> str:
        lines = [f"Physical floors on {self.host} (measured in {self.seconds:.1f} s)"]
        lines += [f"  {d:<24} {m:<52} {v}" for d, m, v in self._table()]
        return "\n".join(lines)

    __str__ = to_text

    def to_markdown(self) -> str:
        lines = [f"## Physical floors ({self.host}, measured in {self.seconds:.1f} s)", "",
                 "| device | measure | value |", "| --- | --- | --- |"]
        lines += [f"| {d} | {m} | {v} |" for d, m, v in self._table()]
        return "\n".join(lines) + "\n"

    def _repr_html_(self) -> str:
        e = html.escape
        rows = "".join(f"<tr><td>{e(d)}</td><td>{e(m)}</td><td>{e(v)}</td></tr>" for d, m, v in self._table())
        return (f"<div><b>Physical floors</b> ({e(self.host)}, {self.seconds:.1f} s)<table><thead><tr><th>device"
                f"</th><th>measure</th><th>value</th></tr></thead><tbody>{rows}</tbody></table></div>")

    def checks(self) -> list[Check]:
        """The floors as checks (group 'floors'): bandwidth vs the PCIe link, clock under load vs max, timers."""
        out: list[Check] = []
        for g in self.gpus:
            out += _gpu_floor_checks(g)
        if not self.gpus:
            out.append(unavailable("GPU floors", self.gpu_reason or "not measured",
                                   "The best this GPU can do: every LOAD and INFER is shown as a ratio to it",
                                   group="floors"))
        if self.cpu is not None:
            out += _cpu_floor_checks(self.cpu)
        return out


def _gpu_floor_checks(g: GpuFloors) -> list[Check]:
    from workbench.env.nvml import pcie_peak_gbps
    out = []
    grp = "floors"
    pinned, pageable = g.transfer("h2d", "pinned", "model"), g.transfer("h2d", "pageable", "model")
    why_bw = ("LOAD moves weights host->device over PCIe from pinned memory; well below the link's peak means a "
              "narrow or slow link, a far NUMA node or an IOMMU in the way")
    if pinned is not None:
        peak = pcie_peak_gbps(g.clock.get("max_pcie_gen") or 0, g.clock.get("max_pcie_width") or 0)
        if peak:
            share = pinned.gbps / peak
            st = "pass" if share >= 0.7 else "warn"
            out.append(Check(f"cuda:{g.device} H2D pinned", st,
                             f"{pinned.gbps:.1f} GB/s for {pinned.nbytes / 1e6:.0f} MB = {share:.0%} of the "
                             f"gen{g.clock['max_pcie_gen']} x{g.clock['max_pcie_width']} peak {peak:.1f} GB/s",
                             ">= 70% of the link's peak", why_bw,
                             "" if st == "pass" else "run `workbench check` for the PCIe link and CPU affinity",
                             grp, {"gbps": pinned.gbps, "peak_gbps": peak, "share": share}))
        else:
            out.append(Check(f"cuda:{g.device} H2D pinned", "pass", f"{pinned.gbps:.1f} GB/s (link peak unknown)",
                             ">= 70% of the link's peak", why_bw, "", grp, {"gbps": pinned.gbps}))
        if pageable is not None:
            ok = pinned.gbps > pageable.gbps
            out.append(Check(f"cuda:{g.device} pinned vs pageable", "pass" if ok else "warn",
                             f"pinned {pinned.gbps:.1f} GB/s, pageable {pageable.gbps:.1f} GB/s "
                             f"({pinned.gbps / pageable.gbps:.1f}x)", "pinned faster than pageable",
                             "Pageable copies are staged through a driver bounce buffer: slower and less predictable, "
                             "so the worker keeps weights in pinned memory", "", grp,
                             {"pinned_gbps": pinned.gbps, "pageable_gbps": pageable.gbps}))
    c = g.clock
    if c.get("load_sm_mhz") is not None and c.get("max_sm_mhz"):
        share = c["load_sm_mhz"] / c["max_sm_mhz"]
        st = "pass" if share >= 0.97 else "warn"
        out.append(Check(f"cuda:{g.device} SM clock under load", st,
                         f"{c['load_sm_mhz']:.0f} MHz (min {c['load_sm_min_mhz']}, max {c['max_sm_mhz']}), "
                         f"reasons {', '.join(c.get('load_reasons') or ['none'])}; "
                         f"{c.get('after_idle_sm_mhz')} MHz after {c.get('idle_seconds')} s idle",
                         f"{c['max_sm_mhz']} MHz", "The clock kernels actually run at; below max means power or "
                         "thermal limits (see the reasons)", "" if st == "pass" else
                         f"sudo nvidia-smi -i {c.get('nvml_index', g.device)} -lgc {c['max_sm_mhz']},{c['max_sm_mhz']}"
                         " and check cooling/power", grp, dict(c)))
    if g.launch_sync_us is not None:
        out.append(Check(f"cuda:{g.device} launch latency", "pass",
                         f"launch+sync {g.launch_sync_us:.1f} us; back-to-back {g.launch_host_us:.2f} us host, "
                         f"{g.launch_gpu_us:.2f} us GPU", "measured",
                         "No INFER can finish sooner than one launch + synchronize; a model of K kernels costs at "
                         "least K back-to-back launches", "", grp,
                         {"launch_sync_us": g.launch_sync_us, "launch_host_us": g.launch_host_us,
                          "launch_gpu_us": g.launch_gpu_us}))
    if g.event_resolution_us is not None:
        out.append(Check(f"cuda:{g.device} event resolution", "pass", f"{g.event_resolution_us:.3f} us", "measured",
                         "Device-side timings (LOAD and INFER durations) cannot be finer than this", "", grp,
                         {"event_resolution_us": g.event_resolution_us}))
    for part, why in g.errors.items():
        out.append(unavailable(f"cuda:{g.device} {part}", why, "a part of the floors that could not be measured",
                               group=grp))
    return out


def _cpu_floor_checks(c: CpuFloors) -> list[Check]:
    out = []
    m = c.transfer("model") or c.transfer("page")
    if m is not None:
        out.append(Check("cpu memcpy", "pass", f"{m.gbps:.1f} GB/s for {m.nbytes / 1e6:.0f} MB", "measured",
                         "The CPU device's LOAD is a memcpy of the weights: its floor", "", "floors",
                         {"gbps": m.gbps}))
    pc = c.timer.get("perf_counter")
    if pc is not None:
        ok = pc["min_step_ns"] <= 1000
        out.append(Check("timer resolution", "pass" if ok else "warn",
                         f"perf_counter: {pc['min_step_ns']:.0f} ns step, {pc['read_ns']:.0f} ns per read",
                         "<= 1 us", "Every host-side timestamp (windows, telemetry) is this coarse",
                         "" if ok else "see the 'clocksource' check", "floors", dict(pc)))
    return out


# --- CPU measurements ------------------------------------------------------------------------------------------

def _memcpy(label: str, nbytes: int, reps: int, warmup: int = 2) -> Transfer:
    src = np.ones(nbytes, np.uint8)
    dst = np.zeros(nbytes, np.uint8)       # zeros + the warm-up copies touch every page before timing
    ts = []
    for r in range(warmup + reps):
        t0 = time.perf_counter_ns()
        np.copyto(dst, src)
        t1 = time.perf_counter_ns()
        if r >= warmup:
            ts.append(max(1, t1 - t0))
    p50, lo, hi = _stats(ts)
    return Transfer("cpu", "memcpy", "host", label, nbytes, p50, lo, hi, reps, "perf_counter", p50)


def timer_resolution(reads: int = 100_000) -> dict[str, dict[str, float]]:
    """Per clock: the smallest nonzero step seen between consecutive reads, the cost of one read, and the
    resolution the OS declares. Measured: a coarse clock source shows up here, not in the documentation."""
    out = {}
    for name, fn in (("perf_counter", time.perf_counter_ns), ("monotonic", time.monotonic_ns)):
        vals = [0] * reads
        t0 = time.perf_counter_ns()
        for i in range(reads):
            vals[i] = fn()
        cost = (time.perf_counter_ns() - t0) / reads
        steps = np.diff(np.asarray(vals, dtype=np.int64))
        nz = steps[steps > 0]
        out[name] = {"min_step_ns": float(nz.min()) if nz.size else float("nan"),
                     "zero_fraction": float((steps == 0).mean()), "read_ns": float(cost),
                     "declared_ns": time.get_clock_info(name).resolution * 1e9}
    return out


def thread_wakeup_us(reps: int = 200) -> float:
    """p50 time from Event.set() in one thread until the waiting thread runs (an executor's dispatch floor)."""
    go, done = threading.Event(), threading.Event()
    stamps: list[int] = []

    def waiter():
        for _ in range(reps):
            go.wait()
            stamps.append(time.perf_counter_ns())
            go.clear()
            done.set()

    th = threading.Thread(target=waiter, daemon=True)
    th.start()
    lat = []
    for _ in range(reps):
        done.clear()
        t0 = time.perf_counter_ns()
        go.set()
        if not done.wait(5):
            break
        lat.append(stamps[-1] - t0)
    th.join(5)
    return float(statistics.median(lat)) / 1e3 if lat else float("nan")


def measure_cpu(page_bytes: int = PAGE_BYTES, model_bytes: int = MODEL_BYTES, reps: int = 10) -> CpuFloors:
    return CpuFloors([_memcpy("page", page_bytes, reps), _memcpy("model", model_bytes, max(3, reps // 2))],
                     timer_resolution(), thread_wakeup_us())


# --- GPU measurements -------------------------------------------------------------------------------------------

def compile_cubin(src: str, arch: str) -> bytes:
    """Compile CUDA C to a cubin with NVRTC (cuda-bindings): needs no GPU, so the probe kernels never JIT PTX."""
    from cuda.bindings import nvrtc

    def ok(res, what):
        err, *rest = res if isinstance(res, tuple) else (res,)
        if int(err) != 0:
            raise RuntimeError(f"NVRTC {what} failed: {err}")
        return rest[0] if rest else None

    prog = ok(nvrtc.nvrtcCreateProgram(src.encode(), b"workbench_floors.cu", 0, [], []), "create")
    opts = [f"--gpu-architecture={arch}".encode()]
    try:
        ok(nvrtc.nvrtcCompileProgram(prog, len(opts), opts), "compile")
    except RuntimeError:
        n = ok(nvrtc.nvrtcGetProgramLogSize(prog), "log size")
        log = b" " * n
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(f"NVRTC compile for {arch} failed: {log.decode(errors='replace')}") from None
    n = ok(nvrtc.nvrtcGetCUBINSize(prog), "cubin size")
    buf = b" " * n
    ok(nvrtc.nvrtcGetCUBIN(prog, buf), "get cubin")
    nvrtc.nvrtcDestroyProgram(prog)
    return buf


def _kernels(cp, cc: str, tmpdir: str) -> tuple[Any, Any, str]:
    """(empty, busy) kernels: a cubin from NVRTC via cuda-bindings, else cupy's own RawKernel compile."""
    try:
        path = os.path.join(tmpdir, f"workbench_floors_sm_{cc}.cubin")
        with open(path, "wb") as f:
            f.write(compile_cubin(KERNELS_SRC, f"sm_{cc}"))
        mod = cp.RawModule(path=path)
        return mod.get_function("wb_empty"), mod.get_function("wb_busy"), f"cubin sm_{cc} (cuda-bindings NVRTC)"
    except Exception as e:   # noqa: BLE001
        first = f"{type(e).__name__}: {e}"
    try:
        return (cp.RawKernel(KERNELS_SRC, "wb_empty"), cp.RawKernel(KERNELS_SRC, "wb_busy"),
                f"cupy RawKernel (cuda-bindings path failed: {first})")
    except Exception as e:   # noqa: BLE001
        raise RuntimeError(f"cannot compile the probe kernels: {first}; cupy: {type(e).__name__}: {e}") from e


def _time_copy(cp, stream, device: int, direction: str, memory: str, label: str, dbuf, host: np.ndarray,
               reps: int, warmup: int = 2) -> Transfer:
    n = host.nbytes
    rt = cp.cuda.runtime
    start, end = cp.cuda.Event(), cp.cuda.Event()
    ev, wall = [], []
    for r in range(warmup + reps):
        t0 = time.perf_counter_ns()
        start.record(stream)
        if direction == "h2d":
            rt.memcpyAsync(dbuf.data.ptr, host.ctypes.data, n, H2D, stream.ptr)
        else:
            rt.memcpyAsync(host.ctypes.data, dbuf.data.ptr, n, D2H, stream.ptr)
        end.record(stream)
        end.synchronize()
        t1 = time.perf_counter_ns()
        if r >= warmup:
            ev.append(cp.cuda.get_elapsed_time(start, end) * 1e6)
            wall.append(t1 - t0)
    p50, lo, hi = _stats(ev)
    return Transfer(f"cuda:{device}", direction, memory, label, n, p50, lo, hi, reps, "cuda events",
                    float(statistics.median(wall)))


def _nvml_handle(bus: str):
    """NVML module and handle for the GPU at PCI bus id ``bus`` (None, reason if NVML is unavailable)."""
    from workbench.env import nvml
    try:
        N = nvml._import_nvml()
        N.nvmlInit()
    except Exception as e:   # noqa: BLE001
        return None, None, nvml.error_reason(e)
    for i in range(N.nvmlDeviceGetCount()):
        h = N.nvmlDeviceGetHandleByIndex(i)
        if nvml.qv(nvml.bus_id, N, h) == bus:
            return N, (h, i), ""
    return N, None, f"no NVML device at PCI bus {bus}"


def _measure_clock(cp, stream, device: int, bus: str, busy, sms: int, load_seconds: float, idle_seconds: float,
                   copy_buf, copy_host) -> dict[str, Any]:
    from workbench.env import nvml
    N, hi, reason = _nvml_handle(bus)
    if hi is None:
        if N is not None:
            nvml.qv(N.nvmlShutdown)
        raise RuntimeError(f"NVML: {reason}")
    h, idx = hi
    try:
        sm = lambda: int(N.nvmlDeviceGetClockInfo(h, N.NVML_CLOCK_SM))   # noqa: E731
        mem = lambda: int(N.nvmlDeviceGetClockInfo(h, N.NVML_CLOCK_MEM))   # noqa: E731
        reasons = lambda: int(nvml.qv(N.nvmlDeviceGetCurrentClocksEventReasons, h,   # noqa: E731
                                      default=nvml.qv(N.nvmlDeviceGetCurrentClocksThrottleReasons, h, default=0)))
        out: dict[str, Any] = {"nvml_index": idx, "max_sm_mhz": int(N.nvmlDeviceGetMaxClockInfo(h, N.NVML_CLOCK_SM)),
                               "max_mem_mhz": int(N.nvmlDeviceGetMaxClockInfo(h, N.NVML_CLOCK_MEM)),
                               "max_pcie_gen": nvml.qv(N.nvmlDeviceGetMaxPcieLinkGeneration, h),
                               "max_pcie_width": nvml.qv(N.nvmlDeviceGetMaxPcieLinkWidth, h),
                               "idle_sm_mhz": sm(), "idle_reasons": nvml.reason_names(reasons()),
                               "idle_pcie_gen": nvml.qv(N.nvmlDeviceGetCurrPcieLinkGeneration, h)}
        out_buf = cp.zeros(1, cp.float32)
        copy_stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            busy((sms * 8,), (256,), (out_buf, np.uint64(int(load_seconds * 1e9))))
        t_end = time.perf_counter() + load_seconds * 0.95
        samples, mems, bits, gens, widths = [], [], 0, [], []
        first = None
        rt = cp.cuda.runtime
        while time.perf_counter() < t_end:
            # keep PCIe busy too, so the link generation is read under traffic
            rt.memcpyAsync(copy_buf.data.ptr, copy_host.ctypes.data, copy_host.nbytes, H2D, copy_stream.ptr)
            time.sleep(0.005)
            s = sm()
            first = s if first is None else first
            samples.append(s)
            mems.append(mem())
            bits |= reasons()
            gens.append(nvml.qv(N.nvmlDeviceGetCurrPcieLinkGeneration, h))
            widths.append(nvml.qv(N.nvmlDeviceGetCurrPcieLinkWidth, h))
        stream.synchronize()
        copy_stream.synchronize()
        time.sleep(idle_seconds)
        after = sm()
        if not samples:
            raise RuntimeError("no clock samples taken under load")
        g, w = max((x for x in gens if x), default=None), max((x for x in widths if x), default=None)
        out.update({"load_sm_mhz": float(statistics.median(samples)), "load_sm_min_mhz": min(samples),
                    "load_sm_max_mhz": max(samples), "load_first_sm_mhz": first, "load_samples": len(samples),
                    "load_mem_mhz": float(statistics.median(mems)), "load_reasons": nvml.reason_names(bits),
                    "load_pcie_gen": g, "load_pcie_width": w,
                    "load_pcie": f"gen{g} x{w} (max gen{out['max_pcie_gen']} x{out['max_pcie_width']})",
                    "after_idle_sm_mhz": after, "idle_seconds": idle_seconds, "load_seconds": load_seconds})
        return out
    finally:
        nvml.qv(N.nvmlShutdown)


def measure_gpu(device: int = 0, page_bytes: int = PAGE_BYTES, model_bytes: int = MODEL_BYTES, reps: int = 20,
                launches: int = 1000, load_seconds: float = 0.5, idle_seconds: float = 0.5) -> GpuFloors:
    """Floors of CUDA device ``device`` (cupy). Each part that fails is recorded in ``errors``, not raised."""
    import cupy as cp
    props = cp.cuda.runtime.getDeviceProperties(device)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    bus = f"{props['pciDomainID']:04x}:{props['pciBusID']:02x}:{props['pciDeviceID']:02x}.0"
    g = GpuFloors(device, name)
    with cp.cuda.Device(device), tempfile.TemporaryDirectory(prefix="workbench-floors-") as tmpdir:
        stream = cp.cuda.Stream(non_blocking=True)
        # copies: the page, then the model
        keep = None
        for label, n, r in (("page", page_bytes, reps), ("model", model_bytes, max(5, reps // 2))):
            try:
                dbuf = cp.empty(n, cp.uint8)
                pinned = np.frombuffer(cp.cuda.alloc_pinned_memory(n), np.uint8, n)
                pinned[:] = 1
                pageable = np.ones(n, np.uint8)
                for memory, host in (("pinned", pinned), ("pageable", pageable)):
                    for direction in ("h2d", "d2h"):
                        g.transfers.append(_time_copy(cp, stream, device, direction, memory, label, dbuf, host, r))
                keep = (dbuf, pinned)
            except Exception as e:   # noqa: BLE001
                g.errors[f"{label} copies"] = f"{type(e).__name__}: {e}"
        try:
            empty, busy, g.kernel_source = _kernels(cp, f"{props['major']}{props['minor']}", tmpdir)
        except Exception as e:   # noqa: BLE001
            g.errors["launch"] = str(e)
            empty = busy = None
        if empty is not None:
            try:
                _launch_floors(cp, stream, g, empty, busy, launches)
            except Exception as e:   # noqa: BLE001
                g.errors["launch"] = f"{type(e).__name__}: {e}"
        try:
            _event_floors(cp, stream, g, empty)
        except Exception as e:   # noqa: BLE001
            g.errors["events"] = f"{type(e).__name__}: {e}"
        if busy is not None and keep is not None:
            try:
                g.clock = _measure_clock(cp, stream, device, bus, busy, props["multiProcessorCount"], load_seconds,
                                         idle_seconds, *keep)
            except Exception as e:   # noqa: BLE001
                g.errors["clock"] = f"{type(e).__name__}: {e}"
        stream.synchronize()
    return g


def _launch_floors(cp, stream, g: GpuFloors, empty, busy, launches: int) -> None:
    with stream:
        for _ in range(20):
            empty((1,), (1,), ())
        stream.synchronize()
        sync = []
        for _ in range(200):
            t0 = time.perf_counter_ns()
            empty((1,), (1,), ())
            stream.synchronize()
            sync.append(time.perf_counter_ns() - t0)
        g.launch_sync_us = statistics.median(sync) / 1e3
        # Queue the empty kernels behind a busy kernel, so the GPU runs them back-to-back with no host gaps:
        # events around them give the GPU's own per-kernel cost; the host loop gives the launch cost.
        out = cp.zeros(1, cp.float32)
        start, end = cp.cuda.Event(), cp.cuda.Event()
        host, gpu = [], []
        for _ in range(5):
            busy((1,), (32,), (out, np.uint64(max(2_000_000, launches * 20_000))))
            start.record(stream)
            t0 = time.perf_counter_ns()
            for _ in range(launches):
                empty((1,), (1,), ())
            host.append((time.perf_counter_ns() - t0) / launches)
            end.record(stream)
            end.synchronize()
            gpu.append(cp.cuda.get_elapsed_time(start, end) * 1e3 / launches)
        g.launch_host_us = statistics.median(host) / 1e3
        g.launch_gpu_us = float(statistics.median(gpu))


def _event_floors(cp, stream, g: GpuFloors, empty=None, pairs: int = 500) -> None:
    """Smallest nonzero elapsed time between back-to-back events (if every pair reads 0, between events around an
    empty kernel), and the p50 an empty kernel takes as seen by events."""
    def elapsed_us(between) -> np.ndarray:
        evs = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(pairs)]
        with stream:
            for a, b in evs:
                a.record(stream)
                between()
                b.record(stream)
        stream.synchronize()
        return np.array([cp.cuda.get_elapsed_time(a, b) * 1e3 for a, b in evs])

    el = elapsed_us(lambda: None)
    g.event_zero_fraction = float((el == 0).mean())
    around = elapsed_us(lambda: empty((1,), (1,), ())) if empty is not None else None
    if around is not None:
        g.event_empty_kernel_us = float(np.median(around))
    nz = el[el > 0]
    if not nz.size and around is not None:
        nz = around[around > 0]
    g.event_resolution_us = float(nz.min()) if nz.size else None


def cuda_device_count() -> tuple[int, str]:
    """(number of CUDA devices cupy sees, why none)."""
    try:
        import cupy as cp
    except Exception as e:   # noqa: BLE001
        return 0, f"cupy not importable ({type(e).__name__}: {e}): GPU floors need cupy (pip install cupy-cuda13x)"
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as e:   # noqa: BLE001
        return 0, f"no CUDA device ({type(e).__name__}: {e})"
    return n, "" if n else "no CUDA device"


def measure(page_bytes: int = PAGE_BYTES, model_bytes: int = MODEL_BYTES, reps: int = 20, cpu: bool = True,
            gpu: bool = True, devices: list[int] | None = None, load_seconds: float = 0.5,
            idle_seconds: float = 0.5) -> Floors:
    """Measure the floors of this machine in one run (GPU: every visible device unless ``devices`` is given)."""
    global _LAST
    if page_bytes <= 0 or model_bytes <= 0 or reps <= 0:
        raise ValueError(f"page_bytes, model_bytes and reps must be positive (got {page_bytes}, {model_bytes}, {reps})")
    t0 = time.perf_counter()
    gpus: list[GpuFloors] = []
    reason = "not requested"
    if gpu:
        n, reason = cuda_device_count()
        for d in (range(n) if devices is None else devices):
            if d >= n:
                raise ValueError(f"cuda:{d} does not exist: {n} CUDA device(s) visible")
            gpus.append(measure_gpu(d, page_bytes, model_bytes, reps, load_seconds=load_seconds,
                                    idle_seconds=idle_seconds))
    cpu_f = measure_cpu(page_bytes, model_bytes, max(3, reps // 2)) if cpu else None
    f = Floors(page_bytes, model_bytes, cpu_f, gpus, "" if gpus else reason, seconds=time.perf_counter() - t0)
    _LAST = f
    return f


def last() -> Floors | None:
    """The floors measured most recently in this process (included in ``workbench.check()``)."""
    return _LAST
