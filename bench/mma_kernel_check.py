"""Per-kernel correctness of the mma.sync rule (schedules.MmaMatmul) on the fused conv-as-matmul kernels.

Round 3 (H200) found whole fp16 models with the mma rule wrong (resnet50/resnet18/mobilenet_v2 "matmul"
lowering: rel err 1.6-19, NaN at b16) while bert_base and the standalone GEMMs of bench/gemm_tensorcore were
right. This check compiles every distinct kernel the rule takes in those models alone, in several versions,
and compares each with dlight's schedule of the same kernel on the GPU:

HERE (full TVM, no GPU; ~5 min on 1 core):

    python -m bench.mma_kernel_check build --out .gpu/mmachk

ON THE GPU MACHINE (runtime-only TVM, < 90 s including NVRTC):

    PYTHONPATH=$PWD/.device-site:$PWD TVM_USE_RUNTIME_LIB=1 python3 -m bench.mma_kernel_check run \\
        --dir .gpu/mmachk --out $OUT                                      # carry: .device-site, .gpu/mmachk

writes $OUT/mmachk.json and $OUT/mmachk.md: per kernel and version the max |version - dlight| / max |dlight|
(random normal inputs per the kernel's signature; tolerance TOLERANCE), whether three runs agree bit for bit
(a race shows as run-to-run differences), and the kernel's features.

Versions per kernel (`manifest.json` lists them with the features):
- `dlight`: the reference, dlight's rules (wmma for fp16 matmuls), as the `"mma": false` variant builds it;
- `mma`: the rule as it is now (what whole models get);
- `mma_nopipe`: the same tile config without the cp.async pipeline (stages 1): isolates the pipeline;
- for K loops of two block_k steps (K in 33..64, the bug found): `mma_legacy`, the schedule round 3 measured
  (a 2-stage pipeline whose cp.async.wait_group precedes the commit of the copies it waits for: expected to
  FAIL), and `mma_2stage`, a 2-stage pipeline with both stages apart (expected to pass; not used by the rule).
The manifest also lists the matmul-like kernels the rule declines, with the reason (those run dlight).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

from bench.worker_common import read_build_manifest


ROOT = Path(__file__).resolve().parents[1]
ARCH = "sm_90"
TOLERANCE = 1e-2            # max |mma - dlight| / max |dlight|: fp32 accumulation both, fp16 rounding of outputs
# (model, conv lowering, batch): the fp16 models whose mma kernels round 3 found wrong (brief: issue 8)
JOBS = (("resnet18", "matmul", 1), ("resnet18", "matmul", 16), ("mobilenet_v2", "matmul", 1))
FUNCS_PER_MODULE = 12       # small modules: NVRTC compiles them in parallel on the GPU machine
FORMAT = "workbench-mmachk"


# ---------------------------------------------------------------------------------------------------------
# build (full TVM)
# ---------------------------------------------------------------------------------------------------------

def kernel_features(func) -> dict:
    """What distinguishes a fused matmul kernel (issue 8's hypotheses): the 2-D GEMM shape and layout, the
    padding pad_einsum adds, the K-loop steps and pipeline depth, A/B read straight from parameters or through
    inlined producers, the A buffer's rank, the epilogue's blocks, extra epilogue inputs (bias, residual) and
    the output dtypes."""
    from tvm import s_tir
    from workbench.models import tensorcore as tc
    m, n, k, trans_b = tc.gemm_shape(func)
    label = tc.choose_config(m, n, k)
    cfg = tc.named_config(label)
    steps = math.ceil(k / cfg.block_k)
    sch = s_tir.Schedule(func)
    blocks = [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]
    red = [b for b in blocks if any(int(iv.iter_type) == 2 for iv in b.iter_vars)][0]
    params = {p.name: p for p in func.params if hasattr(p, "shape")}    # TVM 0.27: tensor-typed Vars
    a_buf, b_buf = (tc._buf(r) for r in red.reads[:2])
    written = set()
    for b in blocks:
        written.update(tc._buf(w).name for w in b.writes)
    outs = [buf for name, buf in params.items() if name in written]
    extra = [name for name in params if name not in written and name not in (a_buf.name, b_buf.name)]
    out_shape = tuple(int(d) for d in outs[0].shape) if outs else ()
    return {"m": m, "n": n, "k": k, "trans_b": trans_b, "config": label,
            "pad_m": m % cfg.block_m != 0, "pad_n": n % cfg.block_n != 0, "pad_k": k % cfg.block_k != 0,
            "k_steps": steps, "pipeline_stages": min(cfg.stages, steps) if min(cfg.stages, steps) >= 3 else 1,
            "two_step_k": steps == 2, "vec_a": tc._vec(k), "vec_b": tc._vec(k if trans_b else n),
            "a_is_param": a_buf.name in params, "b_is_param": b_buf.name in params,
            "a_ndim": len(a_buf.shape), "b_ndim": len(b_buf.shape),
            "epilogue": [b.name_hint for b in blocks if not b.same_as(red)],
            "epilogue_inputs": extra,
            "residual": sum(1 for e in extra if tuple(int(d) for d in params[e].shape) == out_shape),
            "out_dtypes": [str(o.dtype) for o in outs]}


def _versions(func, feats: dict, target) -> dict[str, object]:
    """name -> scheduled PrimFunc (see the module docstring)."""
    from workbench.models import schedules
    from workbench.models import tensorcore as tc
    out = {}
    with target:
        sch = schedules.apply_rules(func, target, schedules.default_rules(schedules.ScheduleSpec(mma=False)))
        out["dlight"] = sch.mod["main"] if sch is not None else None
        out["mma"] = tc.schedule_gemm(func, None, check_size=True).mod["main"]
        cfg = tc.named_config(feats["config"])
        if feats["pipeline_stages"] > 1:
            import dataclasses
            out["mma_nopipe"] = tc.schedule_gemm(func, dataclasses.replace(cfg, stages=1)).mod["main"]
        if feats["two_step_k"]:
            out["mma_legacy"] = tc.schedule_gemm(func, None, two_stage="legacy").mod["main"]
            out["mma_2stage"] = tc.schedule_gemm(func, None, two_stage="ordered").mod["main"]
    return {k: v.with_attr("tirx.is_scheduled", True) for k, v in out.items() if v is not None}


def _decline_reason(func, target) -> str | None:
    """Why the mma rule passes a matmul-like kernel on (None: it takes it)."""
    from workbench.models import tensorcore as tc
    with target:
        try:
            tc.schedule_gemm(func, None, check_size=True)
            return None
        except tc.TensorCoreError as e:
            return str(e)[:300]


def _rel_path(p: Path) -> str:
    p = p.resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def cmd_build(a) -> int:
    import tvm
    from workbench.models import schedules, zoo
    from workbench.models.compiler import cuda_sources, make_target
    from workbench.models.tensorcore import PASS_CONFIG, cp_async_hazards
    schedules.check_tensorize_support()
    out = Path(a.out)
    (out / "kernels").mkdir(parents=True, exist_ok=True)
    tgt = make_target("cuda", ARCH)
    t_all = time.perf_counter()
    kernels, declined, modules, funcs, seen = [], [], [], {}, {}

    def flush():
        if not funcs:
            return
        so = out / "kernels" / f"m{len(modules)}.so"
        with tvm.transform.PassContext(opt_level=3, config=PASS_CONFIG):
            ex = tvm.compile(tvm.IRModule(dict(funcs)), target=tgt)
        ex.export_library(str(so))
        srcs = cuda_sources(ex)
        bad = {h for s in srcs for h in cp_async_hazards(s)}
        for sym in funcs:
            hazards[sym] = f"{sym}_kernel" in bad or sym in bad
        modules.append({"so": f"kernels/{so.name}", "functions": sorted(funcs),
                        "cuda_source_sha256": [hashlib.sha256(s.encode()).hexdigest() for s in srcs]})
        funcs.clear()

    hazards: dict[str, bool] = {}
    jobs = [j for j in JOBS if not a.models or j[0] in a.models.split(",")]
    for model, lowering, b in jobs:
        t0 = time.perf_counter()
        src = zoo.get(model, seed=0, conv=lowering)
        fused = schedules.fuse(src.make_module(b), tgt, "fp16")
        ks = schedules.kernels(fused, tgt)
        job = f"{model}-{lowering}_b{b}"
        n_new = 0
        for k in ks:
            if k.default_rule != "matmul":
                continue
            reason = _decline_reason(k.func, tgt)
            if reason is not None:
                declined.append({"job": job, "name": k.name, "key": k.key, "reason": reason})
                continue
            if k.key in seen:
                seen[k.key]["jobs"].append(job)
                continue
            feats = kernel_features(k.func)
            versions = _versions(k.func, feats, tgt)
            if "dlight" not in versions:
                declined.append({"job": job, "name": k.name, "key": k.key, "reason": "dlight did not schedule it"})
                continue
            if len(funcs) + len(versions) > FUNCS_PER_MODULE:
                flush()
            rec = {**k.describe(), "jobs": [job], "features": feats, "versions": {}}
            for v, f in versions.items():
                sym = f"k{k.key}_{v}"
                funcs[sym] = f.with_attr("global_symbol", sym)
                rec["versions"][v] = {"symbol": sym, "module": len(modules)}
            seen[k.key] = rec
            kernels.append(rec)
            n_new += 1
        print(f"{job}: {len(ks)} kernels, {n_new} new mma kernels ({time.perf_counter() - t0:.0f} s)", flush=True)
    flush()
    for rec in kernels:
        for v in rec["versions"].values():
            v["cp_async_hazard"] = hazards.get(v["symbol"], False)
    manifest = {"format": FORMAT, "version": 1, "arch": ARCH, "tvm_version": tvm.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "jobs": [list(j) for j in jobs],
                "tolerance": TOLERANCE, "kernels": kernels, "declined": declined, "modules": modules,
                "build_s": round(time.perf_counter() - t_all, 1)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out}: {len(kernels)} kernels, {sum(len(k['versions']) for k in kernels)} versions in "
          f"{len(modules)} modules, {len(declined)} declined, {size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - t_all:.0f} s; carry=['.device-site', '{_rel_path(out)}']")
    return 0


# ---------------------------------------------------------------------------------------------------------
# run (GPU, runtime-only TVM)
# ---------------------------------------------------------------------------------------------------------

def _rel(a, b) -> float:
    import cupy
    scale = float(cupy.abs(b).max()) or 1.0
    d = cupy.abs(a.astype(cupy.float64) - b.astype(cupy.float64))
    if not bool(cupy.isfinite(a).all()):
        return float("nan")
    return float(d.max()) / scale


def check_kernel(rec: dict, mods: dict, root: Path, modules: list, arch: str, stream, dev) -> dict:
    """Run every version of one kernel on the same random inputs (3 times each); compare with dlight."""
    import cupy
    import tvm
    import tvm_ffi
    from bench.kernel_quality import kernel_args
    from workbench.models import cubin_cache
    with stream:
        arrays, args = kernel_args(rec["params"], rec["outputs"], seed=1)
    stream.synchronize()
    res: dict = {}
    ref = None
    for v in ["dlight"] + [x for x in rec["versions"] if x != "dlight"]:
        info = rec["versions"][v]
        r: dict = {"cp_async_hazard": info.get("cp_async_hazard", False)}
        try:
            mi = info["module"]
            if mi not in mods:
                with cubin_cache.compiling_for(arch):
                    mods[mi] = tvm.runtime.load_module(str(root / modules[mi]["so"]))
            f = mods[mi][info["symbol"]]
            runs = []
            for _ in range(3):
                with stream:
                    for i in rec["outputs"]:
                        arrays[i].fill(0)
                    with tvm_ffi.use_raw_stream(dev, stream.ptr):
                        f(*args)
                    runs.append([arrays[i].copy() for i in rec["outputs"]])
                stream.synchronize()
            r["deterministic"] = all(bool(cupy.array_equal(x, y, equal_nan=True))
                                     for run in runs[1:] for x, y in zip(run, runs[0]))
            r["finite"] = all(bool(cupy.isfinite(x).all()) for run in runs for x in run)
            if v == "dlight":
                ref = runs[0]
                r["rel_err"] = 0.0
            elif ref is None:
                raise RuntimeError("no reference: the dlight version failed")
            else:
                errs = [_rel(x, y) for run in runs for x, y in zip(run, ref)]
                r["rel_err"] = float("nan") if any(math.isnan(e) for e in errs) else max(errs)
            r["ok"] = bool(r["finite"] and r["deterministic"] and r["rel_err"] <= TOLERANCE)
        except Exception as e:  # noqa: BLE001 - one broken version must not stop the check
            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            r["ok"] = False
            try:
                cupy.cuda.runtime.deviceSynchronize()
            except Exception:  # noqa: BLE001
                pass
        res[v] = r
    del arrays, args
    return res


def cmd_run(a) -> int:
    t0 = time.perf_counter()
    root = Path(a.dir)
    man = read_build_manifest(root, FORMAT, "mma_kernel_check")
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import cupy
    import tvm
    from bench.kernel_quality import Nvrtc, meta_info, so_sources
    from workbench.models import cubin_cache
    cubin_cache.ensure_cuda_backend()
    cache = cubin_cache.install(cubin_cache.CubinCache(Path(a.work) / "cubin"))
    arch = cubin_cache.device_arch(0)
    sources = []
    for m in man["modules"]:
        found = so_sources(root, m["so"], m["cuda_source_sha256"])
        if len(found) != len(m["cuda_source_sha256"]):
            raise SystemExit(f"{m['so']}: CUDA source not found in the .so (rebuild with `build`)")
        sources += found
    nvrtc = Nvrtc(arch, cache, a.workers or max(1, (os.cpu_count() or 4) - 2))
    nvrtc.submit(sources)
    nvrtc.wait(sources, timeout=max(5.0, a.budget_s - 30 - (time.perf_counter() - t0)))
    nv = nvrtc.stats()
    nvrtc.close()
    print(f"[{time.perf_counter() - t0:5.1f}s] NVRTC: {nv['done']}/{nv['submitted']} sources, "
          f"{len(nv['failures'])} failures", flush=True)
    dev = tvm.cuda(0)
    stream = cupy.cuda.Stream(non_blocking=True)
    mods: dict = {}
    results = []
    for rec in man["kernels"]:
        if time.perf_counter() - t0 > a.budget_s - 5:
            results.append({"key": rec["key"], "name": rec["name"], "skipped": "budget"})
            continue
        res = check_kernel(rec, mods, root, man["modules"], arch, stream, dev)
        results.append({"key": rec["key"], "name": rec["name"], "jobs": rec["jobs"], "features": rec["features"],
                        "versions": res})
    mods.clear()
    doc = {"format": "workbench-mmachk-results", "meta": meta_info(), "arch": arch, "nvrtc": nv,
           "tolerance": man["tolerance"], "kernels": results, "declined": man["declined"],
           "elapsed_s": round(time.perf_counter() - t0, 1)}
    (out_dir / "mmachk.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(doc)
    (out_dir / "mmachk.md").write_text(md)
    print(md)
    return 0


def _fmt(r: dict | None) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "ERROR"
    e = r.get("rel_err", float("nan"))
    tag = "ok" if r["ok"] else "FAIL"
    extra = ("" if r.get("deterministic", True) else " racy") + (" hazard" if r.get("cp_async_hazard") else "")
    return f"{tag} {e:.1e}{extra}"


def markdown(doc: dict) -> str:
    vs = ["mma", "mma_nopipe", "mma_legacy", "mma_2stage"]
    lines = [f"# mma kernel check ({doc['meta'].get('gpu', '?')}, {doc['elapsed_s']} s)", "",
             f"max |version - dlight| / max |dlight| on random inputs, 3 runs each (tolerance {doc['tolerance']}); "
             "`racy`: runs differ; `hazard`: the CUDA source waits on uncommitted cp.async copies.", ""]
    fails = [k for k in doc["kernels"] if "versions" in k and not k["versions"].get("mma", {}).get("ok")]
    lines.append(f"**mma (the rule now): {len(fails)} of {len(doc['kernels'])} kernels fail.** "
                 f"Declined by the rule: {len(doc['declined'])}.")
    lines += ["", "| kernel | M x N x K | config | K steps | pad m/n/k | 2-step K | residual | out | "
              + " | ".join(vs) + " |", "|" + "---|" * (8 + len(vs))]
    for k in sorted(doc["kernels"], key=lambda k: (k.get("versions", {}).get("mma", {}).get("ok", True), k["name"])):
        if "versions" not in k:
            lines.append(f"| {k['name']} | skipped: {k.get('skipped')} |")
            continue
        f = k["features"]
        pad = "/".join("y" if f[p] else "-" for p in ("pad_m", "pad_n", "pad_k"))
        lines.append(f"| {k['name']} | {f['m']} x {f['n']} x {f['k']} | {f['config']} | {f['k_steps']} | {pad} | "
                     f"{'y' if f['two_step_k'] else '-'} | {f['residual']} | {','.join(f['out_dtypes'])} | "
                     + " | ".join(_fmt(k["versions"].get(v)) for v in vs) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mma_kernel_check", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the kernels here (full TVM)")
    b.add_argument("--out", default=str(ROOT / ".gpu" / "mmachk"))
    b.add_argument("--models", default="", help="only these models (comma-separated) of " +
                   ", ".join(sorted({j[0] for j in JOBS})))
    r = sub.add_parser("run", help="run them on the GPU (runtime-only TVM)")
    r.add_argument("--dir", default=str(ROOT / ".gpu" / "mmachk"))
    r.add_argument("--out", required=True)
    r.add_argument("--work", default="/tmp/mmachk-work", help="cubin cache")
    r.add_argument("--workers", type=int, default=0)
    r.add_argument("--budget-s", type=float, default=85.0)
    a = p.parse_args(argv)
    return cmd_build(a) if a.cmd == "build" else cmd_run(a)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
