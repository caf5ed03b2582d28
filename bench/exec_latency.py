"""Exec latency of the zoo's CUDA artifacts next to torch eager on the same GPU, and kernel load times.

Runs ON THE GPU MACHINE with a runtime-only TVM; the artifacts come from `python -m bench.build_gpu_artifacts`:

    PYTHONPATH=$PWD/.device-site:$PWD TVM_USE_RUNTIME_LIB=1 python -m bench.exec_latency \\
        [--artifacts .gpu/artifacts.tar.xz] [--models all] [--batch-sizes 1,2,4,8,16] [--iters 200] [--no-torch]

Per model:
- kernels: first load of b{min}.so with an empty cubin cache (NVRTC compiles its CUDA source) vs the same load
  again (cache hit), then the first run after load (cuModuleLoadData of the cubin); the other batch sizes are
  precompiled in parallel processes, so that nothing is compiled later;
- exec: for each batch size, `LoadedArtifact.run` on a non-blocking cupy stream with inputs already on the GPU
  and weights in cupy pages; GPU time between CUDA events around the call (p50/p99), and the host time the
  call takes to return (launch);
- torch eager, fp32 with TF32 off (the same arithmetic as TVM's fp32 kernels), cudnn.benchmark on, the same
  architecture (torchvision resnet18/50 and mobilenet_v2 with conv+BN fused for eval, a TransformerEncoder BERT,
  an nn.Sequential MLP) and batch, timed the same way on a torch stream. Ratio = TVM p50 / torch p50.
Writes bench/results/exec_latency.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "results"


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))] if s else float("nan")


def summary(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": pct(ms, 0.5), "p99_ms": pct(ms, 0.99), "mean_ms": float(np.mean(ms)),
            "min_ms": min(ms), "max_ms": max(ms)}


def iterations(est_ms: float, iters: int, budget_s: float) -> int:
    return int(max(30, min(iters, budget_s * 1e3 / max(est_ms, 1e-3))))


# ---------------------------------------------------------------------------------------------------------
# TVM
# ---------------------------------------------------------------------------------------------------------

def artifact_dirs(src: str, models: list[str] | None) -> dict[str, Path]:
    from workbench.models.artifact import unpack_bundle
    p = Path(src)
    if p.is_file():
        dest = ROOT / ".gpu" / "unpacked"
        t0 = time.perf_counter()
        dirs = unpack_bundle(p, dest, only=[f"{m}_cuda" for m in models] if models else None)
        print(f"unpacked {p} into {dest} (weights regenerated) in {time.perf_counter() - t0:.1f} s", flush=True)
    elif p.is_dir():
        dirs = [d for d in sorted(p.iterdir()) if (d / "manifest.json").is_file()]
    else:
        raise SystemExit(f"no artifacts at {p}: run `python -m bench.build_gpu_artifacts` on the CPU machine and "
                         f"carry .gpu/artifacts.tar.xz")
    found = {d.name[:-5]: d for d in dirs if d.name.endswith("_cuda")}
    return {m: found[m] for m in (models or found) if m in found}


def inputs_for(art, b: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    xs = []
    for spec in art.inputs:
        shape = (b, *spec.shape)
        if spec.dtype.startswith("int"):
            xs.append(rng.integers(0, 1000, shape).astype(spec.dtype))
        else:
            xs.append(rng.standard_normal(shape).astype(spec.dtype))
    return xs


def kernel_loads(art, cache_dir: Path) -> dict:
    """Cold (NVRTC) vs cached load of the smallest batch size's .so, then precompile the rest in parallel."""
    import tvm
    from workbench.models import cubin_cache
    b0 = art.batch_sizes[0]
    cache = cubin_cache.install(cubin_cache.CubinCache(cache_dir))
    t0 = time.perf_counter()
    art.load(tvm.cuda(0), batch_sizes=[b0])
    cold_s = time.perf_counter() - t0
    nvrtc_s = cache.stats.compile_seconds
    compiles = cache.stats.compiles
    t0 = time.perf_counter()
    art.load(tvm.cuda(0), batch_sizes=[b0])
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = cubin_cache.precompile_artifact(art, cubin_cache.device_arch(0), cache)
    pre_s = time.perf_counter() - t0
    return {"batch_size": b0, "cold_load_s": cold_s, "nvrtc_s": nvrtc_s, "nvrtc_compiles": compiles,
            "cached_load_s": warm_s, "cache_hits": cache.stats.hits,
            "precompiled_other_sos": n, "precompile_parallel_s": pre_s}


