"""Per-kernel GPU time of whole models: where an inference's time goes, kernel by kernel, with the rule that
scheduled each kernel.

HERE (CPU, full TVM; fp16 needs the tvm-ffi of schedules.check_tensorize_support):

    PYTHONPATH=.gpu/tvm-ffi-0.1.14 python -m bench.kernel_breakdown build \\
        --models resnet50:matmul:16:fp16,resnet50:matmul:1:fp16,bert_base:direct:16:fp16 --out .gpu/kbd

compiles each model variant exactly as `workbench compile` does (compiler.lower + build_relax) into
<out>/<id>.so and records in <out>/manifest.json, per kernel (PrimFunc the VM calls): the rule that scheduled
it (compiler.lower's rules_used: mma, dlight_matmul, gemv, reduction, small_reduction, injective,
general_reduction, fallback; or a per-kernel choice of the spec), its buffer shapes, FLOPs (2 x the iteration
space of its reduction blocks) and bytes (all its buffers once), the device kernels it launches, whether they
use mma.sync/wmma, how many times the model calls it, and whether every call reads only weights (work that
could be done once at load). Which variants:
- `--models model:lowering:batch:precision,...`: `tuning.Variant(lowering, precision)` with the default
  schedule settings (id e.g. resnet50-matmul_b16_fp16);
- `--models model:batch:tuned:precision,...` (e.g. resnet50:16:tuned:fp16): the tuning database's variant for
  that batch, what `workbench compile --precision fp16` gives (--tuning-db DIR; default data/tuning or
  $WORKBENCH_TUNING_DB; id e.g. resnet50-matmul_b16_fp16-tuned);
- `--variants FILE [--ids ID,...]`: variants from a JSON file: bench.build_kernel_candidates' manifest.json
  (its candidates, ids as there: e.g. the round-8 ones) or a list of {"model", "batch", "variant"[, "label"]}:

    PYTHONPATH=.gpu/tvm-ffi-0.1.14 python -m bench.kernel_breakdown build --variants .gpu/kq8/manifest.json \\
        --ids resnet50-matmul_b16_fp16-sr256-inj8-mma-act16-w16 --out .gpu/kbd8

ON THE GPU (runtime-only TVM, cupy; carry=['.device-site', '.gpu/kbd']):

    PYTHONPATH=$PWD/.device-site:$PWD TVM_USE_RUNTIME_LIB=1 python3 -m bench.kernel_breakdown run \\
        --dir .gpu/kbd --out $OUT

NVRTC compiles every source first (parallel processes, cubin cache); then per model, on synthetic inputs and
weights: (1) the whole model through the relax VM (p50 of CUDA events around a call, the usual way); (2) each
kernel alone, taken from the model's own .so (`get_function(name, query_imports=True)`: the very code the VM
runs) on random buffers, timed by kernel_quality.time_kernel (a CUDA graph of back-to-back launches, p50 of 5
replays) and multiplied by its call count; (3) the model once more with a VM instrument recording CUDA events
around every call (in-model time per call; the host runs the Python instrument between calls, so each interval
also holds the launch latency, and the inputs are the model's real intermediates, L2 state included). Writes
<out>/kernel_breakdown.json and .md: per model the top kernels, the time per rule, and the sums against the
whole-model time (the difference is what is not kernel time: launch gaps, VM interpretation, allocation).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ARCH = "sm_90"
FORMAT = "workbench-kernel-breakdown"
DEFAULT_MODELS = "resnet50:matmul:16:fp16,resnet50:matmul:1:fp16,bert_base:direct:16:fp16"
# schedules.default_rules' rule classes -> the names this report uses
RULE_LABELS = {"MmaMatmul": "mma", "ConfiguredMatmul": "dlight_matmul", "Matmul": "dlight_matmul",
               "GEMV": "gemv", "Reduction": "reduction", "SmallReduction": "small_reduction",
               "GeneralReduction": "general_reduction", "Fallback": "fallback", "InjectiveVectorize": "injective",
               "InjectiveRows": "injective_rows", "RowReduction": "row_reduction", "SplitKSum": "split_k_sum"}
WEIGHT_SCALE = 0.05                 # synthetic weights ~ N(0, 0.05^2): keeps deep fp16 models finite


@dataclass(frozen=True)
class Spec:
    """One model variant to break down: zoo model, conv lowering, batch size, precision, and the whole
    tuning.Variant JSON when it is not the default schedule of (lowering, precision) (label: the id's suffix)."""
    model: str
    lowering: str
    batch: int
    precision: str
    variant: dict | None = None
    label: str | None = None

    @classmethod
    def parse(cls, text: str, tuning_db: str | None = None) -> "Spec":
        parts = text.strip().split(":")
        tuned = len(parts) == 4 and parts[2] == "tuned"
        if len(parts) != 4:
            raise SystemExit(f"--models entry {text!r}: use model:lowering:batch:precision, e.g. "
                             f"resnet50:matmul:16:fp16, or model:batch:tuned:precision, e.g. resnet50:16:tuned:fp16")
        model, lowering, b, precision = (parts[0], None, parts[1], parts[3]) if tuned else parts
        try:
            batch = int(b)
        except ValueError:
            raise SystemExit(f"--models entry {text!r}: batch {b!r} is not an integer") from None
        if batch < 1:
            raise SystemExit(f"--models entry {text!r}: batch must be >= 1")
        if not tuned:
            return cls(model, lowering, batch, precision)
        from workbench.models import tuning
        try:
            plan = tuning.plan(model, "cuda", ARCH, [batch], precision, directory=tuning_db)
        except (tuning.TuningError, ValueError) as e:
            raise SystemExit(f"--models entry {text!r}: {e}") from None
        if plan is None:
            raise SystemExit(f"--models entry {text!r}: the tuning database {tuning.db_dir(tuning_db)} has no "
                             f"{precision} entry for {model} on cuda-{ARCH}: use model:lowering:batch:precision")
        v = plan.variants[batch]
        return cls(model, v.lowering, batch, v.precision, v.to_json(), f"{precision}-tuned")

    @classmethod
    def from_variant(cls, model: str, batch: int, variant: dict, label: str | None, where: str) -> "Spec":
        """A spec for a tuning.Variant JSON (validated here, so a bad file fails before any compile)."""
        from workbench.models.tuning import Variant
        try:
            v = Variant.from_json(variant)
        except ValueError as e:
            raise SystemExit(f"{where}: {e}") from None
        if not isinstance(batch, int) or batch < 1:
            raise SystemExit(f"{where}: batch must be a positive integer, got {batch!r}")
        return cls(str(model), v.lowering, batch, v.precision, v.to_json(), label or "variant")

    @property
    def id(self) -> str:
        return (f"{self.model}{'-matmul' if self.lowering == 'matmul' else ''}_b{self.batch}_"
                f"{self.label or self.precision}")

    def tuning_variant(self):
        from workbench.models.tuning import Variant
        return Variant.from_json(self.variant) if self.variant is not None else \
            Variant(lowering=self.lowering, precision=self.precision)


def read_variants(path: str, ids: list[str] | None = None) -> list[Spec]:
    """Specs from a JSON file: bench.build_kernel_candidates' manifest.json (its "candidates") or a list of
    {"model", "batch", "variant"[, "label"]}; only those whose id is in `ids` if given (each must exist)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--variants {path}: cannot read it as JSON ({e})") from None
    entries = doc.get("candidates") if isinstance(doc, dict) else doc
    if not isinstance(entries, list):
        raise SystemExit(f"--variants {path}: expected a list of {{model, batch, variant}} or a candidates "
                         f"manifest (bench.build_kernel_candidates), got {type(doc).__name__}")
    specs = []
    for i, e in enumerate(entries):
        where = f"--variants {path} entry {i}"
        if not isinstance(e, dict) or not {"model", "batch", "variant"} <= set(e):
            raise SystemExit(f"{where}: needs model, batch and variant")
        specs.append(Spec.from_variant(e["model"], e["batch"], e["variant"], e.get("label"), where))
    if ids:
        by_id = {s.id: s for s in specs}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise SystemExit(f"--ids: {', '.join(missing)} not in {path} (it has {', '.join(sorted(by_id))})")
        specs = [by_id[i] for i in ids]
    return specs


# ---------------------------------------------------------------------------------------------------------
# build (CPU, full TVM)
# ---------------------------------------------------------------------------------------------------------

def _dtype_bytes(dtype: str) -> int:
    m = re.search(r"(\d+)$", dtype)
    return max(1, int(m.group(1)) // 8) if m else 4


def reduction_flops(func) -> int:
    """2 x the iteration space of every block with a reduction axis (a matmul's 2*M*N*K)."""
    import tvm_ffi
    from tvm import s_tir
    total = [0]

    def visit(block):
        ivs = list(block.iter_vars)
        if any(int(iv.iter_type) == 2 for iv in ivs):        # IterVar.CommReduce
            n = 1
            for iv in ivs:
                try:
                    n *= int(iv.dom.extent)
                except (TypeError, ValueError):
                    return
            total[0] += 2 * n

    tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, visit)], order="post")
    return total[0]


