"""Ahead-of-time compiler: ModelSource -> artifact directory (manifest.json, weights.bin, b{N}.so).

Needs the full TVM (tvm.relax); the run path (`runtime.py`) does not. CUDA compiles need no GPU: the .so then
carries CUDA source that `cubin_cache` compiles (once per machine) when the module is loaded on a GPU.

Workspace estimate (manifest `batches[b].workspace_bytes`): after the Relax pipeline has planned memory, the
function is a sequence of `R.vm.alloc_storage` / `R.vm.alloc_tensor` / `R.vm.kill_object` bindings. We replay
it in order: a storage is live from its allocation until neither it nor any tensor (or view) made from it is
referenced any more; the estimate is the peak of live storage bytes, not counting storage that backs an output
(counted in `io_bytes`), plus the largest sum of global-scope scratch buffers that any single kernel allocates
for itself (the CPU's fused kernels keep intermediates there; CUDA kernels use shared/local memory instead).
Each storage is rounded up to 256 bytes. This is an estimate of what a planned allocator needs per run, not a
measurement. TVM's pooled allocator reuses a freed block only for a request of the same (rounded) size, so after
one run it can hold up to the sum of all storage allocations: recorded as `workspace_alloc_bytes`, an upper
bound (see reference/h200-baseline.md: ResNet-50 b16 grew the pool by 616 MiB).
"""
from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from workbench.models.artifact import (ALIGNMENT, DEFAULT_PAGE_SIZE, FORMAT, FORMAT_VERSION, SYNTHETIC_GENERATOR,
                                       Artifact, ArtifactError, align_up, pack, publish, sha256_file, so_name,
                                       synthetic_weights, write_manifest, write_weights)
from workbench.models.source import ModelSource, TensorSpec

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)
_ARCH_RE = re.compile(r"^sm_(\d{2,3})[af]?$")


class CompileError(ArtifactError):
    """The model could not be compiled for the requested target (the message says which step and why)."""


# ---------------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------------

def check_arch(arch: str) -> str:
    """Validate a CUDA arch string like sm_90 (against NVRTC's supported list when NVRTC is installed)."""
    m = _ARCH_RE.match(arch or "")
    if not m:
        raise CompileError(f"invalid CUDA arch {arch!r}: use the form sm_XY, e.g. --arch sm_90 (H100/H200), "
                           f"sm_80 (A100), sm_89 (L4/L40)")
    try:
        from cuda.bindings import nvrtc
        err, archs = nvrtc.nvrtcGetSupportedArchs()
        if int(err) == 0 and archs and int(m.group(1)) not in archs:
            raise CompileError(f"CUDA arch {arch!r} is not supported by this NVRTC (supports "
                               f"{', '.join(f'sm_{a}' for a in archs)}): pick one of those with --arch")
    except ImportError:
        pass
    return arch


def make_target(target: str, arch: str | None = None):
    import tvm
    if target == "cpu":
        return tvm.target.Target("llvm")
    if target == "cuda":
        return tvm.target.Target({"kind": "cuda", "arch": check_arch(arch or "sm_90")}, host="llvm")
    raise CompileError(f"unknown target {target!r}: use --target cpu or --target cuda")


