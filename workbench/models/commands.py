"""CLI: `workbench compile` and `workbench inspect`. Light at import: TVM is imported inside the commands."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 10**6, "mb": 10**6, "mib": 1024**2,
          "g": 10**9, "gb": 10**9, "gib": 1024**3}


def parse_bytes(text: str) -> int:
    """'16777216', '16MiB', '64 KiB' -> bytes."""
    from workbench.cli import UserError
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"invalid size {text!r}: use bytes (16777216) or a unit (16MiB, 64KiB)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_batch_sizes(text: str) -> list[int]:
    from workbench.cli import UserError
    try:
        sizes = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise UserError(f"invalid --batch-sizes {text!r}: use positive integers separated by commas, e.g. 1,2,4,8,16")
    return sizes


def resolve_source(model: str, seed: int = 0):
    """A ModelSource from a zoo name or an .onnx file."""
    from workbench.cli import UserError
    path = Path(model).expanduser()
    if model.lower().endswith(".onnx") or path.is_file():
        if path.suffix.lower() != ".onnx":
            raise UserError(f"unknown file type {str(path)!r}: pass a zoo model name or an .onnx file")
        if not path.is_file():
            raise UserError(f"ONNX file {str(path)!r} does not exist")
        from workbench.models import onnx_import
        try:
            return onnx_import.load(path)
        except ValueError as e:      # OnnxImportError and friends name the file and the fix
            raise UserError(str(e)) from None
    from workbench.models import zoo
    if model not in zoo.names():
        hint = " (or a path to an .onnx file)" if "/" not in model else ""
        raise UserError(f"unknown model {model!r}: valid zoo names are {', '.join(zoo.names())}{hint}")
    return zoo.get(model, seed=seed)


def parse_tuning(text: str | None, no_tuning: bool = False) -> str | None:
    """--tuning auto|none|DIR (and --no-tuning) -> compile_model's `tuning`: "auto", None or a directory."""
    from workbench.cli import UserError
    if no_tuning:
        if text not in (None, "auto", "none"):
            raise UserError(f"--no-tuning contradicts --tuning {text}: pass one of them")
        return None
    if text is None or text == "auto":
        return "auto"
    if text == "none":
        return None
    path = Path(text).expanduser()
    if not path.is_dir():
        raise UserError(f"--tuning {text!r}: no such tuning database directory; pass auto (data/tuning or "
                        f"$WORKBENCH_TUNING_DB), none, or a directory holding <target>-<arch>/<model>.json files")
    return str(path)


def _compile(args) -> int:
    from workbench.models.compiler import compile_model
    tuning = parse_tuning(args.tuning, args.no_tuning)
    source = resolve_source(args.model, args.seed)
    art = compile_model(source, args.out, batch_sizes=parse_batch_sizes(args.batch_sizes), target=args.target,
                        arch=args.arch, page_size=parse_bytes(args.page_size), overwrite=args.overwrite,
                        weights=args.weights, seed=args.seed, precompile_cubins=args.precompile_cubins,
                        cubin_cache_dir=args.cubin_cache, tuning=tuning, precision=args.precision,
                        progress=None if args.quiet else (lambda m: print(m, file=sys.stderr)))
    print(summary(art))
    return 0


def _inspect(args) -> int:
    from workbench.models.artifact import Artifact
    art = Artifact.open(args.dir, verify=not args.no_verify)
    if args.json:
        print(json.dumps(inspect_dict(art), indent=1))
    else:
        print(summary(art))
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 10_000 else f"{n} B"


