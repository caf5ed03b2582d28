"""EXPERIMENT.toml: a declarative experiment, parsed and validated before anything runs.

    name = "fig5-ci"                 # required; also the default output folder name
    description = "..."
    seed = 1
    clock = "virtual"                # "virtual" (discrete-event simulation) | "real"
    duration_s = 20                  # how long the workload sends requests
    warmup_s = 2                     # excluded from the summary (still recorded)
    drain_s = 1                      # after duration: time for requests in flight (default: longest SLO + 1 s)

    [device]
    kind = "emulated"                # "emulated" (profile durations) | "cpu" | "cuda"
    profile = "h200"                 # emulated: a profile name (data/profiles/) or file
    gpus = 1                         # GPUs per worker
    workers = 1
    isolated = true                  # cpu/cuda: each worker in its own process (false: in-process, debugging)

    [worker]                         # optional WorkerConfig overrides, e.g. weights_cache_size = "40 GiB"
    [controller]                     # optional ControllerConfig overrides (ns), or <field>_ms in ms

    [policy]
    name = "clockwork"               # "clockwork" | "triton" | "ray"
    [policy.triton]                  # options of one policy (used when that policy runs)
    max_queue_delay = 2000000

    [[models]]                       # one table per model; ids are assigned in this order
    name = "resnet50"                # a profile model (emulated) or the model's name (cpu/cuda)
    copies = 15
    artifact = "path/to/artifact"    # cpu/cuda: the compiled artifact directory (emulated: optional)

    [workload]
    kind = "closed_loop"             # closed_loop | poisson | bursty | slo_sweep | azure (parameters below)
    slo_ms = 100

    [sweep]                          # optional: one run per combination of these values
    "workload.slo_ms" = [10, 25, 50, 100, 250, 500]
    "policy.name" = ["clockwork", "triton"]

    [report]
    bucket_s = 1.0                   # time-series bucket
    clockwork_tsv = false            # also write Clockwork's two TSV logs per run

Every problem is an `ExperimentError` naming the file, the line and the key, and how to fix it.
"""
from __future__ import annotations

import copy
import itertools
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


class ExperimentError(ValueError):
    """A malformed experiment; the message names the file, line and key."""


# ---------------------------------------------------------------------------------------------- schema
# key -> (type(s), check, description); checks return "" when fine, else what is wrong.
def _pos(v) -> str:
    return "" if v > 0 else "must be > 0"


def _nonneg(v) -> str:
    return "" if v >= 0 else "must be >= 0"


def _one_of(*choices):
    def check(v) -> str:
        return "" if v in choices else f"must be one of {list(choices)}"
    return check


def _ge1(v) -> str:
    return "" if v >= 1 else "must be >= 1"


NUM = (int, float)
TOP = {
    "name": (str, None), "description": (str, None), "seed": (int, _nonneg), "clock": (str, _one_of("virtual", "real")),
    "duration_s": (NUM, _pos), "warmup_s": (NUM, _nonneg), "drain_s": (NUM, _nonneg),
    "device": (dict, None), "worker": (dict, None), "controller": (dict, None), "policy": (dict, None),
    "models": (list, None), "workload": (dict, None), "sweep": (dict, None), "report": (dict, None),
}
DEVICE = {"kind": (str, _one_of("emulated", "cpu", "cuda")), "profile": (str, None), "gpus": (int, _ge1),
          "workers": (int, _ge1), "isolated": (bool, None)}
MODEL = {"name": (str, None), "copies": (int, _ge1), "artifact": (str, None)}
REPORT = {"bucket_s": (NUM, _pos), "clockwork_tsv": (bool, None), "html": (bool, None)}
POLICIES = ("clockwork", "triton", "ray")

