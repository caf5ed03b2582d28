"""Emulation profiles: what a device measured for each model (exec duration distribution per batch size,
weights load time, sizes, SM clock), so the emulated worker can reproduce it without the device
(Clockwork's `worker_dummy` with `model.measurements`, clockwork.md §1.1).

File format (JSON, `data/profiles/<name>.json`):
{
  "format": 1, "device": str, "source": str (where the figures come from),
  "sm_clock_mhz": int, "h2d_bytes_per_s": float, "d2h_bytes_per_s": float, "copy_latency_ns": int,
  "page_size": int, "load_sigma": float (lognormal sigma of weights load times),
  "models": {name: {
      "source": str, "inputs": [TensorSpec json], "outputs": [TensorSpec json],
      "weights_bytes": int, "runs": [[first_page, n_pages], ...] (at the profile's page_size; optional:
      default one page per page_size bytes), "weights_load_ns": int (optional: from bytes and bandwidth),
      "exec": {"<batch>": {"p50_ns": int, "sigma": float} or {"p50_ns": int, "samples_ns": [int, ...]}},
      "workspace_bytes": {"<batch>": int} (optional), "io_bytes": {"<batch>": int} (optional)}}
}
Exec draws: with "samples_ns", one of the samples (the measured distribution itself); otherwise lognormal with
median p50_ns and the given sigma (sigma = ln(p99/p50) / 2.326 fits a measured p99).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from workbench.models.source import TensorSpec

PROFILE_DIR = Path(__file__).resolve().parents[2] / "data" / "profiles"
Z99 = 2.3263478740408408   # standard normal 99th percentile


class ProfileError(ValueError):
    """A profile file or entry that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class ExecDist:
    p50_ns: int
    sigma: float = 0.0
    samples_ns: tuple[int, ...] = ()

    def draw(self, rng: random.Random) -> int:
        if self.samples_ns:
            return self.samples_ns[rng.randrange(len(self.samples_ns))]
        if self.sigma <= 0:
            return self.p50_ns
        return max(1, int(self.p50_ns * math.exp(self.sigma * rng.gauss(0.0, 1.0))))

    def to_json(self) -> dict:
        d: dict = {"p50_ns": self.p50_ns}
        if self.samples_ns:
            d["samples_ns"] = list(self.samples_ns)
        else:
            d["sigma"] = self.sigma
        return d

    @classmethod
    def fit(cls, samples_ns: list[int], keep_samples: bool = True) -> "ExecDist":
        """From measured durations: the samples themselves (and their median), or a lognormal fit."""
        s = sorted(int(x) for x in samples_ns)
        if not s:
            raise ValueError("no samples to fit")
        p50 = s[len(s) // 2]
        if keep_samples:
            return cls(p50, 0.0, tuple(s))
        p99 = s[min(len(s) - 1, int(0.99 * len(s)))]
        return cls(p50, math.log(max(p99, p50) / p50) / Z99)


@dataclass
class ProfileModel:
    name: str
    inputs: tuple[TensorSpec, ...] | None
    outputs: tuple[TensorSpec, ...] | None
    weights_bytes: int
    runs: list[tuple[int, int]] | None       # at the profile's page size
    weights_load_ns: int
    exec: dict[int, ExecDist]
    workspace_bytes: dict[int, int] = field(default_factory=dict)
    io_bytes: dict[int, int] = field(default_factory=dict)
    source: str = ""

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(sorted(self.exec))

    def runs_for(self, page_size: int, profile_page_size: int) -> list[tuple[int, int]]:
        """The page runs at `page_size`: the profile's own runs if sizes agree, else one run per page_size of
        weights (an approximation: tensors larger than a page are not known)."""
        if self.runs is not None and page_size == profile_page_size:
            return list(self.runs)
        return [(i, 1) for i in range(max(1, -(-self.weights_bytes // page_size)))]

    def to_json(self) -> dict:
        d = {"source": self.source, "weights_bytes": self.weights_bytes, "weights_load_ns": self.weights_load_ns,
             "exec": {str(b): e.to_json() for b, e in sorted(self.exec.items())}}
        if self.inputs is not None:
            d["inputs"] = [s.to_json() for s in self.inputs]
        if self.outputs is not None:
            d["outputs"] = [s.to_json() for s in self.outputs]
        if self.runs is not None:
            d["runs"] = [list(r) for r in self.runs]
        if self.workspace_bytes:
            d["workspace_bytes"] = {str(b): v for b, v in sorted(self.workspace_bytes.items())}
        if self.io_bytes:
            d["io_bytes"] = {str(b): v for b, v in sorted(self.io_bytes.items())}
        return d


@dataclass
class Profile:
    device: str
    source: str
    sm_clock_mhz: int
    h2d_bytes_per_s: float
    d2h_bytes_per_s: float
    copy_latency_ns: int
    page_size: int
    load_sigma: float
    models: dict[str, ProfileModel]
    path: str = ""

    @classmethod
    def load(cls, name_or_path: str | Path = "h200") -> "Profile":
        """A profile by name (data/profiles/<name>.json) or by file path."""
        p = Path(name_or_path)
        if not p.suffix and not p.exists():
            p = PROFILE_DIR / f"{name_or_path}.json"
        if not p.is_file():
            known = sorted(x.stem for x in PROFILE_DIR.glob("*.json")) if PROFILE_DIR.is_dir() else []
            raise ProfileError(f"emulation profile {name_or_path!r} not found ({p}); known profiles: {known}")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ProfileError(f"emulation profile {p} is not valid JSON: {e}") from None
        return cls.from_json(d, str(p))

    @classmethod
    def from_json(cls, d: dict, path: str = "<dict>") -> "Profile":
        if d.get("format") != 1:
            raise ProfileError(f"{path}: profile format {d.get('format')!r} is not supported (expected 1)")
        try:
            h2d = float(d["h2d_bytes_per_s"])
            if not h2d > 0:   # before the models: their default weights_load_ns divides by it
                raise ProfileError(f"{path}: h2d_bytes_per_s = {h2d!r} must be > 0: fix the profile or measure it "
                                   f"again")
            models = {name: _model_from_json(name, m, h2d, path) for name, m in d["models"].items()}
            prof = cls(device=d["device"], source=d.get("source", ""), sm_clock_mhz=int(d["sm_clock_mhz"]),
                       h2d_bytes_per_s=h2d, d2h_bytes_per_s=float(d.get("d2h_bytes_per_s", h2d)),
                       copy_latency_ns=int(d.get("copy_latency_ns", 0)), page_size=int(d["page_size"]),
                       load_sigma=float(d.get("load_sigma", 0.0)), models=models, path=path)
        except KeyError as e:
            raise ProfileError(f"{path}: missing field {e.args[0]!r}") from None
        prof.check()
        return prof

    def check(self) -> None:
        """Raise ProfileError for values the emulated worker cannot use: negative durations or sizes (time would
        run backwards), zero bandwidths or page size, runs that do not partition a model's pages."""
        from workbench.worker.page_cache import normalize_runs
        where = self.path or self.device

        def need(ok: bool, what: str, value: object, rule: str) -> None:
            if not ok:
                raise ProfileError(f"{where}: {what} = {value!r} {rule}: fix the profile or measure it again")
        for key in ("h2d_bytes_per_s", "d2h_bytes_per_s", "page_size"):
            need(getattr(self, key) > 0, key, getattr(self, key), "must be > 0")
        for key in ("copy_latency_ns", "load_sigma"):
            need(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0")
        for name, m in self.models.items():
            need(m.weights_bytes >= 0, f"model {name!r} weights_bytes", m.weights_bytes, "must be >= 0")
            need(m.weights_load_ns >= 0, f"model {name!r} weights_load_ns", m.weights_load_ns, "must be >= 0")
            for b, e in m.exec.items():
                what = f"model {name!r} exec batch {b}"
                need(b >= 1, f"model {name!r} exec batch", b, "must be >= 1")
                low = min((e.p50_ns, *e.samples_ns))
                need(low >= 0, f"{what} p50_ns/samples_ns", low, "must be >= 0")
                need(e.sigma >= 0, f"{what} sigma", e.sigma, "must be >= 0")
            for key in ("workspace_bytes", "io_bytes"):
                for b, v in getattr(m, key).items():
                    need(v >= 0, f"model {name!r} {key} batch {b}", v, "must be >= 0")
            if m.runs is not None:
                try:
                    normalize_runs(m.runs)
                except ValueError as e:
                    raise ProfileError(f"{where}: model {name!r}: {e}: fix the profile's runs") from None

    def to_json(self) -> dict:
        return {"format": 1, "device": self.device, "source": self.source, "sm_clock_mhz": self.sm_clock_mhz,
                "h2d_bytes_per_s": self.h2d_bytes_per_s, "d2h_bytes_per_s": self.d2h_bytes_per_s,
                "copy_latency_ns": self.copy_latency_ns, "page_size": self.page_size, "load_sigma": self.load_sigma,
                "models": {n: m.to_json() for n, m in self.models.items()}}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    def model(self, name: str) -> ProfileModel:
        try:
            return self.models[name]
        except KeyError:
            raise ProfileError(f"profile {self.path or self.device} has no model {name!r}; it has "
                               f"{sorted(self.models)}") from None


def _model_from_json(name: str, m: dict, h2d: float, path: str) -> ProfileModel:
    def specs(key: str) -> tuple[TensorSpec, ...] | None:
        return tuple(TensorSpec.from_json(s) for s in m[key]) if key in m else None

    exec_ = {}
    for b, e in m["exec"].items():
        if "samples_ns" in e:
            s = tuple(int(x) for x in e["samples_ns"])
            exec_[int(b)] = ExecDist(int(e.get("p50_ns", sorted(s)[len(s) // 2])), 0.0, s)
        else:
            exec_[int(b)] = ExecDist(int(e["p50_ns"]), float(e.get("sigma", 0.0)))
    if not exec_:
        raise ProfileError(f"{path}: model {name!r} has no exec entries")
    wb = int(m["weights_bytes"])
    return ProfileModel(
        name=name, inputs=specs("inputs"), outputs=specs("outputs"), weights_bytes=wb,
        runs=[(int(r[0]), int(r[1])) for r in m["runs"]] if "runs" in m else None,
        weights_load_ns=int(m.get("weights_load_ns", wb / h2d * 1e9)), exec=exec_,
        workspace_bytes={int(b): int(v) for b, v in m.get("workspace_bytes", {}).items()},
        io_bytes={int(b): int(v) for b, v in m.get("io_bytes", {}).items()}, source=m.get("source", ""))
