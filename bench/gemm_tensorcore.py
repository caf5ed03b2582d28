"""mma.sync tensor-core GEMM (workbench.models.tensorcore) vs dlight's wmma path vs torch (cuBLAS), fp16 in.

HERE (full TVM, no GPU): compile every (shape, schedule) as its own module for sm_90, exported as .so (each
carries its CUDA source; NVRTC compiles it where it is loaded), plus manifest.json:

    python -m bench.gemm_tensorcore build [--out .gpu/gemm_tc] [--force]

ON THE GPU (runtime-only TVM: imports tvm.runtime / tvm_ffi only; torch for inputs, reference and cuBLAS):

    PYTHONPATH=$PWD/.device-site:$PWD TVM_USE_RUNTIME_LIB=1 python3 -m bench.gemm_tensorcore run \\
        --dir .gpu/gemm_tc --out $OUT

compiles every CUDA source first (NVRTC, parallel processes, cubin cache under --out), then per shape: random
fp16 A, B; each module's output checked against torch's fp32 matmul of the same fp16 inputs (TF32 off):
max |out - ref| / max |ref| <= TOLERANCE (the outputs are fp16, so ~5e-4 is rounding); GPU time per launch
between CUDA events (WARMUP launches, then REPS, p50/p99); torch.matmul fp16 (cuBLAS) timed the same way.
Writes <out>/gemm_tc.json and <out>/gemm_tc.md (copy them to bench/results/).

    python -m bench.gemm_tensorcore check [--dir .gpu/gemm_tc] [--nvrtc 3]

runs the CPU side of `run` here: manifest, every source found in its .so, a few compiled by NVRTC for sm_90.

Shapes: the fp16 matmuls of our zoo models after ToMixedPrecision (A[M, K] x B[K, N], fp32 accumulation, fp16
out): BERT-base (b16: M = 16*128; b1: M = 128) and ResNet-50 b16 with convs lowered to matmuls (M = 16*H*W,
K = 9*C for 3x3). Schedules: dlight's default rules (what `workbench compile --precision fp16` ships: wmma) and
2-3 mma configs per shape.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCH = "sm_90"
FORMAT = "workbench-gemm-tc"
FUNCTION = "gemm"
TOLERANCE = 1e-2            # max |out - ref| / max |ref|
WARMUP = 10
REPS = 100
OUT_DTYPE = "float16"

# (name, model, M, N, K)
SHAPES: list[tuple[str, str, int, int, int]] = [
    ("bert_b16_qkv", "bert_base b16: attention projection", 2048, 768, 768),
    ("bert_b16_ffn1", "bert_base b16: FFN 768->3072", 2048, 3072, 768),
    ("bert_b16_ffn2", "bert_base b16: FFN 3072->768", 2048, 768, 3072),
    ("bert_b1_ffn1", "bert_base b1: FFN 768->3072", 128, 3072, 768),
    ("bert_b4_qkv", "bert_base b4: attention projection", 512, 768, 768),
    ("bert_b4_ffn1", "bert_base b4: FFN 768->3072", 512, 3072, 768),
    ("bert_b4_ffn2", "bert_base b4: FFN 3072->768", 512, 768, 3072),
    ("r50_b16_l1_3x3", "resnet50 b16: layer1 3x3 conv (56x56, 64ch)", 50176, 64, 576),
    ("r50_b16_l2_3x3", "resnet50 b16: layer2 3x3 conv (28x28, 128ch)", 12544, 128, 1152),
    ("r50_b16_l3_3x3", "resnet50 b16: layer3 3x3 conv (14x14, 256ch)", 3136, 256, 2304),
    ("r50_b16_l4_1x1", "resnet50 b16: layer4 1x1 expand (7x7, 512->2048)", 784, 2048, 512),
]

# mma configs and the per-shape candidates: workbench.models.tensorcore (CONFIGS, configs_for), shared with the
# relax rule (schedules.MmaMatmul), which uses tensorcore.choose_config.
from workbench.models.tensorcore import CONFIGS, configs_for  # noqa: E402 (pure Python, no TVM)
from bench.kernel_quality import _f, summary  # noqa: E402 (number formatting and p50/p99 stats of kernel_quality)


# Small modules for tests/test_models_tensorcore.py's GPU test (checked against NumPy there): a multiple of the
# tile, ragged M/N/K (K % 8 != 0: narrow guarded copies), B as [N, K], fp32 and fp16 outputs.
# (name, M, N, K, b_layout, out_dtype, config)
TEST_CASES: list[tuple[str, int, int, int, str, str, str]] = [
    ("even_kn_f32", 256, 256, 256, "kn", "float32", "t64"),
    ("even_kn_f16_t128", 256, 256, 128, "kn", "float16", "t128"),
    ("ragged_kn_f16", 200, 72, 100, "kn", "float16", "t64"),
    ("ragged_nk_f32", 130, 96, 88, "nk", "float32", "t128x64"),
    ("even_kn_f16_t128x96", 256, 192, 128, "kn", "float16", "t128x96"),
    ("ragged_kn_f16_t64x48", 200, 100, 72, "kn", "float16", "t64x48"),
]
# Batched (one tile of one batch entry per block, blockIdx.z): attention's QK^T with K^T as B[b, n, k] ("nk", no
# ldmatrix .trans) and already transposed (B[b, k, n], as BERT's fused kernels read it), its PV ("kn"), at
# BERT-base's per-head shapes (b1: 12 heads; b16's 192 entries for QK^T), plus ragged batched shapes.
# (name, batch, M, N, K, b_layout, out_dtype, config)
BATCHED_TEST_CASES: list[tuple[str, int, int, int, int, str, str, str]] = [
    ("batched_qkt_nk_f32", 192, 128, 128, 64, "nk", "float32", "t64"),
    ("batched_qkt_kn_f32", 12, 128, 128, 64, "kn", "float32", "t64"),
    ("batched_pv_kn_f16", 12, 128, 64, 128, "kn", "float16", "t64"),
    ("batched_pv_nk_f16_t128x64", 12, 128, 64, 128, "nk", "float16", "t128x64"),
    ("batched_long_k_nk_f32_t128", 4, 128, 128, 256, "nk", "float32", "t128"),
    ("batched_ragged_nk_f16", 6, 100, 72, 40, "nk", "float16", "t64"),
    ("batched_ragged_kn_f32", 5, 130, 96, 88, "kn", "float32", "t128x64"),
]


def tflops(m: int, n: int, k: int, ms: float | None) -> float | None:
    return None if not ms else 2.0 * m * n * k / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------------------------------------------------
# build (full TVM)
# ---------------------------------------------------------------------------------------------------------

def build_one(out: Path, shape: tuple, label: str, force: bool) -> dict:
    """One module: the shape's gemm scheduled by dlight ("dlight") or by the mma schedule with CONFIGS[label]."""
    import tvm
    from workbench.models import schedules, tensorcore
    from workbench.models.compiler import cuda_sources, make_target
    name, _, m, n, k = shape
    mid = f"{name}__{label}"
    meta_path = out / "modules" / f"{mid}.json"
    if meta_path.is_file() and not force:
        return json.loads(meta_path.read_text())
    tgt = make_target("cuda", ARCH)
    func = tensorcore.gemm_func(m, n, k, OUT_DTYPE, "kn")
    t0 = time.perf_counter()
    if label == "dlight":
        with tgt:
            sch = schedules.apply_rules(func, tgt, schedules.default_rules(schedules.ScheduleSpec(mma=False)))
        if sch is None:
            raise RuntimeError("no dlight rule applies")
        f = sch.mod["main"]
        config = None
    else:
        config = tensorcore.MmaConfig.from_json(CONFIGS[label])
        f = tensorcore.schedule_gemm(func, config).mod["main"]
    f = f.with_attr("global_symbol", FUNCTION).with_attr("tirx.is_scheduled", True)
    with tvm.transform.PassContext(opt_level=3, config=tensorcore.PASS_CONFIG):
        ex = tvm.compile(tvm.IRModule({FUNCTION: f}), target=tgt)
    so = out / "modules" / f"{mid}.so"
    so.parent.mkdir(parents=True, exist_ok=True)
    ex.export_library(str(so))
    srcs = cuda_sources(ex)
    src = "\n".join(srcs)
    meta = {"id": mid, "shape": name, "label": label, "kind": "dlight" if label == "dlight" else "mma",
            "config": None if config is None else config.to_json(), "so": f"modules/{so.name}",
            "function": FUNCTION, "cuda_source_sha256": [hashlib.sha256(s.encode()).hexdigest() for s in srcs],
            "kernels": src.count('extern "C" __global__'), "uses_mma_sync": "mma.sync" in src,
            "uses_ldmatrix": "ldmatrix" in src, "uses_wmma": "wmma::" in src, "uses_cp_async": "cp.async" in src,
            "build_s": round(time.perf_counter() - t0, 2), "so_bytes": so.stat().st_size}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def build_test_case(out: Path, case: tuple, force: bool) -> dict:
    """One small module of TEST_CASES or BATCHED_TEST_CASES (the mma schedule only), for the GPU test."""
    import tvm
    from workbench.models import tensorcore
    from workbench.models.compiler import cuda_sources, make_target
    if len(case) == 8:
        name, batch, m, n, k, layout, out_dtype, label = case
    else:
        (name, m, n, k, layout, out_dtype, label), batch = case, None
    meta_path = out / "tests" / f"{name}.json"
    if meta_path.is_file() and not force:
        return json.loads(meta_path.read_text())
    func = tensorcore.gemm_func(m, n, k, out_dtype, layout, batch=batch)
    cfg = tensorcore.MmaConfig.from_json(CONFIGS[label])
    f = tensorcore.scheduled_func(func, cfg).with_attr("global_symbol", FUNCTION)
    with tvm.transform.PassContext(opt_level=3, config=tensorcore.PASS_CONFIG):
        ex = tvm.compile(tvm.IRModule({FUNCTION: f}), target=make_target("cuda", ARCH))
    so = out / "tests" / f"{name}.so"
    so.parent.mkdir(parents=True, exist_ok=True)
    ex.export_library(str(so))
    srcs = cuda_sources(ex)
    meta = {"name": name, "m": m, "n": n, "k": k, "b_layout": layout, "out_dtype": out_dtype, "label": label,
            "config": cfg.to_json(), "so": f"tests/{so.name}", "function": FUNCTION,
            "cuda_source_sha256": [hashlib.sha256(x.encode()).hexdigest() for x in srcs]}
    if batch is not None:
        meta["batch"] = batch                   # A[batch, M, K], B[batch, ...], C[batch, M, N]
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def cmd_build(a) -> int:
    import tvm
    import tvm_ffi
    from workbench.models import schedules
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not schedules.tensorize_supported():
        raise SystemExit(f"tensorize is broken with apache-tvm-ffi {tvm_ffi.__version__} (see "
                         f"schedules.check_tensorize_support): install apache-tvm-ffi<0.1.15")
    t0 = time.perf_counter()
    modules, failed = [], []
    only = set(a.shapes.split(",")) if a.shapes else None
    for shape in SHAPES:
        if only and shape[0] not in only:
            continue
        for label in ["dlight"] + configs_for(*shape[2:]):
            try:
                meta = build_one(out, shape, label, a.force)
                modules.append(meta)
                print(f"[{time.perf_counter() - t0:6.1f}s] {meta['id']}: {meta['so_bytes'] // 1024} KiB, "
                      f"mma.sync={meta['uses_mma_sync']} wmma={meta['uses_wmma']} cp.async={meta['uses_cp_async']}",
                      flush=True)
            except (RuntimeError, ValueError) as e:
                failed.append({"shape": shape[0], "label": label, "error": f"{type(e).__name__}: {str(e)[-800:]}"})
                print(f"  FAILED {shape[0]} {label}: {str(e)[-300:]}", flush=True)
    tests = []
    for case in TEST_CASES + BATCHED_TEST_CASES:
        try:
            tests.append(build_test_case(out, case, a.force))
        except (RuntimeError, ValueError) as e:
            failed.append({"shape": case[0], "label": case[-1], "error": f"{type(e).__name__}: {str(e)[-800:]}"})
            print(f"  FAILED test case {case[0]}: {str(e)[-300:]}", flush=True)
    manifest = {"format": FORMAT, "tests": tests, "arch": ARCH, "tvm_version": tvm.__version__,
                "tvm_ffi_version": tvm_ffi.__version__,
                "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "out_dtype": OUT_DTYPE,
                "b_layout": "kn", "function": FUNCTION, "tolerance": TOLERANCE,
                "shapes": [{"name": s[0], "model": s[1], "m": s[2], "n": s[3], "k": s[4]} for s in SHAPES
                           if not only or s[0] in only],
                "configs": CONFIGS, "modules": modules, "failed": failed,
                "build_s": round(time.perf_counter() - t0, 1)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{len(modules)} modules, {len(failed)} failed, {total / 1e6:.1f} MB in {out}")
    return 0 if not failed else 1


# ---------------------------------------------------------------------------------------------------------
# run (GPU, runtime-only TVM)
# ---------------------------------------------------------------------------------------------------------

def load_manifest(d: Path) -> dict:
    from bench.worker_common import read_build_manifest
    return read_build_manifest(d, FORMAT, "gemm_tensorcore")


def module_sources(d: Path, man: dict) -> tuple[dict[str, list[str]], list[str]]:
    """CUDA sources per module id (found in the .so by the recorded digests) and the ids missing some."""
    from workbench.models.cubin_cache import sources_in_so
    out, missing = {}, []
    for mod in man["modules"] + [{**t, "id": "tests/" + t["name"]} for t in man.get("tests", [])]:
        so = d / mod["so"]
        found = sources_in_so(so.read_bytes(), mod["cuda_source_sha256"]) if so.is_file() else []
        if len(found) != len(mod["cuda_source_sha256"]):
            missing.append(mod["id"])
        out[mod["id"]] = found
    return out, missing


def time_launches(fn, reps: int, warmup: int = WARMUP) -> list[float]:
    """GPU ms per launch: an event pair around each of `reps` back-to-back launches on the current stream."""
    import torch
    for _ in range(warmup):
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in ev]