_SLO = {"slo_ms": (NUM, _pos), "slo_factor": (NUM, _pos)}
_MODELS = {"models": (list, None)}
WORKLOADS: dict[str, dict] = {
    "closed_loop": {**_SLO, **_MODELS, "clients": (int, _ge1), "concurrency": (int, _ge1),
                    "think_time_ms": (NUM, _nonneg), "think": (str, _one_of("fixed", "exponential")),
                    "stagger_ms": (NUM, _nonneg), "backoff_ms": (NUM, _pos)},
    "poisson": {**_SLO, **_MODELS, "rate": (NUM, _pos)},
    "bursty": {**_SLO, **_MODELS, "minor_instance": (int, _nonneg), "minor_rate": (NUM, _nonneg),
               "major_rate": (NUM, _nonneg), "period_s": (NUM, _pos), "lead_in_periods": (int, _nonneg),
               "models_per_period": (int, _ge1)},
    "slo_sweep": {**_MODELS, "rate": (NUM, _pos), "start": (NUM, _pos), "factor": (NUM, _pos),
                  "period_s": (NUM, _pos), "end": (NUM, _pos), "op": (str, _one_of("mul", "add")),
                  "unit": (str, _one_of("ms", "factor"))},
    "azure": {**_SLO, **_MODELS, "trace": (str, None), "days": (list, None), "scale": (NUM, _pos),
              "interval_s": (NUM, _pos), "start_minute": (int, _nonneg), "minutes": (int, _ge1),
              "spread": (str, _one_of("poisson", "uniform", "even")),
              "mapping": (str, _one_of("clockwork", "round_robin")), "shuffle_models": (bool, None),
              "triggers": (list, None)},
}
REQUIRED_WORKLOAD = {"closed_loop": (), "poisson": ("rate",), "bursty": (), "slo_sweep": ("rate", "start"),
                     "azure": ("trace",)}


# ---------------------------------------------------------------------------------------------- locating
_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*("(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_.\-]+)\s*=""")


def locate_keys(text: str) -> dict[str, int]:
    """Dotted key path -> line number (1-based), e.g. "workload.slo_ms", "models[1].copies", "sweep.workload.slo_ms"."""
    where: dict[str, int] = {}
    table = ""
    arrays: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        h = _HEADER.match(line)
        if h:
            name = h.group(2).strip()
            if h.group(1) == "[[":
                arrays[name] = arrays.get(name, -1) + 1
                table = f"{name}[{arrays[name]}]"
            else:
                parts = name.split(".")
                table = f"{parts[0]}[{arrays[parts[0]]}]" + "".join("." + p for p in parts[1:]) \
                    if parts[0] in arrays else name
            where.setdefault(table, n)
            continue
        k = _KEY.match(line)
        if k:
            key = k.group(1).strip("\"'")
            where.setdefault(f"{table}.{key}" if table else key, n)
    return where


# ---------------------------------------------------------------------------------------------- config
@dataclass
class ModelSpec:
    name: str
    copies: int
    artifact: str | None = None


@dataclass
class RunSpec:
    """One run of an experiment: a label and the complete settings (a sweep's combination applied)."""
    label: str
    params: dict[str, Any]          # the swept values of this run (dotted keys)
    raw: dict[str, Any]             # the whole experiment table with them applied

    @property
    def policy(self) -> str:
        return self.raw["policy"]["name"]


@dataclass
class ExperimentConfig:
    raw: dict[str, Any]
    text: str = ""
    path: Path | None = None
    runs: list[RunSpec] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.raw["name"]

    @property
    def base_dir(self) -> Path:
        """Relative paths in the file (trace, artifacts) resolve against its directory, then the repo root."""
        return self.path.parent if self.path is not None else Path.cwd()

    def resolve_path(self, p: str) -> Path:
        q = Path(p).expanduser()
        if q.is_absolute():
            return q
        for base in (self.base_dir, Path.cwd(), REPO):
            if (base / q).exists():
                return (base / q).resolve()
        return (self.base_dir / q).resolve()


def load(path: str | os.PathLike) -> ExperimentConfig:
    """Read and validate an EXPERIMENT.toml."""
    p = Path(path)
    if not p.is_file():
        raise ExperimentError(f"{p}: no such experiment file")
    text = p.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ExperimentError(f"{p}: TOML syntax error: {e} (fix the file at that line)") from None
    return validate(raw, text=text, path=p)


def from_dict(raw: dict, base_dir: str | os.PathLike | None = None) -> ExperimentConfig:
    """Validate an experiment given as a dict (same structure as the TOML file), e.g. from a notebook."""
    cfg = validate(copy.deepcopy(raw), text="", path=None)
    if base_dir is not None:
        cfg.path = Path(base_dir) / "<dict>"
    return cfg