def time_tvm(art, loaded, binding, b: int, iters: int, budget_s: float) -> tuple[dict, dict, float, int]:
    import cupy
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        xs = [cupy.asarray(x) for x in inputs_for(art, b)]
    stream.synchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    free_before = cupy.cuda.runtime.memGetInfo()[0]
    t0 = time.perf_counter()
    loaded.run(b, xs, binding, stream=stream)                 # first run: cuModuleLoadData, allocator warm-up
    stream.synchronize()
    first_ms = (time.perf_counter() - t0) * 1e3
    pool_growth = free_before - cupy.cuda.runtime.memGetInfo()[0]   # TVM's pooled allocator (+ kernels)
    for _ in range(5):
        loaded.run(b, xs, binding, stream=stream)
    stream.synchronize()
    gpu, host = [], []
    est = None
    n = iters
    i = 0
    while i < n:
        h0 = time.perf_counter_ns()
        start.record(stream)
        loaded.run(b, xs, binding, stream=stream)
        end.record(stream)
        h1 = time.perf_counter_ns()
        end.synchronize()
        gpu.append(cupy.cuda.get_elapsed_time(start, end))
        host.append((h1 - h0) / 1e6)
        if est is None:
            est = gpu[-1]
            n = iterations(est, iters, budget_s)
        i += 1
    return summary(gpu), summary(host), first_ms, pool_growth


# ---------------------------------------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------------------------------------

def torch_model(name: str):
    """The same architecture in torch (eval, fp32, on the GPU), or None if torch/torchvision lack it."""
    import torch
    from torch import nn
    from workbench.models import zoo
    if name == "mlp":
        s = zoo.MLP_SIZES
        m = nn.Sequential(nn.Linear(s[0], s[1]), nn.ReLU(), nn.Linear(s[1], s[2]), nn.ReLU(), nn.Linear(s[2], s[3]))
        note = "nn.Sequential"
    elif name in ("resnet18", "resnet50", "mobilenet_v2"):
        import torchvision
        m = getattr(torchvision.models, name)(weights=None).eval()
        note = f"torchvision.models.{name}"
        try:
            from torch.fx.experimental.optimization import fuse
            m = fuse(m)                                       # conv+BN folded, like the zoo's graphs
            note += ", conv+BN fused"
        except Exception as e:  # noqa: BLE001
            note += f", BN not fused ({type(e).__name__})"
    elif name in zoo.TRANSFORMER_CONFIGS:
        cfg = zoo.TRANSFORMER_CONFIGS[name]

        class Bert(nn.Module):
            def __init__(self):
                super().__init__()
                self.word = nn.Embedding(cfg.vocab, cfg.hidden)
                self.pos = nn.Embedding(cfg.positions, cfg.hidden)
                self.typ = nn.Embedding(cfg.token_types, cfg.hidden)
                self.ln = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
                layer = nn.TransformerEncoderLayer(cfg.hidden, cfg.heads, cfg.ffn, dropout=0.0, activation="gelu",
                                                   batch_first=True, layer_norm_eps=cfg.eps)
                self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
                self.pool = nn.Linear(cfg.hidden, cfg.hidden)

            def forward(self, ids):
                pos = torch.arange(ids.shape[1], device=ids.device)
                x = self.ln(self.word(ids.long().clamp(0, cfg.vocab - 1)) + self.pos(pos) + self.typ.weight[0])
                h = self.encoder(x)
                return torch.tanh(self.pool(h[:, 0]))
        m = Bert()
        note = f"nn.TransformerEncoder {cfg.layers}x{cfg.hidden}, {cfg.heads} heads, FFN {cfg.ffn}, seq {cfg.seq}"
    else:
        return None, "no torch equivalent"
    return m.eval().cuda(), note


