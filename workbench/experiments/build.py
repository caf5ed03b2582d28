"""Build one run's pieces from its validated settings: clock, workers + controller, workload."""
from __future__ import annotations

from typing import Any

from workbench.clock import Clock, RealClock, VirtualClock
from workbench.experiments.config import ExperimentConfig, RunSpec, controller_config
from workbench.workload import AzureReplay, AzureTrace, Bursty, ClosedLoop, Poisson, SloSweep, Workload


def build_clock(run: RunSpec) -> Clock:
    return VirtualClock() if run.raw["clock"] == "virtual" else RealClock("experiment")


def build_workload(cfg: ExperimentConfig, run: RunSpec, ids: dict[str, list[int]]) -> Workload:
    """The workload of `run` over the model ids (`ids`: model name -> its instance ids)."""
    w = dict(run.raw["workload"])
    kind = w.pop("kind")
    names = w.pop("models", None) or list(ids)
    models = [i for n in names for i in ids[n]]
    seed = int(run.raw["seed"])
    common: dict[str, Any] = {"seed": seed}
    for k in ("slo_ms", "slo_factor"):
        if k in w:
            common[k] = w.pop(k)
    if kind == "closed_loop":
        return ClosedLoop(models, **w, **common)
    if kind == "poisson":
        return Poisson(models, rate=w.pop("rate"), **w, **common)
    if kind == "bursty":
        minor = w.pop("minor_instance", 0)
        if minor >= len(models):
            raise ValueError(f"bursty: minor_instance {minor} is not one of the {len(models)} instances")
        major = models[:minor] + models[minor + 1:]
        if not major:
            raise ValueError("bursty: needs at least two instances (one minor, the rest major)")
        return Bursty(models[minor], major, **w, **common)
    if kind == "slo_sweep":
        return SloSweep(models, **w, **common)
    if kind == "azure":
        trace = w.pop("trace")
        if trace.startswith("synthetic:"):
            from workbench.workload.azure_synth import parse_synthetic, synthetic_trace_dir
            path = synthetic_trace_dir(*parse_synthetic(trace))
        else:
            path = cfg.resolve_path(trace)
        days, triggers = w.pop("days", None), w.pop("triggers", None)
        return AzureReplay(_trace(path, days, triggers), models, **w, **common)
    raise ValueError(f"unknown workload kind {kind!r}")


_TRACES: dict[tuple, AzureTrace] = {}


def _trace(path, days, triggers) -> AzureTrace:
    """Open (and validate) a trace once per process: validation, then every run of a sweep, reuse it."""
    from workbench.workload.azure_trace import find_day_files
    stamp = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f, _ in find_day_files(path, days))
    key = (stamp, tuple(triggers) if triggers else None)
    if key not in _TRACES:
        if len(_TRACES) > 4:
            _TRACES.clear()
        _TRACES[key] = AzureTrace.open(path, days, triggers=triggers)
    return _TRACES[key]


def model_path(cfg: ExperimentConfig, m: dict, device: str) -> str:
    if "artifact" in m:
        return str(cfg.resolve_path(m["artifact"]))
    return f"profile:{m['name']}"


def build_system(cfg: ExperimentConfig, run: RunSpec, clock: Clock, recorder: Any):
    """Workers and a ready controller; returns (controller, {model name: ids})."""
    from workbench.controller.controller import Controller
    from workbench.worker.config import WorkerConfig

    r = run.raw
    dev = r["device"]
    wcfg = WorkerConfig.load(**r["worker"]) if r["worker"] else None
    pol = r["policy"]["name"]
    ctl = Controller(clock, policy=pol, config=controller_config(r["controller"]), recorder=recorder,
                     **r["policy"].get(pol, {}))
    seed = int(r["seed"])
    for w in range(dev["workers"]):
        if dev["kind"] == "emulated":
            from workbench.worker.emulated import EmulatedWorker
            from workbench.worker.profile import Profile
            prof = dev["profile"]
            prof = Profile.load(cfg.resolve_path(prof) if prof.endswith(".json") else prof)
            ctl.add_worker(lambda cb, w=w, prof=prof: EmulatedWorker(clock, dev["gpus"], prof, wcfg, cb,
                                                                      seed=seed * 1000 + w))
        else:   # cpu / cuda: in its own process unless isolated = false (worker/process.py says why)
            from workbench.worker.process import start_worker
            ctl.add_worker(lambda cb: start_worker(dev["kind"], wcfg, cb, isolated=dev.get("isolated", True),
                                                   num_gpus=dev["gpus"]))
    ids: dict[str, list[int]] = {}
    for m in r["models"]:
        path = model_path(cfg, m, dev["kind"])
        if dev["kind"] != "emulated" and not path.startswith("profile:"):
            # the controller's estimates start from the artifact's measurements on this device (worker/profiling.py)
            from workbench.worker.profiling import ensure_measurements
            ensure_measurements(path, "cpu" if dev["kind"] == "cpu" else "cuda:0")
        ids[m["name"]] = ctl.load_model(path, copies=m["copies"], name=m["name"])
    ctl.wait_ready(timeout_s=600)
    return ctl, ids


def model_pages(ctl: Any) -> dict[int, int]:
    """model id -> weight pages (for cache occupancy)."""
    return {mid: int(getattr(m, "num_pages", 0)) for mid, m in ctl.models.items()}