class _Checker:
    def __init__(self, path: Path | None, text: str):
        self.path = path
        self.lines = locate_keys(text) if text else {}
        self.src = str(path) if path is not None else "experiment"

    def where(self, key: str) -> str:
        k = key
        while k:
            if k in self.lines:
                return f"{self.src}, line {self.lines[k]}"
            k = k.rsplit(".", 1)[0] if "." in k else ""
        return self.src

    def fail(self, key: str, msg: str) -> ExperimentError:
        return ExperimentError(f"{self.where(key)}: {key}: {msg}")

    def table(self, d: Any, schema: dict, prefix: str, required: tuple[str, ...] = ()) -> None:
        if not isinstance(d, dict):
            raise self.fail(prefix, f"must be a table, got {type(d).__name__}")
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            if k not in schema:
                raise self.fail(key, f"unknown key (known keys{' in [' + prefix + ']' if prefix else ''}: "
                                     f"{sorted(schema)})")
            types, check = schema[k]
            if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
                raise self.fail(key, f"must be {_tname(types)}, got a boolean")
            if not isinstance(v, types):
                raise self.fail(key, f"must be {_tname(types)}, got {type(v).__name__} {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise self.fail(key, f"must be finite, got {v}")
            if check is not None:
                problem = check(v)
                if problem:
                    raise self.fail(key, f"{problem} (got {v!r})")
        for k in required:
            if k not in d:
                raise self.fail(prefix or k, f"missing required key {k!r}")


def _tname(t) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a table",
             list: "a list"}
    return " or ".join(dict.fromkeys(names.get(x, x.__name__) for x in ts))