def measure_module(d: Path, mod: dict, arch: str, inputs: tuple, C, ref, tolerance: float, mnk: tuple,
                   reps: int) -> dict:
    """One module of a GEMM benchmark's manifest (built in `d`): loaded (its kernels compiled for `arch`), run once
    into C (NaN-filled, so an output the kernel skips shows) on torch's current stream, checked against `ref`
    (max |C - ref| / max |ref| <= tolerance) and timed: its result row. An error becomes the row's "error"."""
    import torch
    import tvm
    import tvm_ffi
    from workbench.models import cubin_cache
    r = {"id": mod["id"], "label": mod["label"], "kind": mod["kind"]}
    try:
        with cubin_cache.compiling_for(arch):
            f = tvm.runtime.load_module(str(d / mod["so"]))[mod["function"]]
        args, dev, stream = [tvm.runtime.from_dlpack(x) for x in (*inputs, C)], tvm.cuda(0), torch.cuda.current_stream()

        def call():
            with tvm_ffi.use_raw_stream(dev, stream.cuda_stream):
                f(*args)

        call()
        torch.cuda.synchronize()
        err = float((C.float() - ref).abs().max()) / (float(ref.abs().max()) or 1.0)
        r["rel_err"] = err if math.isfinite(err) else None
        r["ok"] = bool(math.isfinite(err) and err <= tolerance)
        r.update(summary(time_launches(call, reps)))
        r["tflops"] = tflops(*mnk, r["p50_ms"])
    except Exception as e:  # noqa: BLE001 - one bad module must not stop the others
        r["error"] = f"{type(e).__name__}: {str(e)[-600:]}"
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001
            pass
    print(f"  {mod['id']}: " + (f"{r['p50_ms'] * 1e3:.1f} us, err {r['rel_err']:.1e}" if "p50_ms" in r
                                else r["error"]), flush=True)
    return r


