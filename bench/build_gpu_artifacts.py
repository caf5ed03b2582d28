"""Compile the zoo for CUDA (sm_90) here, where the full TVM is, for the GPU tests and `bench.exec_latency`.

    python -m bench.build_gpu_artifacts [--models all] [--batch-sizes 1,2,4,8,16] [--out .gpu/artifacts]
                                        [--bundle .gpu/artifacts.tar.xz]

Writes <out>/<model>_cuda for every model, plus <out>/mlp_cpu and <out>/tiny_transformer_cpu (the GPU tests
compare CUDA with CPU outputs) and <out>/mlp_fp16_cuda, <out>/tiny_transformer_fp16_cuda (precision fp16: the
tensor-core kernels of schedules.MmaMatmul, checked against the same references) and <out>/mlp_fp16w_cuda,
<out>/tiny_transformer_fp16w_cuda (precision fp16 as the tuned zoo models run it: fp16 activations between
kernels, vectorized injective kernels, and weights stored in fp16, FP16W_VARIANT) and <out>/mlp_sk_cuda,
<out>/tiny_transformer_sk_cuda (fp32 with split-K matmuls, SPLIT_K_VARIANT) and <out>/mlp_simt_cuda,
<out>/tiny_transformer_simt_cuda (fp32 matmuls on the SIMT schedule, split-K partials included: SIMT_VARIANT),
and <out>/tiny_transformer_fp16wqkv_cuda, <out>/tiny_transformer_simtqkv_cuda (the last two with fused projections),
then one bundle <bundle> to carry to the GPU machine.

Why a bundle, and why synthetic weights: the device tool carries at most 64 MiB of ignored files in all (the
runtime-only TVM in .device-site is ~27 MB of it). The zoo's weights are 47 MB (ResNet-18) to 440 MB (BERT),
far too big, so every model except mlp and tiny_transformer is compiled with `weights="synthetic"`: its weights
come from a seeded numpy generator (workbench.models.artifact.synthetic_weights) that runs anywhere without
the compiler, so the bundle leaves weights.bin out and `unpack_bundle` regenerates it on the GPU machine, bit for
bit (checked against the manifest's sha256). Latency does not depend on weight values. mlp and
tiny_transformer keep the zoo's own weights (under 3 MB) so the GPU tests can compare with the NumPy
reference. The .so files hold CUDA source, which xz compresses ~30x.

Untuned by default: these artifacts are the baseline the GPU tests and the other benchmarks compare against,
so they must not change when the tuning database (data/tuning) does. `--tuning auto|DIR` compiles with the
database instead (a zoo model may then switch to its conv lowering, e.g. resnet50 -> resnet50-matmul) and, unless
--out/--bundle are given, writes to .gpu/artifacts-tuned and .gpu/artifacts-tuned.tar.xz, leaving the baseline.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_WEIGHTS = ("mlp", "tiny_transformer")       # small: keep the zoo's weights (checked against references)
CPU_TOO = ("mlp", "tiny_transformer")
VARIANTS_TOO = ("mlp", "tiny_transformer")   # also compiled as the kinds fp16 (tensor cores), fp16w, fp32sk, fp32simt
# ... and as <model>_fp16w_<target>: this variant (tuning.Variant JSON), what the tuning database's fp16 winners
# look like: fp16 activations (schedules.keep_fp16_activations) and fp16 weights (schedules.keep_fp16_weights), the
# reductions reading fp16 on RowReduction (tiny_transformer's rows of 32 and 128: one warp, four rows a block)
ROW_SETTINGS = {"injective": 8, "rows": 8, "row_reduction": 256}
FP16W_VARIANT = {"lowering": "direct", "precision": "fp16", "cuda_graph": False,
                 "schedule": {**ROW_SETTINGS, "activations": "fp16", "reduce_inputs": "fp16"}, "weights": "fp16"}
# ... and as <model>_sk_<target>: fp32 with split-K matmuls (workbench/models/split_k.py)
SPLIT_K_VARIANT = {"lowering": "direct", "precision": "fp32", "cuda_graph": False, "schedule": {"split_k": 1024}}
# ... and as <model>_simt_<target>: fp32 matmuls on schedules.SimtMatmul (workbench/models/simt_gemm.py), split-K on,
# with the row settings of the database's fp32 BERT winners
SIMT_VARIANT = {"lowering": "direct", "precision": "fp32", "cuda_graph": False,
                "schedule": {"split_k": 1024, "simt": True, **ROW_SETTINGS}}
# ... and tiny_transformer (the models with attention) as <model>_fp16wqkv_<target> and <model>_simtqkv_<target>:
# those two with the attention's Q, K and V projections fused (workbench/models/projections.py), as BERT's winners
QKV_TOO = ("tiny_transformer",)
VARIANTS = {"fp16w": FP16W_VARIANT, "fp32sk": SPLIT_K_VARIANT, "fp32simt": SIMT_VARIANT,
            "fp16wqkv": {**FP16W_VARIANT, "projections": "fused"},
            "fp32simtqkv": {**SIMT_VARIANT, "projections": "fused"}}
KINDS = {"fp32": "", "fp16": "_fp16", "fp16w": "_fp16w", "fp32sk": "_sk", "fp32simt": "_simt",     # kind -> dir suffix
         "fp16wqkv": "_fp16wqkv", "fp32simtqkv": "_simtqkv"}


def build(model: str, target: str, out: Path, batch_sizes: list[int], arch: str, seed: int, force: bool,
          tuning: str | None = None, precision: str = "fp32", kind: str | None = None):
    """Compile <out>/<model>[_fp16|_fp16w|_sk|_simt]_<target> (untuned unless `tuning` is "auto" or a database
    directory), or keep an existing artifact built the same way (a tuned artifact is always rebuilt: the database
    may have changed). kind: "fp32", "fp16", "fp16w" (FP16W_VARIANT), "fp32sk" (SPLIT_K_VARIANT) or "fp32simt"
    (SIMT_VARIANT); None: from `precision`."""
    from workbench.models import zoo
    from workbench.models.artifact import Artifact, ArtifactError
    from workbench.models.compiler import compile_model
    from workbench.models.tuning import Variant
    kind = kind or precision
    if kind not in KINDS:
        raise ValueError(f"artifact kind {kind!r}: use one of {', '.join(KINDS)}")
    variant = Variant.from_json(VARIANTS[kind]) if kind in VARIANTS else None
    precision = variant.precision if variant is not None else kind
    d = out / f"{model}{KINDS[kind]}_{target}"
    weights = "source" if model in SOURCE_WEIGHTS else "synthetic"
    if not force and tuning is None and (d / "manifest.json").is_file():
        try:
            art = Artifact.open(d)
            m = art.manifest
            if (list(art.batch_sizes) == sorted(batch_sizes) and (m["arch"] == arch or target == "cpu")
                    and (m["weights"]["generator"] is None) == (weights == "source")
                    and m["name"] == model and all(art.precision(b) == precision for b in art.batch_sizes)
                    and (m.get("tuning") is None if variant is None else
                         (m.get("tuning") or {}).get("variant") == variant.to_json())):
                return art, 0.0
        except ArtifactError:
            pass
    t0 = time.perf_counter()
    art = compile_model(zoo.get(model, seed=seed), d, batch_sizes=batch_sizes, target=target, arch=arch,
                        weights=weights, seed=seed, overwrite=True, tuning=tuning,
                        precision=precision, variant=variant)
    return art, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.build_gpu_artifacts", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="all", help="comma-separated zoo names, or 'all'")
    p.add_argument("--batch-sizes", default="1,2,4,8,16")
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default .gpu/artifacts (.gpu/artifacts-tuned with --tuning)")
    p.add_argument("--bundle", default=None,
                   help="default .gpu/artifacts.tar.xz (.gpu/artifacts-tuned.tar.xz with --tuning)")
    p.add_argument("--force", action="store_true", help="recompile even if an up-to-date artifact exists")
    p.add_argument("--tuning", default="none", metavar="none|auto|DIR",
                   help="none (default): TVM's default schedules, the stable baseline; auto: the tuning database "
                        "in data/tuning (or $WORKBENCH_TUNING_DB); DIR: another database (CUDA artifacts only)")
    a = p.parse_args(argv)
    from workbench.models import zoo
    from workbench.models.artifact import pack_bundle
    tuning = None if a.tuning == "none" else a.tuning
    if tuning not in (None, "auto") and not Path(tuning).is_dir():
        p.error(f"--tuning {tuning}: no such tuning database directory (use none, auto or a directory)")
    suffix = "" if tuning is None else "-tuned"
    out = Path(a.out or ROOT / ".gpu" / f"artifacts{suffix}")
    bundle_path = a.bundle or str(ROOT / ".gpu" / f"artifacts{suffix}.tar.xz")
    models = zoo.names() if a.models == "all" else [m for m in a.models.split(",") if m]
    batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(m, "cuda", "fp32") for m in models] + [(m, "cpu", "fp32") for m in models if m in CPU_TOO]
    jobs += [(m, "cuda", kind) for kind in ("fp16", "fp16w", "fp32sk", "fp32simt") for m in models if m in VARIANTS_TOO
             and tuning is None]
    jobs += [(m, "cuda", kind) for kind in ("fp16wqkv", "fp32simtqkv") for m in models
             if m in QKV_TOO and tuning is None]
    dirs = []
    for model, target, kind in jobs:
        art, secs = build(model, target, out, batch_sizes, a.arch, a.seed, a.force,
                          tuning if target == "cuda" else None, kind=kind)
        size = sum(f.stat().st_size for f in art.path.iterdir())
        tuned = art.manifest.get("tuning")
        print(f"{art.path}: {'up to date' if secs == 0 else f'compiled in {secs:.0f} s'}, {size / 1e6:.1f} MB"
              + (f", tuned ({art.manifest['name']}, from {tuned['database']})" if tuned and tuned.get("database")
                 else f", variant {json.dumps(tuned['variant'])}" if tuned else ""), flush=True)
        dirs.append(art.path)
    bundle = pack_bundle(dirs, bundle_path)
    print(f"wrote {bundle} ({bundle.stat().st_size / 1e6:.1f} MB): carry it with the device tool, e.g. "
          f"carry=['{bundle.relative_to(ROOT) if bundle.is_relative_to(ROOT) else bundle}', '.device-site']")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