def validate(raw: dict, text: str = "", path: Path | None = None) -> ExperimentConfig:
    """Check every key and value, expand the sweep, and dry-build each run's pieces (profile, models, policy,
    controller/worker settings, workload incl. its trace). Raises ExperimentError on the first problem."""
    c = _Checker(path, text)
    c.table(raw, TOP, "", required=("name", "duration_s", "models", "workload"))
    raw.setdefault("description", "")
    raw.setdefault("seed", 0)
    raw.setdefault("clock", "virtual")
    raw.setdefault("warmup_s", 0.0)
    if raw["warmup_s"] >= raw["duration_s"]:
        raise c.fail("warmup_s", f"must be shorter than duration_s ({raw['duration_s']})")
    raw.setdefault("device", {})
    c.table(raw["device"], DEVICE, "device")
    dev = raw["device"]
    dev.setdefault("kind", "emulated")
    dev.setdefault("gpus", 1)
    dev.setdefault("workers", 1)
    if dev["kind"] == "emulated":
        dev.setdefault("profile", "h200")
    elif "profile" in dev:
        raise c.fail("device.profile", f"only an emulated device takes a profile (device.kind = {dev['kind']!r})")
    if dev["kind"] != "emulated" and raw["clock"] == "virtual":
        raise c.fail("clock", f"a {dev['kind']} device computes in real time: use clock = \"real\", or "
                              f"device.kind = \"emulated\" for a simulation")
    raw.setdefault("worker", {})
    raw.setdefault("controller", {})
    raw.setdefault("policy", {})
    pol = raw["policy"]
    if not isinstance(pol, dict):
        raise c.fail("policy", "must be a table")
    pol.setdefault("name", "clockwork")
    for k, v in pol.items():
        if k == "name":
            if not isinstance(v, str) or v not in POLICIES:
                raise c.fail("policy.name", f"unknown policy {v!r} (known: {list(POLICIES)})")
        elif k not in POLICIES:
            raise c.fail(f"policy.{k}", f"unknown key: [policy] takes `name` and option tables named after a "
                                        f"policy ({list(POLICIES)})")
        elif not isinstance(v, dict):
            raise c.fail(f"policy.{k}", "must be a table of that policy's options")
    models = raw["models"]
    if not models:
        raise c.fail("models", "needs at least one [[models]] table")
    for i, m in enumerate(models):
        c.table(m, MODEL, f"models[{i}]", required=("name",))
        m.setdefault("copies", 1)
    names = [m["name"] for m in models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise c.fail("models", f"model name(s) {dup} listed twice: give one table with `copies` instead")
    raw.setdefault("report", {})
    c.table(raw["report"], REPORT, "report")
    raw["report"].setdefault("bucket_s", 1.0)
    raw["report"].setdefault("clockwork_tsv", False)
    raw["report"].setdefault("html", True)
    _check_workload_table(c, raw["workload"], "workload")

    # sweep
    sweep = raw.get("sweep") or {}
    axes: list[tuple[str, list]] = []
    for k, v in sweep.items():
        key = f"sweep.{k}"
        if not isinstance(v, list) or not v:
            raise c.fail(key, "must be a non-empty list of values to run")
        head = k.split(".")[0]
        if head not in ("workload", "policy", "device", "controller", "worker", "seed", "duration_s", "clock",
                        "warmup_s", "drain_s") and not re.fullmatch(r"models\[\d+\]", head):
            raise c.fail(key, f"cannot sweep {k!r}: sweep keys are dotted paths into workload, policy, device, "
                              f"controller, worker, models[i], or seed/duration_s")
        axes.append((k, v))
    runs = []
    for combo in itertools.product(*[v for _, v in axes]) if axes else [()]:
        r = copy.deepcopy(raw)
        r.pop("sweep", None)
        params = {}
        for (k, _), v in zip(axes, combo):
            _set_dotted(r, k, v, c)
            params[k] = v
        label = ",".join(f"{_short(k)}={_fmt(v)}" for k, v in params.items()) or "run"
        runs.append(RunSpec(_safe_label(label), params, r))
    cfg = ExperimentConfig(raw=raw, text=text, path=path, runs=runs)
    for run in runs:
        _check_run(c, cfg, run)
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise c.fail("sweep", "two runs would get the same label: sweep values must differ")
    return cfg


def _short(key: str) -> str:
    """A sweep key's name in run labels: "workload.slo_ms" -> "slo_ms", "policy.name" -> "policy"."""
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _safe_label(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", s)


def _set_dotted(d: dict, key: str, value: Any, c: _Checker) -> None:
    parts = key.split(".")
    cur: Any = d
    for p in parts[:-1]:
        m = re.fullmatch(r"(\w+)\[(\d+)\]", p)
        if m:
            lst = cur.get(m.group(1))
            if not isinstance(lst, list) or int(m.group(2)) >= len(lst):
                raise c.fail(f"sweep.{key}", f"{m.group(1)}[{m.group(2)}] does not exist")
            cur = lst[int(m.group(2))]
        else:
            if not isinstance(cur.setdefault(p, {}), dict):
                raise c.fail(f"sweep.{key}", f"{p} is not a table")
            cur = cur[p]
    cur[parts[-1]] = value


def _check_workload_table(c: _Checker, w: Any, prefix: str) -> None:
    if not isinstance(w, dict):
        raise c.fail(prefix, "must be a table")
    kind = w.get("kind")
    if kind not in WORKLOADS:
        raise c.fail(f"{prefix}.kind", f"unknown workload {kind!r} (known: {sorted(WORKLOADS)})")
    schema = {"kind": (str, None), **WORKLOADS[kind]}
    c.table(w, schema, prefix, required=REQUIRED_WORKLOAD[kind])
    if "slo_ms" in w and "slo_factor" in w:
        raise c.fail(f"{prefix}.slo_factor", "give slo_ms or slo_factor, not both")
    if kind == "slo_sweep" and "end" in w and w["end"] < w["start"]:
        raise c.fail(f"{prefix}.end", f"must be >= start ({w['start']})")


def _check_run(c: _Checker, cfg: ExperimentConfig, run: RunSpec) -> None:
    """Dry-build the pieces of one run so that every problem shows before anything runs."""
    r = run.raw
    ctx = f" (run {run.label})" if run.params else ""
    # re-check swept values with the same rules as written ones (top-level ones too: seed, duration_s, ...)
    for k, v in run.params.items():
        if k in TOP:
            c.table({k: v}, TOP, "sweep")
    if r["warmup_s"] >= r["duration_s"]:
        key = next((f"sweep.{k}" for k in ("warmup_s", "duration_s") if k in run.params), "warmup_s")
        raise c.fail(key, f"warmup_s ({r['warmup_s']}) must be shorter than duration_s ({r['duration_s']}){ctx}")
    c.table(r["device"], DEVICE, "device")
    for i, m in enumerate(r["models"]):
        c.table(m, MODEL, f"models[{i}]", required=("name",))
    if r["policy"]["name"] not in POLICIES:
        raise c.fail("policy.name", f"unknown policy {r['policy']['name']!r}{ctx} (known: {list(POLICIES)})")
    _check_workload_table(c, r["workload"], "workload")
    if r["clock"] not in ("virtual", "real"):
        raise c.fail("clock", f"must be 'virtual' or 'real'{ctx}")
    dev = r["device"]
    # models
    if dev["kind"] == "emulated":
        from workbench.worker.profile import Profile, ProfileError
        try:
            prof = Profile.load(cfg.resolve_path(dev["profile"]) if Path(dev["profile"]).suffix else dev["profile"])
        except ProfileError as e:
            raise c.fail("device.profile", str(e)) from None
        for i, m in enumerate(r["models"]):
            if "artifact" in m:
                _check_artifact(c, cfg, f"models[{i}].artifact", m["artifact"])
            elif m["name"] not in prof.models:
                raise c.fail(f"models[{i}].name", f"unknown model {m['name']!r}: profile {dev['profile']!r} has "
                                                  f"{sorted(prof.models)} (or give `artifact`)")
    else:
        for i, m in enumerate(r["models"]):
            if "artifact" not in m:
                raise c.fail(f"models[{i}]", f"a {dev['kind']} device needs `artifact` (the compiled artifact "
                                             f"directory of {m['name']!r}, e.g. from `workbench compile`)")
            _check_artifact(c, cfg, f"models[{i}].artifact", m["artifact"])
    # controller / worker settings
    try:
        controller_config(r["controller"])
    except (ValueError, TypeError) as e:
        raise c.fail("controller", f"{e}{ctx}") from None
    from workbench.worker.config import ConfigError, WorkerConfig
    try:
        WorkerConfig.load(**r["worker"]) if r["worker"] else None
    except (ConfigError, ValueError, TypeError) as e:
        raise c.fail("worker", f"{e}{ctx}") from None
    # policy options
    from workbench.controller.controller import make_policy
    try:
        make_policy(r["policy"]["name"], **r["policy"].get(r["policy"]["name"], {}))
    except (ValueError, TypeError) as e:
        raise c.fail(f"policy.{r['policy']['name']}", f"{e}{ctx}") from None
    # workload: build it against the model ids it would get (opens and validates a trace)
    from workbench.experiments.build import build_workload
    ids = _model_ids(r["models"])
    w = r["workload"]
    for name in w.get("models", []):
        if not isinstance(name, str) or name not in ids:
            raise c.fail("workload.models", f"unknown model {name!r} (the [[models]] are {sorted(ids)})")
    if w["kind"] == "azure" and not w["trace"].startswith("synthetic:"):
        t = cfg.resolve_path(w["trace"])
        if not t.exists():
            raise c.fail("workload.trace", f"{t} does not exist (give the directory of the Azure Functions "
                                           f"day files, or data/azure for the synthetic sample)")
    try:
        build_workload(cfg, run, ids)
    except ValueError as e:   # TraceError included: names the trace file, line and column
        raise c.fail("workload", f"{e}{ctx}") from None


def _check_artifact(c: _Checker, cfg: ExperimentConfig, key: str, p: str) -> None:
    d = cfg.resolve_path(p)
    if not (d / "manifest.json").is_file():
        raise c.fail(key, f"{d} is not a compiled artifact directory (no manifest.json)")


def _model_ids(models: list[dict]) -> dict[str, list[int]]:
    """Model name -> the ids its copies get (assigned in file order, as the controller does)."""
    out, nxt = {}, 0
    for m in models:
        out[m["name"]] = list(range(nxt, nxt + m["copies"]))
        nxt += m["copies"]
    return out


def controller_config(d: dict):
    """A ControllerConfig from [controller]: field names in ns, or <field>_ms in milliseconds."""
    from workbench.controller.config import ControllerConfig
    changes = {}
    for k, v in d.items():
        if k.endswith("_ms") and k[:-3] in {f for f in ControllerConfig.__dataclass_fields__}:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{k} must be a number of milliseconds, got {v!r}")
            changes[k[:-3]] = int(round(v * 1e6))
        else:
            changes[k] = v
    return ControllerConfig().replace(**changes)