def call_counts(func, kernel_names: set[str], num_inputs: int) -> tuple[dict, dict, dict]:
    """From a lowered relax function: kernel name -> calls, kernel name -> calls reading only weights (every
    tensor argument but the last, the output, is a weight parameter), and builtin/op name -> calls."""
    from tvm import relax
    weights = {p for p in list(func.params)[num_inputs:]}
    calls: dict[str, int] = {}
    weight_only: dict[str, int] = {}
    builtins: dict[str, int] = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not isinstance(value, relax.Call):
                continue
            op = value.op
            if isinstance(op, relax.GlobalVar) and op.name_hint in kernel_names:
                name = op.name_hint
                calls[name] = calls.get(name, 0) + 1
                ins = [a for a in value.args[:-1] if isinstance(a, relax.Var)]
                if ins and all(a in weights for a in ins):
                    weight_only[name] = weight_only.get(name, 0) + 1
            else:
                name = getattr(op, "global_symbol", None) or getattr(op, "name", None) or \
                    getattr(op, "name_hint", None) or type(op).__name__
                builtins[str(name)] = builtins.get(str(name), 0) + 1
    return calls, weight_only, builtins


def device_kernels(sources: list[str]) -> dict[str, dict]:
    """CUDA kernel name -> whether its body uses mma.sync / wmma (TVM names them <PrimFunc>_kernel[_N])."""
    from workbench.models.compiler import cuda_kernels
    return {name: {"mma_sync": "mma.sync" in body, "wmma": "wmma::" in body}
            for src in sources for name, body in cuda_kernels(src).items()}


