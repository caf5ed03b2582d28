"""The tuning database: which compile variant is fastest for a model on a GPU, measured once, used by every
`workbench compile` so users get tuned models without tuning.

A *variant* is everything the compiler may choose without changing what the model computes (beyond
floating-point rounding within the precision's tolerance): the conv lowering of a zoo model (which fixes the
weights' layout), the precision, the kernel schedules (`schedules.ScheduleSpec`: dlight Matmul config, the
small-reduction rule, per-kernel choices, and at fp16 whether kernels pass each other fp16 activations), at
fp16 the dtype the artifact stores weights in (`weights`: "fp16" gives `schedules.keep_fp16_weights`: half the
weight bytes and no weight-cast kernel per run) and relax's CUDA-graph rewrite. Beware the last: the rewrite
captures kernels that read weights and TVM replays the capture with the addresses of its first call, so a worker
that moves weights between cache pages would compute with stale weights; `bench.kernel_quality pick` records a
CUDA-graph variant only if it was measured correct with every weight moved (none so far).

Files: `data/tuning/<target>-<arch>/<model>.json` (e.g. data/tuning/cuda-sm_90/resnet50.json), or the directory
in $WORKBENCH_TUNING_DB. One file per base zoo model (`resnet50`, not `resnet50-matmul`):

    {"format": "workbench-tuning", "version": 1, "model": "resnet50", "target": "cuda", "arch": "sm_90",
     "tvm_version": "0.27.0.post1",
     "precisions": {
       "fp32": {"lowering": "matmul",                       # the fastest lowering over the measured batches
                "batches": {"1": ENTRY, "16": ENTRY}, ...}}}
    ENTRY = {"variant": {"lowering": "matmul", "precision": "fp32", "cuda_graph": false,
                         "schedule": {"matmul": {...}, "small_reduction": 256, "kernels": {KEY: CHOICE}}},
             # fp16 entries may add e.g. "injective": 8, "mma": false, "activations": "fp16" to the schedule
             # (ScheduleSpec writes a key only when it differs from its default: older entries read unchanged),
             # and "weights": "fp16" and "projections": "fused" to the variant (written only when not the
             # default, likewise)
             "measured": {"p50_ms": 3.1, "p99_ms": 3.2, "n": 200},       # exec on the GPU, CUDA events
             "baseline": {"p50_ms": 4.9, "p99_ms": 5.0},                 # TVM default pipeline, same run
             "torch": {"fp32_graph": {"p50_ms": 2.2, ...}, ...},          # torch on the same GPU, same run
             "gpu": "NVIDIA H200", "date": "2026-11-30", "source": "bench/results/kernel_quality.json"}

Lookup (`plan`): for each batch size to compile, the entry of that batch if measured, else of the nearest
measured batch (log2 distance; per-kernel choices of every measured batch are merged, since kernel keys
include shapes and only match the kernels they were measured on). The lowering is one per model (it fixes
the weights layout shared by all batch sizes), and so are the weights dtype and the projections: fp16 weights and
fused projections only if every entry used says so, else every batch size gets fp32 weights and separate
projections (one weights.bin serves all batch sizes; fp32 weights run with every variant, at the cost of their
cast kernels). Needs only json; TVM is not imported.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from workbench.models.artifact import ArtifactError
from workbench.models.projections import PROJECTIONS
from workbench.models.schedules import PRECISIONS, WEIGHTS, ScheduleError, ScheduleSpec

FORMAT = "workbench-tuning"
VERSION = 1
ENV_DIR = "WORKBENCH_TUNING_DB"
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "data" / "tuning"
LOWERINGS = ("direct", "matmul")


class TuningError(ArtifactError):
    """A damaged or inconsistent tuning database file; the message names the file and the fix."""


@dataclass(frozen=True)
class Variant:
    """One way to compile a model (see the module docstring)."""
    lowering: str = "direct"
    precision: str = "fp32"
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    cuda_graph: bool = False
    # dtype of the artifact's float weights (schedules.WEIGHTS): "fp16" stores them in fp16 (keep_fp16_weights,
    # run by compiler.lower; precision fp16 only). Here, not in ScheduleSpec: it changes the artifact's
    # weights.bin and the function's signature, which all batch sizes share, not how kernels are scheduled.
    weights: str = "fp32"
    # "fused": sibling projections (attention's Q, K and V) as one matmul over weights stored side by side
    # (projections.fused, applied to the source by compiler.resolve_tuning): like `weights`, it changes the
    # artifact's weights.bin and signature, so every batch size of an artifact shares it
    projections: str = "separate"

    def __post_init__(self):
        if self.lowering not in LOWERINGS:
            raise ScheduleError(f"unknown lowering {self.lowering!r}; valid: {', '.join(LOWERINGS)}")
        if self.precision not in PRECISIONS:
            raise ScheduleError(f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        if not isinstance(self.cuda_graph, bool):
            raise ScheduleError(f"cuda_graph must be true or false, got {self.cuda_graph!r}")
        if not isinstance(self.weights, str) or self.weights not in WEIGHTS:
            raise ScheduleError(f"variant.weights must be one of {', '.join(WEIGHTS)} (the dtype the artifact stores "
                                f"weights in), got {self.weights!r}")
        if not isinstance(self.projections, str) or self.projections not in PROJECTIONS:
            raise ScheduleError(f"variant.projections must be one of {', '.join(PROJECTIONS)} (whether sibling "
                                f"projections are one matmul), got {self.projections!r}")
        if self.weights != "fp32" and self.precision != "fp16":
            raise ScheduleError(f"variant.weights {self.weights!r} needs precision fp16 (fp32 models compute with "
                                f"their fp32 weights), got precision {self.precision!r}")
        if self.schedule.activations != "fp32" and self.precision != "fp16":
            raise ScheduleError(f"schedule.activations {self.schedule.activations!r} needs precision fp16 (fp32 "
                                f"models compute and pass fp32 throughout), got precision {self.precision!r}")

    @property
    def is_default(self) -> bool:
        return (self.precision == "fp32" and self.schedule.is_default and not self.cuda_graph
                and self.weights == "fp32" and self.projections == "separate")

    def to_json(self) -> dict:
        out = {"lowering": self.lowering, "precision": self.precision, "cuda_graph": self.cuda_graph,
               "schedule": self.schedule.to_json()}
        if self.weights != "fp32":          # only when set: entries written before the field read unchanged
            out["weights"] = self.weights
        if self.projections != "separate":
            out["projections"] = self.projections
        return out

    @classmethod
    def from_json(cls, d: dict) -> "Variant":
        if not isinstance(d, dict):
            raise ScheduleError(f"a variant must be an object, got {d!r}")
        bad = sorted(set(d) - {"lowering", "precision", "cuda_graph", "schedule", "weights", "projections"})
        if bad:
            raise ScheduleError(f"variant: unknown field(s) {', '.join(bad)}; valid: lowering, precision, "
                                f"cuda_graph, schedule, weights, projections")
        return cls(d.get("lowering", "direct"), d.get("precision", "fp32"),
                   ScheduleSpec.from_json(d.get("schedule")), bool(d.get("cuda_graph", False)),
                   d.get("weights", "fp32"), d.get("projections", "separate"))

    def describe(self) -> str:
        parts = [self.lowering, self.precision]
        s = self.schedule
        if s.matmul:
            parts.append("matmul{" + ",".join(f"{k}={v}" for k, v in sorted(s.matmul.items())) + "}")
        if s.small_reduction:
            parts.append(f"small_reduction={s.small_reduction}")
        if s.injective:
            parts.append(f"injective={s.injective}")
        if s.activations != "fp32":
            parts.append(f"activations={s.activations}")
        if s.reduce_inputs != "fp32":
            parts.append(f"reduce_inputs={s.reduce_inputs}")
        if s.row_reduction:
            parts.append(f"row_reduction={s.row_reduction}")
        if s.rows:
            parts.append(f"rows={s.rows}")
        if s.split_k:
            parts.append(f"split_k={s.split_k}")
        if s.simt:
            parts.append("simt")
        if s.implicit_gemm:
            parts.append("implicit_gemm")
        if s.kernels:
            parts.append(f"{len(s.kernels)} tuned kernels")
        if self.cuda_graph:
            parts.append("cuda_graph")
        if self.weights != "fp32":
            parts.append(f"weights={self.weights}")
        if self.projections != "separate":
            parts.append(f"projections={self.projections}")
        return " ".join(parts)


def target_key(target: str, arch: str | None) -> str:
    return f"{target}-{arch}" if target == "cuda" else target


def db_dir(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get(ENV_DIR) or DEFAULT_DIR)


def model_file(model: str, target: str, arch: str | None, directory: str | os.PathLike | None = None) -> Path:
    return db_dir(directory) / target_key(target, arch) / f"{model}.json"


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------

def _fail(path: Path, what: str) -> TuningError:
    return TuningError(f"tuning database {path}: {what}; fix or delete the file (it is regenerated by "
                       f"`python -m bench.kernel_quality pick`), or compile with tuning=None")


def load_model_file(path: str | os.PathLike) -> dict:
    """Read and validate one model's tuning file (every variant parsed)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise TuningError(f"tuning database file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(path, f"not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise _fail(path, f"format is {d.get('format') if isinstance(d, dict) else None!r}, expected {FORMAT!r}")
    if d.get("version") != VERSION:
        raise _fail(path, f"version {d.get('version')!r}, this workbench reads version {VERSION}")
    for k in ("model", "target", "precisions"):
        if k not in d:
            raise _fail(path, f"field {k!r} is missing")
    if not isinstance(d["precisions"], dict):
        raise _fail(path, "'precisions' must be an object")
    for prec, p in d["precisions"].items():
        if prec not in PRECISIONS:
            raise _fail(path, f"unknown precision {prec!r} (valid: {', '.join(PRECISIONS)})")
        if not isinstance(p, dict) or p.get("lowering") not in LOWERINGS or not isinstance(p.get("batches"), dict):
            raise _fail(path, f"precisions.{prec} needs 'lowering' ({'/'.join(LOWERINGS)}) and 'batches'")
        for b, e in p["batches"].items():
            if not str(b).isdigit() or int(b) < 1:
                raise _fail(path, f"precisions.{prec}.batches has a non-positive-integer key {b!r}")
            try:
                v = Variant.from_json((e or {}).get("variant"))
            except ScheduleError as ex:
                raise _fail(path, f"precisions.{prec}.batches.{b}.variant: {ex}") from None
            if v.precision != prec:
                raise _fail(path, f"precisions.{prec}.batches.{b} holds a {v.precision} variant")
    return d