def time_torch(model, art, b: int, iters: int, budget_s: float) -> dict:
    import torch
    stream = torch.cuda.Stream()
    xs = [torch.from_numpy(x).cuda() for x in inputs_for(art, b)]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ms: list[float] = []
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(10):
            model(*xs)
        stream.synchronize()
        n, i = iters, 0
        while i < n:
            start.record(stream)
            model(*xs)
            end.record(stream)
            end.synchronize()
            ms.append(start.elapsed_time(end))
            if i == 0:
                n = iterations(ms[0], iters, budget_s)
            i += 1
    return summary(ms)


# ---------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.exec_latency", description=__doc__.split("\n")[0])
    p.add_argument("--artifacts", default=str(ROOT / ".gpu" / "artifacts.tar.xz"), help="bundle or directory")
    p.add_argument("--models", default="all")
    p.add_argument("--batch-sizes", default=None, help="default: every compiled batch size")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--budget-s", type=float, default=2.0, help="max seconds of timed runs per model/batch/system")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)

    import cupy
    import tvm
    from workbench.models import cubin_cache
    from workbench.models.artifact import Artifact
    from workbench.models.runtime import alloc_pages, copy_weights

    dirs = artifact_dirs(a.artifacts, None if a.models == "all" else a.models.split(","))
    wanted_b = [int(b) for b in a.batch_sizes.split(",")] if a.batch_sizes else None
    torch_ok = not a.no_torch
    if torch_ok:
        try:
            import torch
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.benchmark = True
        except ImportError:
            torch_ok = False
    loads, rows = [], []
    with tempfile.TemporaryDirectory(prefix="wb-cubins-") as cache_root:
        for model, d in dirs.items():
            art = Artifact.open(d)
            kl = kernel_loads(art, Path(cache_root) / model)
            kl["model"] = model
            loads.append(kl)
            print(f"{model}: load b{kl['batch_size']} cold {kl['cold_load_s']:.2f} s (NVRTC {kl['nvrtc_s']:.2f} s), "
                  f"cached {kl['cached_load_s'] * 1e3:.1f} ms; precompiled {kl['precompiled_other_sos']} more in "
                  f"{kl['precompile_parallel_s']:.1f} s", flush=True)
            bs = [b for b in art.batch_sizes if wanted_b is None or b in wanted_b]
            loaded = art.load(tvm.cuda(0), batch_sizes=bs)
            pages = alloc_pages(art, tvm.cuda(0))
            copy_weights(art, pages)
            binding = loaded.bind_weights(pages)
            tmodel, note = torch_model(model) if torch_ok else (None, "skipped")
            for b in bs:
                tvm_gpu, tvm_host, first_ms, growth = time_tvm(art, loaded, binding, b, a.iters, a.budget_s)
                row = {"model": model, "batch_size": b, "tvm": tvm_gpu, "tvm_host_call": tvm_host,
                       "tvm_first_run_ms": first_ms, "torch_note": note, "device_mem_growth_first_run": growth,
                       "workspace_bytes": art.workspace_bytes(b), "workspace_alloc_bytes": art.workspace_alloc_bytes(b),
                       "io_bytes": art.io_bytes(b)}
                if tmodel is not None:
                    row["torch"] = time_torch(tmodel, art, b, a.iters, a.budget_s)
                    row["ratio_p50"] = tvm_gpu["p50_ms"] / row["torch"]["p50_ms"]
                rows.append(row)
                print(f"  b{b:<3} TVM p50 {tvm_gpu['p50_ms']:.3f} p99 {tvm_gpu['p99_ms']:.3f} ms (call returns in "
                      f"{tvm_host['p50_ms']:.3f} ms)" + (f" | torch p50 {row['torch']['p50_ms']:.3f} p99 "
                                                          f"{row['torch']['p99_ms']:.3f} ms | ratio "
                                                          f"{row['ratio_p50']:.2f}" if "torch" in row else ""),
                      flush=True)
            del loaded, binding, pages, tmodel
            cupy.get_default_memory_pool().free_all_blocks()
    props = cupy.cuda.runtime.getDeviceProperties(0)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "python": sys.version.split()[0],
            "gpu": props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]),
            "tvm": tvm.__version__, "runtime_only": bool(getattr(tvm.base, "_RUNTIME_ONLY", False)),
            "nvrtc": cubin_cache.nvrtc_version(), "cuda_headers": cubin_cache.header_setup().include_dirs,
            "torch": __import__("torch").__version__ if torch_ok else None, "cpus": os.cpu_count()}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exec_latency.json").write_text(json.dumps({"kernel_loads": loads, "exec": rows, "meta": meta},
                                                      indent=1) + "\n")
    (out / "exec_latency.md").write_text(markdown(loads, rows, meta))
    print(f"wrote {out / 'exec_latency.json'} and .md")
    return 0