def cmd_run(a) -> int:
    t0 = time.perf_counter()
    d = Path(a.dir)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    man = load_manifest(d)
    import torch
    from workbench.models import cubin_cache
    cubin_cache.ensure_cuda_backend()
    cache = cubin_cache.install(cubin_cache.CubinCache(out / "cubin"))
    arch = cubin_cache.device_arch(0)
    res: dict = {"format": FORMAT + "-results", "manifest": {k: man[k] for k in ("arch", "tvm_version",
                                                                                 "tvm_ffi_version", "created")},
                 "meta": {"gpu": torch.cuda.get_device_name(0), "arch": arch, "torch": torch.__version__,
                          "python": platform.python_version(), "tolerance": TOLERANCE, "reps": a.reps,
                          "warmup": WARMUP, "out_dtype": man["out_dtype"], "b_layout": man["b_layout"]},
                 "shapes": [], "errors": [], "build_failed": man.get("failed", [])}

    def save():
        res["elapsed_s"] = round(time.perf_counter() - t0, 1)
        (out / "gemm_tc.json").write_text(json.dumps(res, indent=1) + "\n")
        try:
            (out / "gemm_tc.md").write_text(markdown(res))
        except Exception as e:  # noqa: BLE001 - the JSON has the figures; never lose a run to the table
            (out / "gemm_tc.md").write_text(f"markdown failed: {type(e).__name__}: {e}\n")

    srcs, missing = module_sources(d, man)
    res["meta"]["sources_missing"] = missing
    all_srcs = list(dict.fromkeys(s for v in srcs.values() for s in v))
    workers = a.workers or max(1, min(len(all_srcs), (os.cpu_count() or 4) - 1))
    tc = time.perf_counter()
    try:
        cubin_cache.precompile(all_srcs, arch, cache, workers)
    except Exception as e:  # noqa: BLE001 - one bad source: the loads below compile (and report) one by one
        res["errors"].append(f"precompile: {type(e).__name__}: {str(e)[-1500:]}")
    res["meta"]["nvrtc_s"] = round(time.perf_counter() - tc, 1)
    res["meta"]["nvrtc_sources"] = len(all_srcs)
    print(f"[{time.perf_counter() - t0:5.1f}s] NVRTC: {len(all_srcs)} sources in {res['meta']['nvrtc_s']} s "
          f"({workers} processes)", flush=True)
    save()

    torch.backends.cuda.matmul.allow_tf32 = False
    by_shape: dict[str, list[dict]] = {}
    for mod in man["modules"]:
        by_shape.setdefault(mod["shape"], []).append(mod)
    g = torch.Generator(device="cuda").manual_seed(0)
    for sh in man["shapes"]:
        if time.perf_counter() - t0 > a.budget_s:
            res["errors"].append(f"{sh['name']}: skipped (budget {a.budget_s} s)")
            continue
        m, n, k = sh["m"], sh["n"], sh["k"]
        row: dict = {**sh, "results": []}
        A = (torch.rand((m, k), device="cuda", generator=g) * 2 - 1).half()
        B = (torch.rand((k, n), device="cuda", generator=g) * 2 - 1).half()
        ref = A.float() @ B.float()
        t = summary(time_launches(lambda: torch.matmul(A, B), a.reps))
        t["tflops"] = tflops(m, n, k, t["p50_ms"])
        row["torch"] = t
        for mod in by_shape.get(sh["name"], []):
            C = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
            r = measure_module(d, mod, arch, (A, B), C, ref, TOLERANCE, (m, n, k), a.reps)
            row["results"].append({**r, "config": mod["config"]})
        row["summary"] = summarize(row)
        res["shapes"].append(row)
        save()
    save()
    print((out / "gemm_tc.md").read_text())
    return 0