@dataclass
class TuningPlan:
    """What `plan` found: the lowering to use and a variant per batch size, with where each came from."""
    model: str
    file: Path
    lowering: str
    variants: dict[int, Variant]
    provenance: dict[int, dict]
    tvm_version: str | None

    def to_json(self) -> dict:
        return {"database": str(self.file), "model": self.model, "lowering": self.lowering,
                "tvm_version": self.tvm_version,
                "batches": {str(b): {"variant": self.variants[b].to_json(), **self.provenance[b]}
                            for b in sorted(self.variants)}}


def _nearest(measured: Sequence[int], b: int) -> int:
    return min(measured, key=lambda m: (abs(math.log2(m) - math.log2(b)), -m))


def plan(model: str, target: str, arch: str | None, batch_sizes: Sequence[int], precision: str = "fp32",
         lowering: str | None = None, directory: str | os.PathLike | None = None) -> TuningPlan | None:
    """The tuned variants for compiling base zoo model `model` at `batch_sizes`, or None if the database has
    nothing for it (model, target/arch, precision). `lowering`: force this lowering (use its entries only;
    None: the database's best)."""
    path = model_file(model, target, arch, directory)
    if not path.is_file():
        return None
    d = load_model_file(path)
    p = d["precisions"].get(precision)
    if not p:
        return None
    entries = {int(b): e for b, e in p["batches"].items()}
    use = lowering or p["lowering"]
    entries = {b: e for b, e in entries.items() if e["variant"].get("lowering", "direct") == use}
    if not entries:
        return None
    merged: dict[str, dict] = {}
    for b in sorted(entries):
        merged.update(Variant.from_json(entries[b]["variant"]).schedule.kernels)
    sources = {b: b if b in entries else _nearest(sorted(entries), b) for b in batch_sizes}
    # one weights layout for the artifact (its weights.bin serves every batch size): the weights dtype fp16 and
    # fused projections only where every batch size's entry says so, else the default for all
    used = [Variant.from_json(entries[src]["variant"]) for src in sources.values()]
    layout = {}
    for f, default in (("weights", "fp32"), ("projections", "separate")):
        seen = {getattr(v, f) for v in used}
        layout[f] = seen.pop() if len(seen) == 1 else default
    variants, prov = {}, {}
    for b in batch_sizes:
        src = sources[b]
        v = Variant.from_json(entries[src]["variant"])
        if merged:
            # (replace: every other setting of the entry's spec, mma and injective included, is kept)
            v = dataclasses.replace(v, schedule=dataclasses.replace(v.schedule, kernels=dict(merged)))
        measured = {f: getattr(v, f) for f in layout}
        v = dataclasses.replace(v, **layout)
        variants[b] = v
        m = entries[src].get("measured") or {}
        prov[b] = {"from_batch": src, "measured_p50_ms": m.get("p50_ms"), "gpu": entries[src].get("gpu"),
                   "date": entries[src].get("date")}
        for f, was in measured.items():             # the figure was measured with another weights layout
            if was != layout[f]:
                prov[b][f"measured_{f}"] = was
    return TuningPlan(model, path, use, variants, prov, d.get("tvm_version"))