def markdown(loads: list[dict], rows: list[dict], meta: dict) -> str:
    lines = ["# exec_latency", "",
             f"Measured {meta['when']} on {meta['host']} ({meta['gpu']}), TVM {meta['tvm']} "
             f"(runtime-only: {meta['runtime_only']}), NVRTC {meta['nvrtc']}, torch {meta['torch']}. "
             "Written by `python -m bench.exec_latency`.", "",
             "GPU time between CUDA events around one `LoadedArtifact.run` on a non-blocking stream (inputs and "
             "weights already on the GPU); torch eager fp32 (TF32 off, cudnn.benchmark) timed the same way. "
             "Ratio = TVM p50 / torch p50. 'call returns' = host time until `run` returns (launches are async).", "",
             "| model | b | TVM p50 ms | TVM p99 ms | p99/p50 | call returns ms | first run ms | torch p50 ms | "
             "torch p99 ms | ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["tvm"]
        tt = r.get("torch")
        lines.append(f"| {r['model']} | {r['batch_size']} | {t['p50_ms']:.3f} | {t['p99_ms']:.3f} | "
                     f"{t['p99_ms'] / t['p50_ms']:.3f} | {r['tvm_host_call']['p50_ms']:.3f} | "
                     f"{r['tvm_first_run_ms']:.1f} | "
                     + (f"{tt['p50_ms']:.3f} | {tt['p99_ms']:.3f} | {r['ratio_p50']:.2f} |" if tt else "- | - | - |"))
    notes = sorted({(r["model"], r["torch_note"]) for r in rows})
    lines += ["", "torch models: " + "; ".join(f"{m}: {n}" for m, n in notes)]
    lines += ["", "## Kernel loads (cubin cache)", "",
              "First load of the smallest batch size's .so with an empty cache (NVRTC compiles its CUDA source) "
              "vs the same load again (cache hit); the other .so files are then compiled in parallel processes.", "",
              "| model | .so | first load s (NVRTC) | NVRTC s | cached load ms | other .so precompiled | "
              "in parallel s |", "|---|---|---|---|---|---|---|"]
    for k in loads:
        lines.append(f"| {k['model']} | b{k['batch_size']} | {k['cold_load_s']:.2f} | {k['nvrtc_s']:.2f} | "
                     f"{k['cached_load_s'] * 1e3:.1f} | {k['precompiled_other_sos']} | "
                     f"{k['precompile_parallel_s']:.1f} |")
    lines += ["", "## Device memory taken by the first run of each batch size vs the manifest's estimates", "",
              "Growth = drop of cudaMemGetInfo's free memory across the first run (TVM's pooled allocator, which "
              "keeps what it allocates, plus the outputs); planned peak = `workspace_bytes`; all allocations = "
              "`workspace_alloc_bytes` (docs/artifact.md). Batch sizes run in ascending order, so a later batch "
              "size may reuse pool blocks of an earlier one.", "",
              "| model | b | growth MB | planned peak MB | all allocations MB | io MB |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['device_mem_growth_first_run'] / 1e6:.1f} | "
                     f"{r['workspace_bytes'] / 1e6:.1f} | {r['workspace_alloc_bytes'] / 1e6:.1f} | "
                     f"{r['io_bytes'] / 1e6:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