def summarize(row: dict) -> dict:
    ok = [r for r in row["results"] if r.get("ok")]
    dl = next((r for r in ok if r["kind"] == "dlight"), None)
    mma = min((r for r in ok if r["kind"] == "mma"), key=lambda r: r["p50_ms"], default=None)
    torch_ms = row["torch"]["p50_ms"]
    return {"dlight_ms": dl and dl["p50_ms"], "mma_ms": mma and mma["p50_ms"], "mma_label": mma and mma["label"],
            "torch_ms": torch_ms,
            "mma_speedup_vs_dlight": (dl["p50_ms"] / mma["p50_ms"]) if dl and mma else None,
            "mma_vs_torch": (mma["p50_ms"] / torch_ms) if mma else None,
            "dlight_vs_torch": (dl["p50_ms"] / torch_ms) if dl else None}


def module_rows(res: dict, tflops_digits: int, extra=None) -> list[str]:
    """The "Every module" table rows of a GEMM benchmark's results: torch, then each module of each shape;
    `extra(result)` gives more cells for a module (the dashes for torch and failed modules follow its count)."""
    n = len(extra({})) if extra else 0
    dashes = " - |" * n
    lines = []
    for row in res["shapes"]:
        lines.append(f"| torch {row['name']} | {_f(row['torch']['p50_ms'], 4)} | {_f(row['torch']['p99_ms'], 4)} "
                     f"| {_f(row['torch']['tflops'], tflops_digits)} | - | - |" + dashes)
        for r in row["results"]:
            if "error" in r:
                lines.append(f"| {r['id']} | - | - | - | {r['error'][:200]} | no |" + dashes)
            else:
                more = "".join(f" {c} |" for c in extra(r)) if extra else ""
                lines.append(f"| {r['id']} | {_f(r['p50_ms'], 4)} | {_f(r['p99_ms'], 4)} "
                             f"| {_f(r['tflops'], tflops_digits)} | {r['rel_err']:.1e} | "
                             f"{'yes' if r['ok'] else 'NO'} |" + more)
    return lines