def _launched_by(name: str, dev_kernels: dict[str, dict]) -> list[str]:
    pre = name + "_kernel"
    return sorted(k for k in dev_kernels if k == pre or (k.startswith(pre + "_") and k[len(pre) + 1:].isdigit())
                  or (k.startswith(pre) and k[len(pre):].isdigit()))


def build_one(spec: Spec, out: Path, force: bool = False) -> dict:
    """Compile one model variant as `workbench compile` would; return (and write) its manifest entry."""
    meta_path = out / f"{spec.id}.json"
    if meta_path.is_file() and not force:
        return json.loads(meta_path.read_text())
    from tvm import tirx
    from workbench.models import schedules, zoo
    from workbench.models.compiler import (_tensor_sig, _ty, build_relax, cuda_sources, lower, main_function,
                                           make_target, with_projections)
    variant = spec.tuning_variant()
    tgt = make_target("cuda", ARCH)
    src = with_projections(zoo.get(spec.model, seed=0, conv=spec.lowering if spec.lowering != "direct" else None),
                           variant.projections)
    t0 = time.perf_counter()
    mod = src.make_module(spec.batch)
    fname, _ = main_function(mod)
    applied: dict = {}
    rules_used: dict[str, str] = {}
    low = lower(mod, tgt, variant, applied, rules_used)
    ex = build_relax(low, tgt)
    out.mkdir(parents=True, exist_ok=True)
    so = out / f"{spec.id}.so"
    ex.export_library(str(so))
    compile_s = time.perf_counter() - t0
    sources = cuda_sources(ex)
    # the unscheduled kernels (the same fusion passes the pipeline ran) give each name its kernel_key
    fused = schedules.fuse_variant(src.make_module(spec.batch), tgt, variant)
    unscheduled = {gv.name_hint: f for gv, f in fused.functions_items() if isinstance(f, tirx.PrimFunc)}
    prims = {gv.name_hint: f for gv, f in low.functions_items() if isinstance(f, tirx.PrimFunc)}
    main = low[fname]
    calls, weight_only, builtins = call_counts(main, set(prims), len(src.inputs))
    dev = device_kernels(sources)
    kernels = []
    for name in sorted(prims):
        f = prims[name]
        params = []
        for p in f.params:                  # TVM 0.27: a buffer parameter is a tensor-typed Var
            try:
                params.append([[int(d) for d in p.shape], str(p.dtype)])
            except (AttributeError, TypeError, ValueError):
                params = None                   # scalar or symbolic: not measurable alone
                break
        base = unscheduled.get(name)
        key = schedules.kernel_key(base) if base is not None else None
        if name in applied:
            rule = "choice:" + str(applied[name].get("rule"))
        elif name in rules_used:
            rule = RULE_LABELS.get(rules_used[name], rules_used[name])
        else:
            rule = "unknown"
        launched = _launched_by(name, dev)
        kernels.append({
            "name": name, "key": key, "rule": rule, "params": params,
            "outputs": schedules._written_params(base if base is not None else f),
            "calls": calls.get(name, 0), "weight_only_calls": weight_only.get(name, 0),
            "flops": reduction_flops(base) if base is not None else None,
            "bytes": sum(int(np.prod(s, dtype=np.int64)) * _dtype_bytes(d) for s, d in params) if params else None,
            "device_kernels": launched,
            "tensor_core": ("mma.sync" if any(dev[k]["mma_sync"] for k in launched) else
                            "wmma" if any(dev[k]["wmma"] for k in launched) else None)})
    meta = {"id": spec.id, "model": spec.model, "lowering": spec.lowering, "batch": spec.batch,
            "precision": spec.precision, "variant": variant.to_json(), "so": so.name, "function": fname,
            "num_inputs": len(src.inputs),
            "signature": [[list(s), d] for s, d in (_tensor_sig(_ty(p)) for p in main.params)],
            "cuda_source_sha256": [hashlib.sha256(s.encode()).hexdigest() for s in sources],
            "kernels": kernels, "kernel_calls": sum(calls.values()), "builtin_calls": builtins,
            "device_kernel_count": len(dev), "compile_s": round(compile_s, 2), "so_bytes": so.stat().st_size}
    meta_path.write_text(json.dumps(meta) + "\n")
    return meta