# ---------------------------------------------------------------------------------------------------------
# Writing (the results script records winners)
# ---------------------------------------------------------------------------------------------------------

def record(model: str, target: str, arch: str | None, variant: Variant, batch: int, measured: dict,
           baseline: dict | None = None, torch: dict | None = None, gpu: str | None = None,
           source: str | None = None, tvm_version: str | None = None,
           directory: str | os.PathLike | None = None, date: str | None = None) -> Path:
    """Add or replace the entry of (model, target/arch, variant.precision, batch), atomically. The model's
    lowering for that precision becomes the one most of its batch entries use (ties: the fastest sum)."""
    path = model_file(model, target, arch, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    d: dict[str, Any] = load_model_file(path) if path.is_file() else {
        "format": FORMAT, "version": VERSION, "model": model, "target": target, "arch": arch, "precisions": {}}
    if tvm_version:
        d["tvm_version"] = tvm_version
    p = d["precisions"].setdefault(variant.precision, {"lowering": variant.lowering, "batches": {}})
    p["batches"][str(batch)] = {"variant": variant.to_json(), "measured": measured, "baseline": baseline,
                                "torch": torch, "gpu": gpu, "date": date or time.strftime("%Y-%m-%d"),
                                "source": source}
    votes: dict[str, list[float]] = {}
    for e in p["batches"].values():
        votes.setdefault(e["variant"]["lowering"], []).append((e.get("measured") or {}).get("p50_ms") or 0.0)
    p["lowering"] = min(votes, key=lambda lw: (-len(votes[lw]), sum(votes[lw])))
    p["batches"] = dict(sorted(p["batches"].items(), key=lambda kv: int(kv[0])))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(d, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path
