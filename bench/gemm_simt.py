"""SIMT fp32 GEMM (workbench.models.simt_gemm) vs dlight's Matmul rule vs torch (cuBLAS SGEMM, TF32 off).

HERE (full TVM, no GPU): compile every (shape, schedule) as its own module for sm_90 (.so carrying its CUDA
source) plus the GPU test's small modules, and manifest.json:

    python -m bench.gemm_simt build [--out .gpu/gemm_simt] [--force]

ON THE GPU (runtime-only TVM; torch for inputs, reference and cuBLAS):

    PYTHONPATH=$PWD/.device-site:$PWD TVM_USE_RUNTIME_LIB=1 python3 -m bench.gemm_simt run \\
        --dir .gpu/gemm_simt --out $OUT

per shape: random fp32 A, B; torch.matmul with TF32 off is both the reference and the cuBLAS time; each
module's output must be within TOLERANCE (max |out - ref| / max |ref|) of it; GPU time per launch between
CUDA events (p50/p99 of REPS back-to-back launches after WARMUP). Writes <out>/gemm_simt.{json,md}.

Shapes: the strict-fp32 matmuls that dominate our tuned fp32 models at b16 and b4
(bench/results/kernel_breakdown_fp32.md): BERT-base's projections and FFN, ResNet's convs lowered to matmuls
(3x3 by im2col: K = 9 * C), a split-K partial (batched over the K slices) and attention's batched matmuls.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

from bench.gemm_tensorcore import (build_run_parser, measure_module, module_rows, module_sources, time_launches,
                                   tflops)
from bench.kernel_quality import _f, summary

ROOT = Path(__file__).resolve().parents[1]
ARCH = "sm_90"
FORMAT = "workbench-gemm-simt"
FUNCTION = "gemm"
TOLERANCE = 1e-4            # fp32 with fp32 accumulation: only the summation order differs
WARMUP = 10
REPS = 100

# (name, what, batch, M, N, K, B layout)
SHAPES: list[tuple[str, str, int | None, int, int, int, str]] = [
    ("bert_b16_qkv", "bert_base b16: 768x768 projection", None, 2048, 768, 768, "kn"),
    ("bert_b16_ffn1", "bert_base b16: FFN 768->3072", None, 2048, 3072, 768, "kn"),
    ("bert_b16_ffn2", "bert_base b16: FFN 3072->768", None, 2048, 768, 3072, "kn"),
    ("bert_b4_ffn1", "bert_base b4: FFN 768->3072", None, 512, 3072, 768, "kn"),
    ("bert_b4_ffn2", "bert_base b4: FFN 3072->768", None, 512, 768, 3072, "kn"),
    ("r18_b16_l1_3x3", "resnet18 b16: layer1 3x3 conv (56x56, 64ch)", None, 50176, 64, 576, "kn"),
    ("r18_b16_stem", "resnet18 b16: 7x7 stem conv (112x112, K = 147)", None, 200704, 64, 147, "kn"),
    ("r50_b16_l2_3x3", "resnet50 b16: layer2 3x3 conv (28x28, 128ch)", None, 12544, 128, 1152, "kn"),
    ("r50_b16_l3_3x3", "resnet50 b16: layer3 3x3 conv (14x14, 256ch)", None, 3136, 256, 2304, "kn"),
    ("r50_b16_l4_1x1", "resnet50 b16: layer4 1x1 expand (7x7, 512->2048)", None, 784, 2048, 512, "kn"),
    ("r18_b16_l4_sk8", "resnet18 b16: layer4 3x3 as 8 split-K partials", 8, 784, 512, 576, "kn"),
    ("bert_b16_qkt", "bert_base b16: attention Q x K^T (192 heads)", 192, 128, 128, 64, "kn"),
    ("bert_b16_qkt_nk", "bert_base b16: Q x K^T with K read as [t, d] (the zoo's einsum)", 192, 128, 128, 64, "nk"),
    ("bert_b16_pv", "bert_base b16: attention P x V (192 heads)", 192, 128, 64, 128, "kn"),
]
# The search space (SimtConfig fields): block MxNxK, thread tile, pipeline stages, k steps per register load.
SEARCH: dict[str, dict] = {
    f"{bm}x{bn}x{bk}_t{tm}x{tn}_s{st}_f{fk}": dict(block_m=bm, block_n=bn, block_k=bk, thread_m=tm, thread_n=tn,
                                                   stages=st, frag_k=fk)
    for bm, bn, bk, tm, tn, st, fk in [
        (128, 128, 16, 8, 8, 2, 2), (128, 128, 16, 8, 4, 2, 2), (128, 64, 16, 8, 8, 2, 2), (128, 64, 16, 8, 4, 2, 2),
        (64, 64, 16, 8, 4, 2, 2), (64, 64, 16, 8, 4, 3, 2), (64, 64, 16, 4, 4, 2, 4), (64, 128, 16, 8, 8, 2, 2)]}

# Small modules for tests/test_models_simt_gemm.py's GPU test (checked against NumPy there): ragged M/N/K (K % 4
# != 0: narrow copies), B as [N, K], batched. (name, batch, M, N, K, layout, config)
TEST_CASES: list[tuple[str, int | None, int, int, int, str, str]] = [
    ("even_kn", None, 256, 256, 64, "kn", "s128x64"),
    ("ragged_kn", None, 200, 72, 100, "kn", "s64"),
    ("ragged_k_odd", None, 130, 64, 147, "kn", "s64t4"),
    ("ragged_nk", None, 130, 96, 88, "nk", "128x128x16_t8x4_s2_f2"),
    ("batched_kn_s3", 6, 128, 64, 128, "kn", "64x64x16_t8x4_s3_f2"),
    ("batched_ragged_nk", 5, 100, 72, 40, "nk", "s64"),
    ("ragged_kn_96", None, 200, 100, 72, "kn", "s64x96"),
    ("batched_kn_128x96", 3, 130, 192, 64, "kn", "s128x96"),
]


def search_config(label: str):
    """A named config of the schedule (simt_gemm.CONFIGS) or of the search space (SEARCH)."""
    from workbench.models import simt_gemm
    return simt_gemm.SimtConfig.from_json(SEARCH[label]) if label in SEARCH else simt_gemm.named_config(label)


# ---------------------------------------------------------------------------------------------------------
# build (full TVM)
# ---------------------------------------------------------------------------------------------------------

def _export(out: Path, rel: str, f) -> tuple[str, list[str]]:
    import tvm
    from workbench.models.compiler import cuda_sources, make_target
    from workbench.models.tensorcore import PASS_CONFIG
    f = f.with_attr("global_symbol", FUNCTION).with_attr("tirx.is_scheduled", True)
    with tvm.transform.PassContext(opt_level=3, config=PASS_CONFIG):
        ex = tvm.compile(tvm.IRModule({FUNCTION: f}), target=make_target("cuda", ARCH))
    so = out / rel
    so.parent.mkdir(parents=True, exist_ok=True)
    ex.export_library(str(so))
    return rel, cuda_sources(ex)


def build_one(out: Path, shape: tuple, label: str, force: bool) -> dict:
    """One module: the shape's gemm scheduled by dlight's default rules ("dlight") or by a SEARCH config."""
    from workbench.models import schedules, simt_gemm
    from workbench.models.compiler import make_target
    name, _, batch, m, n, k, layout = shape
    mid = f"{name}__{label}"
    meta_path = out / "modules" / f"{mid}.json"
    if meta_path.is_file() and not force:
        return json.loads(meta_path.read_text())
    func = simt_gemm.gemm_func(m, n, k, layout, batch)
    t0 = time.perf_counter()
    config = None
    if label == "dlight":
        tgt = make_target("cuda", ARCH)
        with tgt:
            sch = schedules.apply_rules(func, tgt, schedules.default_rules())
        if sch is None:
            raise RuntimeError("no dlight rule applies")
        f = sch.mod["main"]
    else:
        config = search_config(label)
        f = simt_gemm.scheduled_func(func, config)
    rel, srcs = _export(out, f"modules/{mid}.so", f)
    src = "\n".join(srcs)
    meta = {"id": mid, "shape": name, "label": label, "kind": "dlight" if label == "dlight" else "simt",
            "config": None if config is None else config.to_json(), "so": rel, "function": FUNCTION,
            "cuda_source_sha256": [hashlib.sha256(s.encode()).hexdigest() for s in srcs],
            "uses_cp_async": "cp.async" in src, "build_s": round(time.perf_counter() - t0, 2),
            "so_bytes": (out / rel).stat().st_size}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def build_test_case(out: Path, case: tuple, force: bool) -> dict:
    from workbench.models import simt_gemm
    name, batch, m, n, k, layout, label = case
    meta_path = out / "tests" / f"{name}.json"
    if meta_path.is_file() and not force:
        return json.loads(meta_path.read_text())
    cfg = search_config(label)
    rel, srcs = _export(out, f"tests/{name}.so", simt_gemm.scheduled_func(simt_gemm.gemm_func(m, n, k, layout, batch),
                                                                            cfg))
    meta = {"name": name, "batch": batch, "m": m, "n": n, "k": k, "b_layout": layout, "label": label,
            "config": cfg.to_json(), "so": rel, "function": FUNCTION,
            "cuda_source_sha256": [hashlib.sha256(x.encode()).hexdigest() for x in srcs]}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def cmd_build(a) -> int:
    import tvm
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    modules, failed = [], []
    only = set(a.shapes.split(",")) if a.shapes else None
    shapes = [s for s in SHAPES if not only or s[0] in only]
    for shape in shapes:
        for label in ("dlight", *SEARCH):
            try:
                modules.append(build_one(out, shape, label, a.force))
                print(f"[{time.perf_counter() - t0:6.1f}s] {modules[-1]['id']}", flush=True)
            except (RuntimeError, ValueError) as e:
                failed.append({"shape": shape[0], "label": label, "error": f"{type(e).__name__}: {str(e)[-800:]}"})
                print(f"  FAILED {shape[0]} {label}: {str(e)[-300:]}", flush=True)
    tests = []
    for case in TEST_CASES:
        try:
            tests.append(build_test_case(out, case, a.force))
        except (RuntimeError, ValueError) as e:
            failed.append({"shape": case[0], "label": case[-1], "error": f"{type(e).__name__}: {str(e)[-800:]}"})
            print(f"  FAILED test case {case[0]}: {str(e)[-300:]}", flush=True)
    manifest = {"format": FORMAT, "arch": ARCH, "tvm_version": tvm.__version__, "function": FUNCTION,
                "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "tolerance": TOLERANCE,
                "shapes": [dict(zip(("name", "what", "batch", "m", "n", "k", "b_layout"), s)) for s in shapes],
                "modules": modules, "tests": tests, "failed": failed,
                "build_s": round(time.perf_counter() - t0, 1)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(modules)} modules, {len(tests)} test modules, {len(failed)} failed in {out}")
    return 0 if not failed else 1


# ---------------------------------------------------------------------------------------------------------
# run (GPU, runtime-only TVM)
# ---------------------------------------------------------------------------------------------------------

def cmd_run(a) -> int:
    t0 = time.perf_counter()
    d, out = Path(a.dir), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from bench.worker_common import read_build_manifest
    man = read_build_manifest(d, FORMAT, "gemm_simt")
    import torch
    from workbench.models import cubin_cache
    cubin_cache.ensure_cuda_backend()
    cache = cubin_cache.install(cubin_cache.CubinCache(out / "cubin"))
    arch = cubin_cache.device_arch(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    res: dict = {"format": FORMAT + "-results", "manifest": {k: man[k] for k in ("arch", "tvm_version", "created")},
                 "meta": {"gpu": torch.cuda.get_device_name(0), "arch": arch, "torch": torch.__version__,
                          "python": platform.python_version(), "tolerance": TOLERANCE, "reps": a.reps,
                          "warmup": WARMUP, "allow_tf32": torch.backends.cuda.matmul.allow_tf32},
                 "shapes": [], "errors": [], "build_failed": man.get("failed", [])}

    def save():
        res["elapsed_s"] = round(time.perf_counter() - t0, 1)
        (out / "gemm_simt.json").write_text(json.dumps(res, indent=1) + "\n")
        (out / "gemm_simt.md").write_text(markdown(res))

    srcs, missing = module_sources(d, man)
    res["meta"]["sources_missing"] = missing
    all_srcs = list(dict.fromkeys(s for v in srcs.values() for s in v))
    tc = time.perf_counter()
    cubin_cache.precompile(all_srcs, arch, cache, a.workers or max(1, (os.cpu_count() or 4) - 1))
    res["meta"]["nvrtc_s"] = round(time.perf_counter() - tc, 1)
    res["resources"] = {mid: kernel_resources(cache, ss, arch) for mid, ss in srcs.items() if ss}
    save()
    g = torch.Generator(device="cuda").manual_seed(0)
    for sh in man["shapes"]:
        if time.perf_counter() - t0 > a.budget_s:
            res["errors"].append(f"{sh['name']}: skipped (budget {a.budget_s} s)")
            continue
        q, m, n, k = sh["batch"], sh["m"], sh["n"], sh["k"]
        lead = () if q is None else (q,)
        A = torch.rand(lead + (m, k), device="cuda", generator=g) * 2 - 1
        B = torch.rand(lead + ((k, n) if sh["b_layout"] == "kn" else (n, k)), device="cuda", generator=g) * 2 - 1
        Bm = B if sh["b_layout"] == "kn" else B.transpose(-1, -2)
        ref = torch.matmul(A, Bm)
        flop_m = m * (q or 1)
        row: dict = {**sh, "results": [], "torch": summary(time_launches(lambda: torch.matmul(A, Bm), a.reps))}
        row["torch"]["tflops"] = tflops(flop_m, n, k, row["torch"]["p50_ms"])
        for mod in (x for x in man["modules"] if x["shape"] == sh["name"]):
            C = torch.full(lead + (m, n), float("nan"), device="cuda")
            row["results"].append(measure_module(d, mod, arch, (A, B), C, ref, TOLERANCE, (flop_m, n, k), a.reps))
        ok = [r for r in row["results"] if r.get("ok")]
        dl = next((r for r in ok if r["kind"] == "dlight"), None)
        best = min((r for r in ok if r["kind"] == "simt"), key=lambda r: r["p50_ms"], default=None)
        row["summary"] = {"dlight_ms": dl and dl["p50_ms"], "simt_ms": best and best["p50_ms"],
                          "simt_label": best and best["label"], "torch_ms": row["torch"]["p50_ms"]}
        res["shapes"].append(row)
        print(f"[{time.perf_counter() - t0:5.1f}s] {sh['name']}: {row['summary']}", flush=True)
        save()
    save()
    print((out / "gemm_simt.md").read_text())
    return 0


def kernel_resources(cache, sources: list[str], arch: str) -> dict:
    """Registers per thread, spilled (local) bytes and static shared memory of each kernel of a module's cubins
    (CUDA's function attributes, through cupy): what bounds the blocks per SM of a tile config."""
    import re
    import tempfile
    import cupy
    out = {}
    for src in sources:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as tmp:    # the cache's entries carry a header
            tmp.write(cache.get(src, arch))
            tmp.flush()
            mod = cupy.RawModule(path=tmp.name)
            for name in re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', src):
                k = mod.get_function(name)
                out[name] = {"regs": k.num_regs, "local_bytes": k.local_size_bytes,
                             "static_smem": k.shared_size_bytes}
    return out


def markdown(res: dict) -> str:
    meta = res["meta"]
    lines = ["# gemm_simt: SIMT fp32 schedule vs dlight's Matmul vs torch (cuBLAS, TF32 off)", "",
             f"{meta.get('gpu')} ({meta.get('arch')}), torch {meta.get('torch')}, TVM "
             f"{res['manifest']['tvm_version']} runtime-only. All fp32. Time = GPU ms per launch between CUDA "
             f"events, p50 of {meta['reps']} back-to-back launches after {meta['warmup']} warm-up; error = max "
             f"|out - torch| / max |torch| (tolerance {meta['tolerance']}). Run took {res.get('elapsed_s')} s. "
             f"Written by `python -m bench.gemm_simt run`.", "",
             "| shape | batch | M | N | K | dlight ms | best SIMT ms (config) | torch ms | TFLOP/s dlight / SIMT / "
             "torch | SIMT speedup vs dlight | SIMT / torch |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in res["shapes"]:
        s = row["summary"]
        fm, n, k = row["m"] * (row["batch"] or 1), row["n"], row["k"]
        lines.append(f"| {row['name']} | {row['batch'] or '-'} | {row['m']} | {n} | {k} | {_f(s['dlight_ms'], 4)} "
                     f"| {_f(s['simt_ms'], 4)} ({s['simt_label']}) | {_f(s['torch_ms'], 4)} "
                     f"| {_f(tflops(fm, n, k, s['dlight_ms']), 1)} / {_f(tflops(fm, n, k, s['simt_ms']), 1)} / "
                     f"{_f(tflops(fm, n, k, s['torch_ms']), 1)} "
                     f"| {_f(s['dlight_ms'] / s['simt_ms'] if s['dlight_ms'] and s['simt_ms'] else None, 2)}x "
                     f"| {_f(s['simt_ms'] / s['torch_ms'] if s['simt_ms'] else None, 2)} |")
    lines += ["", "## Every module", "",
              "Registers per thread and spilled bytes of its kernel (CUDA function attributes).", "",
              "| module | p50 ms | p99 ms | TFLOP/s | error | ok | regs | spilled bytes |",
              "|---|---|---|---|---|---|---|---|"]
    def resources(r: dict) -> tuple[str, str]:               # registers and spilled bytes of its kernels
        rs = list(res.get("resources", {}).get(r.get("id"), {}).values())
        return (", ".join(str(x["regs"]) for x in rs) or "-", ", ".join(str(x["local_bytes"]) for x in rs) or "-")

    lines += module_rows(res, 1, resources)
    problems = res.get("errors", []) + [f"build failed: {f['shape']} {f['label']}: {f['error'][:300]}"
                                        for f in res.get("build_failed", [])]
    if meta.get("sources_missing"):
        problems.append(f"CUDA source not found in: {', '.join(meta['sources_missing'])}")
    if problems:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    a = build_run_parser("gemm_simt", __doc__, "gemm_simt", 200.0, REPS)[0].parse_args(argv)
    return {"build": cmd_build, "run": cmd_run}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