def _binary(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def inspect_dict(art) -> dict:
    files = {p.name: p.stat().st_size for p in sorted(art.path.iterdir()) if p.is_file()}
    m = art.manifest
    return {
        "path": str(art.path), "name": art.name, "source": m["source"], "tvm_version": m["tvm_version"],
        "target": art.target, "arch": art.arch, "batch_sizes": list(art.batch_sizes),
        "inputs": [t.to_json() for t in art.inputs], "outputs": [t.to_json() for t in art.outputs],
        "weights": {"total_bytes": art.layout.total_bytes, "paged_bytes": art.layout.paged_bytes,
                    "page_size": art.page_size, "num_pages": art.num_pages, "num_tensors": len(art.tensors),
                    "runs": [list(r) for r in art.runs if r[1] > 1], "regenerable": art.weights_regenerable,
                    "sha256": m["weights"]["sha256"]},
        "per_batch": {b: {"io_bytes": art.io_bytes(b), "workspace_bytes": art.workspace_bytes(b),
                          "so_bytes": m["batches"][str(b)]["bytes"],
                          "compile_seconds": m["batches"][str(b)].get("compile_seconds")}
                      for b in art.batch_sizes},
        "files": files, "measurements": art.measurements,
        "precision": {b: (m["batches"][str(b)].get("variant") or {}).get("precision", "fp32")
                      for b in art.batch_sizes},
        "tuning": m.get("tuning"),
    }


def _tuning_line(d: dict) -> str:
    """What chose the kernels: TVM's defaults, a given variant, or the database (file, lowering, batches)."""
    precisions = sorted(set(d["precision"].values()))
    t = d["tuning"]
    if not t:
        return f"TVM default schedules, {'/'.join(precisions)}"
    if not t.get("database"):
        return f"given variant {json.dumps(t.get('variant'))[:120]}"
    src = ", ".join(f"b{b}<-b{e.get('from_batch')}" + (f" ({e['measured_p50_ms']:.2f} ms)" if e.get("measured_p50_ms")
                                                          else "") for b, e in (t.get("batches") or {}).items())
    return (f"{t['database']}: lowering {t.get('lowering')}, {'/'.join(precisions)}"
            + (f", asked for {t['requested']}" if t.get("requested") and t["requested"] != d["name"] else "")
            + f"; {src}")


def summary(art) -> str:
    d = inspect_dict(art)
    w = d["weights"]
    src = d["source"]
    src_text = src.get("origin", "?") + (f" (sha256 {src['sha256'][:12]}…)" if src.get("sha256") else "") \
        + (f", seed {src['seed']}" if "seed" in src else "")
    lines = [
        f"{d['name']}  ({d['path']})",
        f"  source     {src_text}",
        f"  target     {d['target']}{' ' + d['arch'] if d['arch'] else ''}   TVM {d['tvm_version']}",
        f"  kernels    {_tuning_line(d)}",
        "  inputs     " + ", ".join(f"{t['name']} {t['dtype']}[N, {', '.join(map(str, t['shape']))}]".replace(
            "[N, ]", "[N]") for t in d["inputs"]),
        "  outputs    " + ", ".join(f"{t['name']} {t['dtype']}[N, {', '.join(map(str, t['shape']))}]".replace(
            "[N, ]", "[N]") for t in d["outputs"]),
        f"  weights    {_mb(w['total_bytes'])} in {w['num_tensors']} tensors -> {w['num_pages']} pages of "
        f"{_binary(w['page_size'])} ({_mb(w['paged_bytes'])})"
        + (f"; runs {', '.join(f'{a}-{a + n - 1}' for a, n in w['runs'])}" if w["runs"] else "; no runs")
        + ("; synthetic (regenerable)" if w["regenerable"] else ""),
        "  batch   io bytes      workspace     .so         compile",
    ]
    for b, r in d["per_batch"].items():
        cs = r["compile_seconds"]
        lines.append(f"  {b:>5}   {_mb(r['io_bytes']):<12}  {_mb(r['workspace_bytes']):<12}  "
                     f"{_mb(r['so_bytes']):<10}  {'' if cs is None else f'{cs:.1f} s'}")
    lines.append("  files      " + ", ".join(f"{n} ({_mb(s)})" for n, s in d["files"].items()))
    if d["measurements"]:
        lines.append(f"  measured   {json.dumps(d['measurements'])[:200]}")
    return "\n".join(lines)


def register(sub) -> None:
    c = sub.add_parser("compile", help="compile a zoo model or an ONNX file into an artifact directory",
                       description="Compile MODEL (a zoo name or an .onnx file) ahead of time: one TVM shared "
                                   "object per batch size plus paged weights. CUDA compiles need no GPU.")
    c.add_argument("model", metavar="MODEL|file.onnx")
    c.add_argument("--out", required=True, help="artifact directory to create")
    c.add_argument("--batch-sizes", default="1,2,4,8,16", help="comma-separated (default 1,2,4,8,16)")
    c.add_argument("--target", choices=["cpu", "cuda"], default="cpu")
    c.add_argument("--arch", default="sm_90", help="CUDA arch for --target cuda (default sm_90)")
    c.add_argument("--page-size", default=str(16 * 1024 * 1024), help="weights page size, bytes or 16MiB")
    c.add_argument("--seed", type=int, default=0, help="seed of the zoo's (or synthetic) weights")
    c.add_argument("--weights", choices=["source", "synthetic"], default="source",
                   help="synthetic: seeded numpy weights that can be regenerated without the compiler")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    c.add_argument("--precompile-cubins", action="store_true",
                   help="--target cuda: also compile the kernels with NVRTC into the cubin cache now")
    c.add_argument("--cubin-cache", default=None, help="cubin cache directory (default $WORKBENCH_CUBIN_CACHE "
                                                       "or ~/.cache/workbench/cubin)")
    c.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="--target cuda: fp16 = fp16 matmul/conv inputs with fp32 accumulation and outputs (tensor "
                        "cores, like torch's fp16 autocast; outputs agree with fp32 to ~1e-2 of their scale). "
                        "Needs apache-tvm-ffi<0.1.15")
    c.add_argument("--tuning", default="auto", metavar="auto|none|DIR",
                   help="where kernel choices come from for --target cuda: auto (default) = the measured tuning "
                        "database in data/tuning (or $WORKBENCH_TUNING_DB); none = TVM's default schedules; DIR = "
                        "another database. A zoo model may switch to its conv lowering (e.g. resnet50-matmul)")
    c.add_argument("--no-tuning", action="store_true", help="same as --tuning none")
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=_compile)
    i = sub.add_parser("inspect", help="summarise an artifact directory")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.add_argument("--no-verify", action="store_true", help="skip the .so checksums")
    i.set_defaults(func=_inspect)