def markdown(res: dict) -> str:
    meta = res["meta"]
    lines = ["# gemm_tensorcore: mma.sync schedule vs dlight (wmma) vs torch cuBLAS, fp16", "",
             f"{meta.get('gpu')} ({meta.get('arch')}), torch {meta.get('torch')}, "
             f"TVM {res['manifest']['tvm_version']} "
             f"runtime-only. C[M,N] ({meta['out_dtype']}) = A[M,K] x B[K,N], fp16 inputs, fp32 accumulation. "
             f"Time = GPU ms per launch between CUDA events, p50 (p99) of {meta['reps']} back-to-back launches after "
             f"{meta['warmup']} warm-up; error = max |out - fp32 ref| / max |ref| (tolerance {meta['tolerance']}). "
             f"NVRTC: {meta.get('nvrtc_sources')} sources in {meta.get('nvrtc_s')} s. "
             f"Run took {res.get('elapsed_s')} s.",
             "", "| shape | M | N | K | dlight wmma ms | best mma ms (config) | torch ms | TFLOP/s dlight / mma / torch "
             "| mma speedup vs dlight | mma / torch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in res["shapes"]:
        s = row["summary"]
        m, n, k = row["m"], row["n"], row["k"]
        lines.append(f"| {row['name']} | {m} | {n} | {k} | {_f(s['dlight_ms'])} | {_f(s['mma_ms'])} ({s['mma_label']}) "
                     f"| {_f(s['torch_ms'])} | {_f(tflops(m, n, k, s['dlight_ms']), 0)} / "
                     f"{_f(tflops(m, n, k, s['mma_ms']), 0)} / {_f(tflops(m, n, k, s['torch_ms']), 0)} "
                     f"| {_f(s['mma_speedup_vs_dlight'], 2)}x | {_f(s['mma_vs_torch'], 2)} |")
    lines += ["", "## Every module", "", "| module | p50 ms | p99 ms | TFLOP/s | error | ok |",
              "|---|---|---|---|---|---|"] + module_rows(res, 0)
    if res.get("errors") or res.get("build_failed") or meta.get("sources_missing"):
        lines += ["", "## Problems", ""]
        lines += [f"- {e}" for e in res.get("errors", [])]
        lines += [f"- build failed: {f['shape']} {f['label']}: {f['error'][:300]}" for f in res.get("build_failed", [])]
        if meta.get("sources_missing"):
            lines.append(f"- CUDA source not found in: {', '.join(meta['sources_missing'])}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# check (CPU side of run)
# ---------------------------------------------------------------------------------------------------------

def cmd_check(a) -> int:
    from workbench.models import cubin_cache
    d = Path(a.dir)
    man = load_manifest(d)
    srcs, missing = module_sources(d, man)
    if missing:
        print(f"CUDA source missing in: {', '.join(missing)}")
        return 1
    print(f"manifest: {len(man['modules'])} modules, {len(man['shapes'])} shapes, every CUDA source found")
    pick = [m for m in man["modules"] if m["kind"] == "mma"][: a.nvrtc]
    for mod in pick:
        t = time.perf_counter()
        cubin = cubin_cache.compile_cubin(srcs[mod["id"]][0], man["arch"])
        print(f"NVRTC {mod['id']}: {len(cubin)} bytes cubin in {time.perf_counter() - t:.1f} s")
    return 0


def build_run_parser(module: str, doc: str, name: str, budget_s: float, reps: int = REPS):
    """(parser, subparsers) of a GEMM benchmark's CLI: `build` (modules into .gpu/<name>) and `run` (on the GPU)."""
    p = argparse.ArgumentParser(prog=f"python -m bench.{module}", description=doc.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the modules here (full TVM, no GPU)")
    b.add_argument("--out", default=str(ROOT / ".gpu" / name))
    b.add_argument("--force", action="store_true", help="rebuild modules whose .json exists")
    b.add_argument("--shapes", default="", help="comma-separated shape names (default: all)")
    r = sub.add_parser("run", help="measure on the GPU (runtime-only TVM)")
    r.add_argument("--dir", default=f".gpu/{name}")
    r.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    r.add_argument("--reps", type=int, default=reps)
    r.add_argument("--workers", type=int, default=0)
    r.add_argument("--budget-s", type=float, default=budget_s, help="skip remaining shapes after this many seconds")
    return p, sub


def main(argv: list[str] | None = None) -> int:
    p, sub = build_run_parser("gemm_tensorcore", __doc__, "gemm_tc", 140.0)
    c = sub.add_parser("check", help="CPU side of run: manifest, sources, NVRTC of a few")
    c.add_argument("--dir", default=".gpu/gemm_tc")
    c.add_argument("--nvrtc", type=int, default=3, help="how many mma sources to compile with NVRTC")
    a = p.parse_args(argv)
    return {"build": cmd_build, "run": cmd_run, "check": cmd_check}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
