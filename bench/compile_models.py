"""Compile time per model and batch size, and artifact sizes, for the CPU (llvm) and CUDA (sm_90) targets.

    python -m bench.compile_models [--models mlp,tiny_transformer] [--targets cpu,cuda] [--batch-sizes 1,2,4,8,16]

CPU-heavy (one core per compile): the default runs only the small models; pass --models with the zoo names to
measure the rest (`--models all`), or `--from-artifacts .gpu/artifacts` to record what
`bench.build_gpu_artifacts` measured without compiling again. Results merge into bench/results/compile.json by
(model, target), so runs accumulate; compile.md is rewritten from the merged table. Compile time is the wall
time of TVM's Relax pipeline, build and export of one b{N}.so (as the manifest records it), on this machine.
Untuned by default (TVM's default schedules: the baseline, stable when data/tuning changes); `--tuning auto|DIR`
measures the tuned compile instead, recorded as separate rows (the model may be renamed by its lowering, e.g.
resnet50 -> resnet50-matmul).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results"


def row_from_manifest(art, total_s: float | None = None, get_s: float | None = None) -> dict:
    m = art.manifest
    files = {p.name: p.stat().st_size for p in art.path.iterdir()}
    per_batch = {b: {"compile_s": m["batches"][str(b)]["compile_seconds"], "so_bytes": m["batches"][str(b)]["bytes"],
                     "workspace_bytes": m["batches"][str(b)]["workspace_bytes"],
                     "io_bytes": m["batches"][str(b)]["io_bytes"]} for b in art.batch_sizes}
    return {
        "model": m["name"], "target": m["target"], "arch": m["arch"], "tvm_version": m["tvm_version"],
        "zoo_get_s": get_s, "total_s": round(total_s if total_s is not None
                                             else sum(v["compile_s"] for v in per_batch.values()), 3),
        "per_batch": per_batch,
        "weights_bytes": m["weights"]["total_bytes"], "weights_file_bytes": m["weights"]["file_bytes"],
        "pages": m["weights"]["num_pages"], "page_size": m["weights"]["page_size"],
        "runs": [r for r in m["weights"]["runs"] if r[1] > 1],
        "artifact_bytes": sum(files.values()), "when": m.get("created"),
        "tuning": (m.get("tuning") or {}).get("database") or ("variant" if m.get("tuning") else None),
    }


def row_key(r: dict) -> tuple:
    return r["model"], r["target"], bool(r.get("tuning"))


def measure(model: str, target: str, batch_sizes: list[int], arch: str, seed: int,
            tuning: str | None = None) -> dict:
    from workbench.models import zoo
    from workbench.models.compiler import compile_model
    tmp = Path(tempfile.mkdtemp(prefix="wb-compile-bench-"))
    try:
        t0 = time.perf_counter()
        src = zoo.get(model, seed=seed)
        get_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        art = compile_model(src, tmp / model, batch_sizes=batch_sizes, target=target, arch=arch,
                            weights="synthetic", seed=seed, tuning=tuning if target == "cuda" else None)
        return row_from_manifest(art, time.perf_counter() - t0, round(get_s, 3))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def human(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# compile", "", f"Written by `python -m bench.compile_models` on {meta['host']} ({meta['cpus']} CPUs, "
             f"{meta['platform']}), TVM {rows[0]['tvm_version'] if rows else '?'}, last run {meta['when']}.",
             "Compile time per batch size = Relax pipeline + build + export of one b{N}.so (wall, this machine).", "",
             "| model | target | b | compile s | .so | workspace | io |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        for b, p in r["per_batch"].items():
            lines.append(f"| {r['model']}{' (tuned)' if r.get('tuning') else ''} | "
                         f"{r['target']}{'/' + r['arch'] if r['arch'] else ''} | {b} | "
                         f"{p['compile_s']:.2f} | {human(p['so_bytes'])} | {human(p['workspace_bytes'])} | "
                         f"{human(p['io_bytes'])} |")
    lines += ["", "| model | target | total compile s | weights | pages x size | runs | artifact |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']}{' (tuned)' if r.get('tuning') else ''} | {r['target']} | {r['total_s']:.1f} | "
                     f"{human(r['weights_bytes'])} | "
                     f"{r['pages']} x {r['page_size'] // 2**20 if r['page_size'] >= 2**20 else r['page_size']}"
                     f"{' MiB' if r['page_size'] >= 2**20 else ' B'} | "
                     f"{', '.join(f'{a}-{a + n - 1}' for a, n in r['runs']) or '-'} | {human(r['artifact_bytes'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compile_models", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="mlp,tiny_transformer", help="comma-separated zoo names, or 'all'")
    p.add_argument("--targets", default="cpu,cuda")
    p.add_argument("--batch-sizes", default="1,2,4,8,16")
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--from-artifacts", default=None, metavar="DIR",
                   help="record rows from the manifests of artifacts already compiled in DIR (e.g. .gpu/artifacts "
                        "from bench.build_gpu_artifacts) instead of compiling")
    p.add_argument("--tuning", default="none", metavar="none|auto|DIR",
                   help="none (default): TVM's default schedules; auto: data/tuning (or $WORKBENCH_TUNING_DB); DIR: "
                        "another tuning database (CUDA only)")
    a = p.parse_args(argv)
    tuning = None if a.tuning == "none" else a.tuning
    if tuning not in (None, "auto") and not Path(tuning).is_dir():
        p.error(f"--tuning {tuning}: no such tuning database directory (use none, auto or a directory)")
    from workbench.models import zoo
    models = zoo.names() if a.models == "all" else [m for m in a.models.split(",") if m]
    unknown = [m for m in models if m not in zoo.names()]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(zoo.names())}")
    batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "compile.json"
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    rows = {row_key(r): r for r in old}
    if a.from_artifacts:
        from workbench.models.artifact import Artifact
        jobs = [(None, None, Artifact.open(d)) for d in sorted(Path(a.from_artifacts).iterdir())
                if (d / "manifest.json").is_file()]
    else:
        jobs = [(m, t, None) for m in models for t in a.targets.split(",") if t]
    for model, target, art in jobs:
        r = measure(model, target, batch_sizes, a.arch, a.seed, tuning) if art is None else row_from_manifest(art)
        rows[row_key(r)] = r
        print(f"{r['model']:18s} {r['target']:5s} total {r['total_s']:7.1f} s  "
              + "  ".join(f"b{b}: {v['compile_s']:.1f} s/{v['so_bytes'] / 1e6:.2f} MB"
                          for b, v in r["per_batch"].items()), flush=True)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "python": sys.version.split()[0]}
    ordered = sorted(rows.values(), key=lambda r: (zoo.names().index(r["model"]) if r["model"] in zoo.names()
                                                   else 99, r["model"], r["target"], bool(r.get("tuning"))))
    path.write_text(json.dumps({"rows": ordered, "meta": meta}, indent=1) + "\n")
    (out / "compile.md").write_text(markdown(ordered, meta))
    print(f"wrote {path} and compile.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