def build(specs: list[Spec], out: Path, force: bool = False) -> dict:
    import tvm
    import tvm_ffi
    entries = []
    for i, s in enumerate(specs):
        t0 = time.perf_counter()
        m = build_one(s, out, force)
        entries.append(m)
        rules: dict[str, int] = {}
        for k in m["kernels"]:
            rules[k["rule"]] = rules.get(k["rule"], 0) + k["calls"]
        print(f"[{i + 1}/{len(specs)}] {m['id']}: {len(m['kernels'])} kernels, {m['kernel_calls']} calls "
              f"{rules}, {m['so_bytes'] / 1e6:.1f} MB ({time.perf_counter() - t0:.1f} s)", flush=True)
    manifest = {"format": FORMAT, "version": 1, "arch": ARCH, "tvm_version": tvm.__version__,
                "tvm_ffi_version": tvm_ffi.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "models": [m["id"] for m in entries]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return {"manifest": manifest, "models": entries}


def load_dir(d: Path) -> tuple[dict, list[dict]]:
    from bench.worker_common import read_build_manifest
    manifest = read_build_manifest(d, FORMAT, "kernel_breakdown")
    return manifest, [json.loads((d / f"{i}.json").read_text()) for i in manifest["models"]]


# ---------------------------------------------------------------------------------------------------------
# run (GPU, runtime-only TVM)
# ---------------------------------------------------------------------------------------------------------

def synthetic_args(meta: dict, stream, seed: int = 0) -> list:
    """Inputs N(0,1) (integer inputs: 0, a valid token id) and weights N(0, WEIGHT_SCALE^2), as TVM tensors."""
    import cupy
    import tvm
    rng = cupy.random.default_rng(seed)
    out, keep = [], []
    with stream:
        for i, (shape, dtype) in enumerate(meta["signature"]):
            if not dtype.startswith("float"):
                a = cupy.zeros(tuple(shape), dtype=dtype)
            else:
                a = rng.standard_normal(size=tuple(shape), dtype=cupy.float32)
                a = (a if i < meta["num_inputs"] else a * WEIGHT_SCALE).astype(dtype)
            keep.append(a)
    stream.synchronize()
    out = [tvm.runtime.from_dlpack(a) for a in keep]
    return keep, out


def whole_model(fn, args, stream, dev, reps: int) -> dict:
    import tvm_ffi
    from bench.kernel_quality import summary, time_events
    holder = {}

    def call():
        with tvm_ffi.use_raw_stream(dev, stream.ptr):
            holder["out"] = fn(*args)

    for _ in range(5):
        call()
    stream.synchronize()
    h0 = time.perf_counter()
    for _ in range(5):
        call()
    host = (time.perf_counter() - h0) / 5 * 1e3
    stream.synchronize()
    res = summary(time_events(stream, call, reps))
    res["host_call_ms"] = round(host, 3)
    holder.clear()
    return res


def in_model_profile(mod, meta: dict, args, stream, dev, runs: int = 3) -> dict:
    """Per-call GPU intervals inside the model: a VM instrument records a CUDA event before and after every
    call the VM makes. Returns name -> {"calls": per run, "us": median over runs of the summed intervals}."""
    import cupy
    import tvm_ffi
    from tvm.runtime.vm import VirtualMachine
    vm = VirtualMachine(mod, dev)
    fn = vm[meta["function"]]
    pool = [cupy.cuda.Event() for _ in range(8192)]
    marks: list[tuple[str, int, int]] = []
    state = {"i": 0, "open": []}

    def instrument(func, symbol, before, ret, *a):
        i = state["i"]
        if before:
            pool[i % len(pool)].record(stream)
            state["open"].append((str(symbol), i))
        else:
            name, j = state["open"].pop()
            pool[i % len(pool)].record(stream)
            marks.append((name, j, i))
        state["i"] = i + 1
        return 0

    vm.set_instrument(tvm_ffi.convert(instrument))
    per_run: list[dict[str, list[float]]] = []
    for _ in range(runs):
        marks.clear()
        state["i"] = 0
        with tvm_ffi.use_raw_stream(dev, stream.ptr):
            fn(*args)
        stream.synchronize()
        if state["i"] > len(pool):
            raise RuntimeError(f"{state['i'] // 2} VM calls: more than the {len(pool) // 2} event pairs")
        got: dict[str, list[float]] = {}
        for name, j, i in marks:
            got.setdefault(name, []).append(cupy.cuda.get_elapsed_time(pool[j], pool[i]) * 1e3)
        per_run.append(got)
    names = set().union(*per_run)
    out = {}
    for n in names:
        sums = [sum(r.get(n, [])) for r in per_run]
        out[n] = {"calls": len(per_run[-1].get(n, [])), "us": float(np.median(sums))}
    del vm, fn
    return out


def run_model(root: Path, meta: dict, arch: str, reps: int, deadline_left) -> dict:
    import cupy
    import tvm
    from tvm.runtime.vm import VirtualMachine
    from bench.kernel_quality import kernel_args, time_kernel
    from workbench.models import cubin_cache
    dev = tvm.cuda(0)
    stream = cupy.cuda.Stream(non_blocking=True)
    res: dict = {"id": meta["id"], "model": meta["model"], "batch": meta["batch"], "precision": meta["precision"],
                 "lowering": meta["lowering"], "kernel_calls": meta["kernel_calls"],
                 "builtin_calls": meta["builtin_calls"], "errors": []}
    t0 = time.perf_counter()
    with cubin_cache.compiling_for(arch):
        mod = tvm.runtime.load_module(str(root / meta["so"]))
        vm = VirtualMachine(mod, dev)
    res["load_s"] = round(time.perf_counter() - t0, 2)
    keep, args = synthetic_args(meta, stream)
    res["whole"] = whole_model(vm[meta["function"]], args, stream, dev, reps)
    try:
        res["in_model"] = in_model_profile(mod, meta, args, stream, dev)
    except Exception as e:  # noqa: BLE001 - the cross-check is optional
        res["errors"].append(f"in-model profile: {type(e).__name__}: {str(e)[:400]}")
        try:
            stream.synchronize()
        except Exception:  # noqa: BLE001
            cupy.cuda.runtime.deviceSynchronize()
    del vm, keep, args
    cupy.get_default_memory_pool().free_all_blocks()
    rows = []
    for k in meta["kernels"]:
        row = {kk: k[kk] for kk in ("name", "rule", "calls", "weight_only_calls", "flops", "bytes", "tensor_core",
                                   "params", "device_kernels", "key")}
        if k["calls"] == 0:
            row["skipped"] = "not called by the model"
        elif k["params"] is None:
            row["error"] = "non-buffer parameters: not measurable alone"
        elif deadline_left() <= 0:
            row["skipped"] = "deadline"
        else:
            try:
                f = mod.get_function(k["name"], query_imports=True)
                with stream:
                    arrays, kargs = kernel_args(k["params"], k["outputs"], seed=1)
                stream.synchronize()
                row.update(time_kernel(stream, f, kargs, dev))
                row["total_us"] = row["p50_us"] * k["calls"]
                del arrays, kargs
            except Exception as e:  # noqa: BLE001 - one kernel must not stop the breakdown
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                try:
                    stream.synchronize()
                except Exception:  # noqa: BLE001
                    cupy.cuda.runtime.deviceSynchronize()
        im = (res.get("in_model") or {}).get(k["name"])
        if im:
            row["in_model_us"] = im["us"]
            row["in_model_calls"] = im["calls"]
        rows.append(row)
    res["kernels"] = rows
    del mod
    cupy.get_default_memory_pool().free_all_blocks()
    res.update(aggregate(res))
    return res


def aggregate(res: dict) -> dict:
    """Sums: standalone kernel time x calls, per rule; in-model time of kernels and of VM builtins."""
    rows = [r for r in res["kernels"] if r.get("total_us") is not None]
    total = sum(r["total_us"] for r in rows)
    whole_us = (res.get("whole") or {}).get("p50_ms", float("nan")) * 1e3
    per_rule: dict[str, dict] = {}
    for r in rows:
        d = per_rule.setdefault(r["rule"], {"kernels": 0, "calls": 0, "us": 0.0, "in_model_us": 0.0})
        d["kernels"] += 1
        d["calls"] += r["calls"]
        d["us"] += r["total_us"]
        d["in_model_us"] += r.get("in_model_us") or 0.0
    for d in per_rule.values():
        d["share_of_sum"] = d["us"] / total if total else None
        d["share_of_whole"] = d["us"] / whole_us if whole_us else None
    im = res.get("in_model") or {}
    names = {r["name"] for r in res["kernels"]}
    weight_only = sum(r["total_us"] * r["weight_only_calls"] / r["calls"] for r in rows if r["weight_only_calls"])
    return {"sum_standalone_us": total, "whole_us": whole_us,
            "sum_over_whole": total / whole_us if whole_us else None,
            "in_model_kernels_us": sum(v["us"] for n, v in im.items() if n in names) if im else None,
            "in_model_builtins_us": sum(v["us"] for n, v in im.items() if n not in names) if im else None,
            "in_model_calls": {n: v["calls"] for n, v in im.items()} if im else None,
            "weight_only_us": weight_only, "per_rule": per_rule,
            # calls the VM made that the build's count (from the lowered IR) did not predict: should be []
            "call_count_mismatch": [r["name"] for r in res["kernels"] if im and
                                    (im.get(r["name"]) or {}).get("calls", 0) != r["calls"]],
            "unmeasured": [r["name"] for r in res["kernels"] if r.get("total_us") is None and r["calls"]]}


def _sig(params: list | None) -> str:
    if not params:
        return "-"
    short = {"float16": "f16", "float32": "f32", "int32": "i32", "int64": "i64"}
    return " ".join(f"{short.get(d, d)}{list(s)}".replace(" ", "") for s, d in params)


def markdown(doc: dict, top: int = 15) -> str:
    meta = doc.get("meta", {})
    L = ["# kernel_breakdown", "",
         f"Measured {meta.get('when')} on {meta.get('gpu')}, TVM {meta.get('tvm')} runtime-only, "
         f"{doc.get('elapsed_s')} s. Written by `python -m bench.kernel_breakdown run`.", "",
         "whole = p50 of CUDA events around one VM call (synthetic weights, inputs on the GPU). standalone = each "
         "kernel alone from the model's own .so on random buffers, `kernel_quality.time_kernel` (CUDA graph of "
         "back-to-back launches, p50 of 5 replays), x its call count: pure kernel time, warm L2. in-model = CUDA "
         "events around every VM call from a VM instrument (median of 3 runs): the real intermediates, but each "
         "interval also holds the launch latency (the Python instrument runs between calls). whole - sum "
         "standalone ~ launch gaps, VM interpretation and allocation.", ""]
    for r in doc["models"]:
        if "error" in r and "kernels" not in r:
            L += [f"## {r['id']}", "", f"error: {r['error']}", ""]
            continue
        w = r.get("whole") or {}
        L += [f"## {r['id']}", "",
              f"whole {w.get('p50_ms', float('nan')):.3f} ms p50 (host call {w.get('host_call_ms')} ms); sum "
              f"standalone {r['sum_standalone_us'] / 1e3:.3f} ms = {100 * (r['sum_over_whole'] or 0):.0f}% of "
              f"whole over {r['kernel_calls']} kernel calls ({len(r['kernels'])} kernels); weight-only calls "
              f"(e.g. fp32->fp16 weight casts, redone every inference) {r['weight_only_us'] / 1e3:.3f} ms."
              + (f" In-model: kernels {r['in_model_kernels_us'] / 1e3:.3f} ms, VM builtins "
                 f"{r['in_model_builtins_us'] / 1e3:.3f} ms." if r.get("in_model_kernels_us") is not None else ""),
              ""]
        if r.get("unmeasured"):
            L += [f"Unmeasured kernels (called): {', '.join(r['unmeasured'])}.", ""]
        for e in r.get("errors", []):
            L += [f"Error: {e}", ""]
        L += ["| rule | kernels | calls | standalone ms | share of sum | share of whole | in-model ms |",
              "|---|---|---|---|---|---|---|"]
        for rule, d in sorted(r["per_rule"].items(), key=lambda kv: -kv[1]["us"]):
            L.append(f"| {rule} | {d['kernels']} | {d['calls']} | {d['us'] / 1e3:.3f} | "
                     f"{100 * (d['share_of_sum'] or 0):.1f}% | {100 * (d['share_of_whole'] or 0):.1f}% | "
                     f"{d['in_model_us'] / 1e3:.3f} |")
        L += ["", f"Top {top} kernels by standalone total:", "",
              "| kernel | rule | tc | calls | us/call | total us | share of whole | in-model us | TFLOP/s | GB/s | "
              "buffers |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        rows = sorted([k for k in r["kernels"] if k.get("total_us") is not None], key=lambda k: -k["total_us"])
        for k in rows[:top]:
            t = k["p50_us"] * 1e-6
            tf = f"{k['flops'] / t / 1e12:.1f}" if k.get("flops") and t else "-"
            gb = f"{k['bytes'] / t / 1e9:.0f}" if k.get("bytes") and t else "-"
            im = f"{k['in_model_us']:.1f}" if k.get("in_model_us") is not None else "-"
            L.append(f"| {k['name']} | {k['rule']} | {k.get('tensor_core') or '-'} | {k['calls']} | "
                     f"{k['p50_us']:.1f} | {k['total_us']:.1f} | "
                     f"{100 * k['total_us'] / r['whole_us'] if r['whole_us'] else 0:.1f}% | {im} | {tf} | {gb} | "
                     f"{_sig(k['params'])} |")
        L.append("")
    return "\n".join(L) + "\n"


def cmd_run(a) -> int:
    from bench.kernel_quality import Clock, Nvrtc, meta_info
    clock = Clock(a.budget_s)
    root = Path(a.dir)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest, metas = load_dir(root)
    import cupy
    import tvm  # noqa: F401
    from workbench.models import cubin_cache
    cubin_cache.ensure_cuda_backend()
    cache = cubin_cache.install(cubin_cache.CubinCache(Path(a.cache)))
    arch = cubin_cache.device_arch(0)
    doc: dict = {"format": FORMAT + "-results", "meta": {**meta_info(), "arch": arch},
                 "build": manifest, "models": [], "setup": {}}

    def save():
        doc["elapsed_s"] = round(clock.elapsed(), 1)
        (out / "kernel_breakdown.json").write_text(json.dumps(doc, indent=1) + "\n")
        (out / "kernel_breakdown.md").write_text(markdown(doc))

    sources, missing = [], []
    from workbench.models.cubin_cache import sources_in_so
    for m in metas:
        found = sources_in_so((root / m["so"]).read_bytes(), m["cuda_source_sha256"])
        if len(found) != len(m["cuda_source_sha256"]):
            missing.append(m["so"])
        sources += found
    nvrtc = Nvrtc(arch, cache, a.workers or max(1, (os.cpu_count() or 4) - 2))
    nvrtc.submit(sources)
    nvrtc.wait(sources, timeout=max(10.0, clock.left() - 30))
    doc["setup"] = {"sources_missing_in": missing, "nvrtc": nvrtc.stats(), "nvrtc_wall_s": round(clock.elapsed(), 1)}
    nvrtc.close()
    print(f"[{clock.elapsed():5.1f}s] NVRTC: {doc['setup']['nvrtc']}", flush=True)
    save()
    for i, m in enumerate(metas):
        left = clock.left()
        if left <= 5:
            doc["models"].append({"id": m["id"], "error": "skipped: budget"})
            continue
        share = left / (len(metas) - i)                 # each remaining model gets an equal slice
        t_end = clock.elapsed() + share
        try:
            r = run_model(root, m, arch, a.reps, lambda: t_end - clock.elapsed())
        except Exception as e:  # noqa: BLE001
            import traceback
            r = {"id": m["id"], "error": f"{type(e).__name__}: {str(e)[:600]}",
                 "trace": traceback.format_exc()[-1500:]}
            try:
                cupy.cuda.runtime.deviceSynchronize()
            except Exception:  # noqa: BLE001
                pass
        doc["models"].append(r)
        if "whole" in r:
            print(f"[{clock.elapsed():5.1f}s] {m['id']}: whole {r['whole']['p50_ms']:.3f} ms, sum standalone "
                  f"{r['sum_standalone_us'] / 1e3:.3f} ms, in-model kernels "
                  f"{(r.get('in_model_kernels_us') or float('nan')) / 1e3:.3f} ms; "
                  + ", ".join(f"{k} {v['us'] / 1e3:.2f}" for k, v in sorted(r["per_rule"].items(),
                                                                           key=lambda kv: -kv[1]["us"])),
                  flush=True)
        else:
            print(f"[{clock.elapsed():5.1f}s] {m['id']}: {r.get('error')}", flush=True)
        save()
    save()
    print(f"[{clock.elapsed():5.1f}s] wrote {out / 'kernel_breakdown.json'} and .md", flush=True)
    return 0


def cmd_build(a) -> int:
    models = a.models if a.models is not None else ("" if a.variants else DEFAULT_MODELS)
    specs = [Spec.parse(s, a.tuning_db) for s in models.split(",") if s.strip()]
    if a.variants:
        specs += read_variants(a.variants, [i for i in (a.ids or "").split(",") if i] or None)
    elif a.ids:
        raise SystemExit("--ids selects entries of --variants FILE: give the file")
    dup = sorted({s.id for s in specs if [t.id for t in specs].count(s.id) > 1})
    if dup:
        raise SystemExit(f"the same variant id twice: {', '.join(dup)}")
    out = Path(a.out)
    t0 = time.perf_counter()
    build(specs, out, a.force)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    rel = out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
    print(f"wrote {out} ({size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.0f} s; carry=['.device-site', "
          f"'{rel}']")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernel_breakdown", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the model variants and their kernel manifest (CPU, full TVM)")
    b.add_argument("--models", default=None, help="model:lowering:batch:precision or model:batch:tuned:precision, "
                   f"comma-separated (default {DEFAULT_MODELS}, unless --variants)")
    b.add_argument("--tuning-db", default=None, help="tuning database directory for the 'tuned' entries")
    b.add_argument("--variants", default=None, help="JSON file of variants: build_kernel_candidates' manifest.json "
                   "or a list of {model, batch, variant}")
    b.add_argument("--ids", default=None, help="with --variants: only these ids (comma-separated)")
    b.add_argument("--out", default=str(ROOT / ".gpu" / "kbd"))
    b.add_argument("--force", action="store_true", help="rebuild variants already built")
    b.set_defaults(func=cmd_build)
    r = sub.add_parser("run", help="time every kernel and the whole models (GPU, runtime-only TVM)")
    r.add_argument("--dir", default=str(ROOT / ".gpu" / "kbd"))
    r.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    r.add_argument("--cache", default=str(ROOT / ".gpu" / "kbd_cubin"), help="cubin cache directory")
    r.add_argument("--budget-s", type=float, default=110.0)
    r.add_argument("--reps", type=int, default=50, help="timed whole-model runs")
    r.add_argument("--workers", type=int, default=0, help="NVRTC processes (default: CPU count - 2)")
    r.set_defaults(func=cmd_run)
    a = p.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