def lower(mod, tgt, variant=None, applied: dict | None = None, rules_used: dict | None = None):
    """Run the Relax pipeline tvm.compile would run (the CUDA one schedules kernels with dlight).

    variant (tuning.Variant, GPU targets): precision (fp16: ToMixedPrecision first; weights "fp16":
    schedules.keep_fp16_weights after it, so the function takes fp16 weights), kernel schedules
    (schedules.relax_pipeline) and relax's CUDA-graph rewrite; None or the default variant runs TVM's default
    pipeline unchanged. `applied` collects kernel name -> per-kernel choice used, `rules_used` kernel name ->
    the rule that scheduled it (both only when the variant's pipeline runs). Build the result with
    `build_relax` (its PassContext config is what the fp16 mma kernels need)."""
    import tvm
    from tvm import relax
    gpu = "gpu" in tgt.keys
    if variant is None or not gpu or (variant.is_default and not variant.schedule.kernels):
        pipeline = relax.get_default_pipeline(tgt) if gpu else relax.get_pipeline("default")
        with tgt:
            return pipeline(mod)
    from workbench.models import schedules
    mod = schedules.mixed_precision(mod, variant.precision, weights=variant.weights)
    pipeline = schedules.relax_pipeline(tgt, variant.schedule, applied, rules_used)
    with tvm.transform.PassContext(opt_level=3, config={"relax.backend.use_cuda_graph": bool(variant.cuda_graph)}):
        with tgt:
            return pipeline(mod)


def build_relax(low, tgt):
    """relax.build of a lowered module (see `lower`): the one place relax modules are built, so every CUDA
    build has the PassContext config the mma tensor-core schedule needs for its cp.async copies
    (tensorcore.PASS_CONFIG; kernels without async pipeline annotations compile exactly as without it)."""
    import tvm
    from tvm import relax
    from workbench.models.tensorcore import PASS_CONFIG
    if "gpu" not in tgt.keys:
        return relax.build(low, tgt, relax_pipeline=None)
    with tvm.transform.PassContext(opt_level=3, config=PASS_CONFIG):
        return relax.build(low, tgt, relax_pipeline=None)


# ---------------------------------------------------------------------------------------------------------
# IR inspection
# ---------------------------------------------------------------------------------------------------------

def _ty(expr):
    return expr.ty if hasattr(expr, "ty") else expr.struct_info


def _var_name(var) -> str:
    return var.name if hasattr(var, "name") else var.name_hint


def _tensor_sig(ty) -> tuple[tuple[int, ...], str]:
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        raise CompileError("a tensor with an unknown shape: only static shapes can be compiled ahead of time")
    try:
        return tuple(int(d) for d in shape.values), str(ty.dtype)
    except (TypeError, ValueError):
        raise CompileError(f"a tensor with a symbolic shape {shape}: only static shapes can be compiled") from None


def main_function(mod) -> tuple[str, object]:
    """The Relax function to serve: "main", or the only Relax function of the module."""
    from tvm import relax
    funcs = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, relax.Function)}
    if "main" in funcs:
        return "main", funcs["main"]
    if len(funcs) == 1:
        return next(iter(funcs.items()))
    raise CompileError(f"the module has no Relax function 'main' (it has {', '.join(sorted(funcs)) or 'none'})")


def output_types(func) -> list[tuple[tuple[int, ...], str]]:
    from tvm import relax
    ret = func.ret_ty if hasattr(func, "ret_ty") else func.ret_struct_info    # TVM 0.27 renamed it
    tuple_type = getattr(relax, "TupleType", None) or relax.TupleStructInfo
    fields = ret.fields if isinstance(ret, tuple_type) else [ret]
    return [_tensor_sig(f) for f in fields]


_VIEW_FUNCS = {"vm.builtin.reshape", "vm.builtin.make_tuple", "vm.builtin.tuple_getitem"}


def _storage_bytes(call) -> int:
    shape = call.args[0]
    return align_up(int(np.prod([int(v) for v in shape.values], dtype=np.int64)), ALIGNMENT)


def plan_peak_bytes(func) -> tuple[int, int]:
    """Replay a lowered Relax function's memory plan. Returns (peak live bytes of storage that does not back an
    output, total bytes of storage backing the outputs). Vars are keyed by identity: names repeat."""
    peak, out, _ = plan_memory(func)
    return peak, out


def plan_memory(func) -> tuple[int, int, int]:
    """(peak live non-output storage, output storage, total of every non-output storage allocation) in bytes."""
    from tvm import relax
    size: dict = {}                  # storage var -> bytes
    holders: dict = {}               # storage var -> vars referencing it (itself, tensors, views)
    backs: dict = {}                 # var -> storage vars it keeps alive

    def refs(expr) -> set:
        out: set = set()
        if isinstance(expr, relax.Var):
            out |= backs.get(expr, set())
        elif isinstance(expr, relax.Tuple):
            for f in expr.fields:
                out |= refs(f)
        elif isinstance(expr, relax.TupleGetItem):
            out |= refs(expr.tuple_value)
        return out

    events: list = []                # ("alloc"|"free", storage var) in program order
    for block in func.body.blocks:
        for binding in block.bindings:
            var, value = binding.var, binding.value
            op = getattr(value, "op", None)
            op_name = getattr(op, "name", None) or getattr(op, "global_symbol", None)
            if op_name == "relax.vm.alloc_storage":
                size[var] = _storage_bytes(value)
                holders[var] = {var}
                backs[var] = {var}
                events.append(("alloc", var))
            elif op_name == "relax.vm.alloc_tensor":
                st = refs(value.args[0])
                backs[var] = st
                for s in st:
                    holders[s].add(var)
            elif op_name == "relax.vm.kill_object":
                dead = value.args[0]
                for s in backs.pop(dead, set()) if isinstance(dead, relax.Var) else ():
                    holders[s].discard(dead)
                    if not holders[s]:
                        events.append(("free", s))
            elif op_name in _VIEW_FUNCS or isinstance(value, (relax.Var, relax.Tuple, relax.TupleGetItem)):
                args = value.args if hasattr(value, "args") else [value]
                st = set().union(*(refs(a) for a in args)) if args else set()
                if st:
                    backs[var] = st
                    for s in st:
                        holders[s].add(var)
    outputs = refs(func.body.body)
    live = peak = total = 0
    for kind, s in events:
        if s in outputs:
            continue
        live += size[s] if kind == "alloc" else -size[s]
        total += size[s] if kind == "alloc" else 0
        peak = max(peak, live)
    return peak, sum(size[s] for s in outputs), total


def kernel_scratch_bytes(mod) -> int:
    """Largest sum of global-scope buffers one kernel allocates in its root block (CPU fused intermediates)."""
    from tvm import tirx
    best = 0
    for _, f in mod.functions.items():
        if not isinstance(f, tirx.PrimFunc):
            continue
        block = getattr(f.body, "block", None)
        total = 0
        for buf in getattr(block, "alloc_buffers", []) or []:
            if buf.scope() not in ("global", ""):
                continue
            try:
                n = int(np.prod([int(d) for d in buf.shape], dtype=np.int64))
            except (TypeError, ValueError):
                continue
            total += align_up(n * max(1, buf.dtype.bits * buf.dtype.lanes // 8), ALIGNMENT)
        best = max(best, total)
    return best


def cuda_sources(executable) -> list[str]:
    """CUDA source of every cuda module in a built executable (before export)."""
    out: list[str] = []

    def walk(m):
        if m.kind == "cuda":
            out.append(m.inspect_source())
        for i in m.imports:
            walk(i)
    walk(executable.mod)
    return out


_KERNEL_NAME = re.compile(r"void\s+(?:__launch_bounds__\(\s*\d+\s*\)\s*)?(\w+)\s*\(")


def cuda_kernels(source: str) -> dict[str, str]:
    """The kernels a CUDA source (TVM codegen) defines: name -> text from its signature to the next kernel
    (forward declarations left out)."""
    out: dict[str, str] = {}
    for part in source.split('extern "C" __global__')[1:]:
        if "{" not in part.split(";")[0]:
            continue                                  # a forward declaration
        m = _KERNEL_NAME.search(part)
        if m:
            out[m.group(1)] = part
    return out


# ---------------------------------------------------------------------------------------------------------
# Compile
# ---------------------------------------------------------------------------------------------------------

def _check_batch_sizes(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    try:
        bs = tuple(sorted({int(b) for b in batch_sizes}))
    except (TypeError, ValueError):
        raise CompileError(f"batch sizes must be positive integers, got {batch_sizes!r}") from None
    if not bs or bs[0] < 1:
        raise CompileError(f"batch sizes must be positive integers, got {list(batch_sizes)!r}")
    return bs


def _source_info(source: ModelSource, seed: int | None) -> dict:
    info: dict = {"origin": source.origin}
    kind, _, rest = source.origin.partition(":")
    if kind == "zoo":
        info.update(kind="zoo", model=rest)
    elif kind == "onnx":
        info.update(kind="onnx", path=rest)
        if Path(rest).is_file():
            info["sha256"] = sha256_file(rest)
    else:
        info["kind"] = kind or "unknown"
    if seed is not None:
        info["seed"] = int(seed)
    return info


def _check_signature(where: str, func, inputs: Sequence[TensorSpec], b: int,
                     weights: Sequence[tuple[str, tuple[int, ...], str]]) -> None:
    params = [_tensor_sig(_ty(p)) for p in func.params]
    expected = [((b, *t.shape), t.dtype) for t in inputs] + [(tuple(s), d) for _, s, d in weights]
    if len(params) != len(expected):
        raise CompileError(f"{where}: the function takes {len(params)} parameters, but the source lists "
                           f"{len(inputs)} input(s) + {len(weights)} weight(s)")
    names = [t.name for t in inputs] + [n for n, _, _ in weights]
    for i, (got, want) in enumerate(zip(params, expected)):
        if got != want:
            raise CompileError(f"{where}: parameter {i} ({names[i]}) is {got[1]}{list(got[0])}, the source says "
                               f"{want[1]}{list(want[0])}")


def resolve_tuning(source: ModelSource, batch_sizes: Sequence[int], target: str, arch: str,
                   tuning="auto", precision: str = "fp32", variant=None):
    """(source, {batch: Variant or None}, manifest record or None): what `compile_model` compiles.

    variant (tuning.Variant): use it for every batch size (the database is not read). Otherwise, for a zoo
    model and `tuning` "auto" (data/tuning or $WORKBENCH_TUNING_DB) or a database directory, the database's
    variants for (model, target/arch, precision); a zoo model asked for in its default (direct) form is
    switched to the lowering the database found fastest (the artifact is then named e.g. resnet50-matmul: its
    weights are laid out for that lowering). Variants with projections "fused" give the source with them fused
    (`with_projections`). tuning None/False/"none": TVM's default pipeline (and `precision`).
    Variants and fp16 are CUDA-only (the CPU pipeline compiles fp32 with TVM's defaults)."""
    from workbench.models import tuning as tdb
    if precision not in ("fp32", "fp16"):
        raise CompileError(f"unknown precision {precision!r}: use fp32 or fp16")
    if precision != "fp32" and target != "cuda":
        raise CompileError(f"precision {precision} is for --target cuda only: the {target} pipeline compiles fp32")
    if isinstance(tuning, str) and tuning.lower() in ("none", "off"):
        tuning = None
    if variant is not None:
        if not isinstance(variant, tdb.Variant):
            raise CompileError(f"variant must be a workbench.models.tuning.Variant, got {type(variant).__name__}")
        if target != "cuda":
            raise CompileError(f"compile variants are for --target cuda only, not {target!r}")
        return (with_projections(source, variant.projections), {b: variant for b in batch_sizes},
                {"variant": variant.to_json(), "database": None})
    fallback = tdb.Variant(precision=precision) if precision != "fp32" else None
    kind, _, name = source.origin.partition(":")
    if not tuning or kind != "zoo":
        return source, {b: fallback for b in batch_sizes}, None
    from workbench.models import zoo
    base, lowering = zoo.split_name(name)
    directory = None if tuning == "auto" or tuning is True else tuning
    if directory is not None and not Path(directory).is_dir():
        raise CompileError(f"tuning database directory {directory} does not exist: pass an existing directory, "
                           f"'auto' (data/tuning) or None")
    zinfo = (source.architecture or {}).get("zoo") or {}
    explicit = lowering != "direct" or not zinfo          # a lowering asked for by name, or cannot re-get
    p = tdb.plan(base, target, arch if target == "cuda" else None, batch_sizes, precision,
                 lowering=lowering if explicit else None, directory=directory)
    if p is None:
        if fallback is not None and lowering != "direct":
            fallback = tdb.Variant(lowering=lowering, precision=precision)
        return source, {b: fallback for b in batch_sizes}, None
    if p.lowering != lowering:
        source = zoo.get(base, seed=int(zinfo.get("seed", 0)), conv=p.lowering)
    source = with_projections(source, next(iter(p.variants.values())).projections)   # (one for all: tuning.plan)
    record = p.to_json()
    record["requested"] = name
    return source, dict(p.variants), record


def with_projections(source: ModelSource, projections: str) -> ModelSource:
    """`source` in the weights layout of a variant's `projections` ("fused": projections.fused)."""
    if projections == "separate":
        return source
    from workbench.models import projections as proj
    try:
        return proj.fused(source)
    except proj.ProjectionError as e:
        raise CompileError(f"tuning: variant projections {projections!r}: {e}") from None


def compile_model(source: ModelSource, out_dir: str | Path, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                  target: str = "cpu", arch: str = "sm_90", page_size: int = DEFAULT_PAGE_SIZE,
                  overwrite: bool = False, weights: str = "source", seed: int | None = None,
                  precompile_cubins: bool = False, cubin_cache_dir: str | Path | None = None,
                  progress: Callable[[str], None] | None = None, tuning="auto", precision: str = "fp32",
                  variant=None) -> Artifact:
    """Compile `source` for every batch size into the artifact directory `out_dir` and return it opened.

    target: "cpu" (llvm, generic x86-64) or "cuda" ({"kind": "cuda", "arch": arch}, host llvm; no GPU needed).
    weights: "source" (the model's own weights) or "synthetic" (a seeded numpy generator: weights.bin can then
    be regenerated anywhere, see artifact.regenerate_weights). The artifact is built in a temporary directory
    beside out_dir and renamed into place, so a failed compile leaves nothing behind.
    tuning / precision / variant: how kernels are chosen (see `resolve_tuning`); the manifest's "tuning"
    records what was applied (None: TVM's default pipeline).
    Weights are written in the dtypes the compiled function takes them in: the source's, or float16 where the
    variant says weights "fp16" (schedules.keep_fp16_weights: manifest tensors[].dtype "float16", half the
    bytes and pages); every batch size must agree, since weights.bin serves them all.
    """
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists: pass overwrite=True (--overwrite) to replace it, or choose "
                            f"another --out")
    bs = _check_batch_sizes(batch_sizes)
    if weights not in ("source", "synthetic"):
        raise CompileError(f"weights must be 'source' or 'synthetic', got {weights!r}")
    if target == "cuda":
        check_arch(arch)
    tgt = make_target(target, arch)
    if not isinstance(page_size, int) or page_size < ALIGNMENT or page_size % ALIGNMENT:
        raise CompileError(f"page size {page_size!r} must be a positive multiple of {ALIGNMENT} bytes")
    say = progress or (lambda msg: None)
    try:
        source, variants, tuning_record = resolve_tuning(source, bs, target, arch, tuning, precision, variant)
    except ArtifactError:
        raise
    except ValueError as e:               # ScheduleError and friends: a bad variant
        raise CompileError(f"tuning: {e}") from None
    if tuning_record is not None:
        say(f"tuned variants from {tuning_record['database'] or 'the given variant'}: "
            + ", ".join(f"b{b} {v.describe()}" for b, v in variants.items() if v is not None))

    import tvm
    from tvm import relax

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        specs = [(n, tuple(int(d) for d in a.shape), str(a.dtype)) for n, a in source.weights()]
        stored: list[str] | None = None          # the weight dtypes the compiled functions take
        batches: dict[str, dict] = {}
        outputs_per_sample: list[TensorSpec] | None = None
        function_name = "main"
        cubins: dict[str, list[str]] = {}
        for b in bs:
            where = f"{source.name} batch {b} ({target}{'/' + arch if target == 'cuda' else ''})"
            say(f"compiling {where}")
            t0 = time.perf_counter()
            try:
                mod = source.make_module(b)
                function_name, func = main_function(mod)
                _check_signature(where, func, source.inputs, b, specs)
                outs = output_types(func)
                applied: dict = {}
                low = lower(mod, tgt, variants.get(b), applied)
                dtypes = _weight_dtypes(where, low[function_name], len(source.inputs), specs)
                if stored is not None and dtypes != stored:
                    raise CompileError(f"{where}: takes weights in dtypes {_dtype_counts(dtypes)}, batch {bs[0]} "
                                       f"in {_dtype_counts(stored)}; one weights.bin serves every batch size: "
                                       f"give every batch size the same variant weights setting")
                stored = dtypes
                peak, _, alloc_total = plan_memory(low[function_name])
                scratch = kernel_scratch_bytes(low)
                workspace = peak + scratch
                ex = build_relax(low, tgt)
                so = tmp / so_name(b)
                ex.export_library(str(so))
            except ArtifactError:
                raise
            except Exception as e:  # noqa: BLE001 - TVM raises many types; report which step failed
                raise CompileError(f"compiling {where} failed: {type(e).__name__}: {str(e).strip()[:2000]}") \
                    from e
            seconds = time.perf_counter() - t0
            out_specs = []
            for i, (shape, dtype) in enumerate(outs):
                if not shape or shape[0] != b:
                    raise CompileError(f"{where}: output {i} has shape {list(shape)}, without the batch ({b}) "
                                       f"on axis 0; every output must be batched")
                out_specs.append(TensorSpec("output" if len(outs) == 1 else f"output{i}", shape[1:], dtype))
            if outputs_per_sample is None:
                outputs_per_sample = out_specs
            elif outputs_per_sample != out_specs:
                raise CompileError(f"{where}: outputs {out_specs} differ from batch {bs[0]}'s {outputs_per_sample}")
            sources = cuda_sources(ex) if target == "cuda" else []
            entry = {
                "file": so.name, "sha256": sha256_file(so), "bytes": so.stat().st_size,
                "inputs": [{"name": t.name, "shape": [b, *t.shape], "dtype": t.dtype} for t in source.inputs],
                "outputs": [{"name": t.name, "shape": [b, *t.shape], "dtype": t.dtype} for t in out_specs],
                "io_bytes": b * (sum(t.nbytes for t in source.inputs) + sum(t.nbytes for t in out_specs)),
                "workspace_bytes": int(workspace),
                "workspace_alloc_bytes": int(alloc_total + scratch),
                "compile_seconds": round(seconds, 3),
            }
            if variants.get(b) is not None:
                entry["variant"] = variants[b].to_json()
                entry["variant"]["schedule"].pop("kernels", None)
                entry["tuned_kernels"] = len(applied)
            if sources:
                entry["cuda_source_sha256"] = [hashlib.sha256(s.encode()).hexdigest() for s in sources]
                cubins[str(b)] = sources
            batches[str(b)] = entry
            say(f"  {so.name}: {entry['bytes'] / 1e6:.2f} MB in {seconds:.1f} s")
        layout, wmeta = _write_weights(tmp / "weights.bin", source, specs, stored or [d for _, _, d in specs],
                                       weights, seed, page_size)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "name": source.name,
            "source": _source_info(source, seed),
            "tvm_version": tvm.__version__,
            "target": target, "target_str": str(tgt), "arch": arch if target == "cuda" else None,
            "function": function_name,
            "batch_sizes": list(bs),
            "inputs": [t.to_json() for t in source.inputs],
            "outputs": [t.to_json() for t in outputs_per_sample or []],
            "batches": batches,
            "weights": {**layout.to_json(), **wmeta,
                        "generator": ({"name": SYNTHETIC_GENERATOR, "seed": int(seed or 0)}
                                      if weights == "synthetic" else None)},
            "architecture": _jsonable(source.architecture),
            "tuning": _tuning_summary(tuning_record),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_manifest(tmp, manifest)
        if precompile_cubins and cubins:
            from workbench.models.cubin_cache import CubinCache
            cache = CubinCache(cubin_cache_dir)
            for b, srcs in cubins.items():
                for s in srcs:
                    say(f"precompiling cubin for batch {b} ({arch})")
                    cache.get_or_compile(s, arch)
        publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Artifact.open(out)


def _weight_dtypes(where: str, func, num_inputs: int, specs: Sequence[tuple[str, tuple[int, ...], str]]) -> list[str]:
    """The dtypes a lowered function takes its weights in; only the dtype may differ from the source's (float32
    -> float16: schedules.keep_fp16_weights)."""
    got = [_tensor_sig(_ty(p)) for p in list(func.params)[num_inputs:]]
    if len(got) != len(specs):
        raise CompileError(f"{where}: the lowered function takes {len(got)} weights, the source has {len(specs)}")
    for (shape, dtype), (name, want_shape, want_dtype) in zip(got, specs):
        if shape != tuple(want_shape) or (dtype != want_dtype and (want_dtype, dtype) != ("float32", "float16")):
            raise CompileError(f"{where}: the lowered function takes weight {name} as {dtype}{list(shape)}, the "
                               f"source has {want_dtype}{list(want_shape)}")
    return [d for _, d in got]


def _dtype_counts(dtypes: Sequence[str]) -> str:
    return ", ".join(f"{dtypes.count(d)} {d}" for d in sorted(set(dtypes)))


def _write_weights(path: Path, source: ModelSource, specs: Sequence[tuple[str, tuple[int, ...], str]],
                   dtypes: Sequence[str], weights: str, seed: int | None, page_size: int):
    """Pack and write weights.bin with every weight in `dtypes` (the compiled function's); (layout, meta).
    Synthetic weights are generated in those dtypes, as artifact.regenerate_weights does from the manifest."""
    stored = [(n, s, d) for (n, s, _), d in zip(specs, dtypes)]
    if weights == "source":
        arrays = []
        for (name, _, _), (_, a), d in zip(specs, source.weights(), dtypes):
            if str(a.dtype) != d:
                finite = np.isfinite(a)
                with np.errstate(over="ignore"):           # checked here, with the weight's name
                    cast = a.astype(d)
                if not np.isfinite(cast[finite]).all():
                    raise CompileError(f"weight {name} has values beyond {d}'s range (max |w| "
                                       f"{float(np.abs(a[finite]).max()):.3g}): compile it with the variant's "
                                       f"weights \"fp32\"")
                a = cast
            arrays.append(a)
    else:
        arrays = synthetic_weights(seed or 0, stored)
    layout = pack(stored, page_size)
    return layout, write_weights(path, layout, arrays)


def _tuning_summary(record: dict | None) -> dict | None:
    """The manifest's record of tuning: where the variants came from, without the per-kernel maps (their
    count per batch is in batches[b].tuned_kernels)."""
    if record is None:
        return None
    out = {k: v for k, v in record.items() if k != "batches"}
    if "batches" in record:
        out["batches"] = {b: {k: v for k, v in e.items() if k != "variant"} for b, e in record["batches"].items()}
    if "variant" in out:
        out["variant"] = {**out["variant"], "schedule": {k: v for k, v in out["variant"]["schedule"].items()
                                                         if k != "kernels"}}
    return out


def _jsonable(x):
    """Architecture summaries may hold numpy scalars/tuples: make them JSON-safe."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
