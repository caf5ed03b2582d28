"""Compile the artifacts the worker's GPU tests and benchmarks use, on the build machine (no GPU needed).

    python -m bench.worker_artifacts [--out .gpu/worker] [--models mlp,resnet50,bert_base] [--keep-weights]

Writes <out>/<model>_cuda (sm_90) for each model and <out>/mlp_cpu. Weights are the seeded synthetic kind, and
weights.bin is deleted from every artifact but mlp's (unless --keep-weights), so the folder stays far below the
64 MiB the device tool carries; the runtime regenerates the weights bit for bit from the manifest's seed when
the file is absent (workbench.models.artifact.regenerate_weights). Carry `.gpu` to the GPU machine."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.worker_common import ARTIFACTS


def build(name: str, target: str, out: Path, keep_weights: bool) -> tuple[Path, float]:
    from workbench.models import zoo
    from workbench.models.artifact import Artifact
    from workbench.models.compiler import compile_model
    d = out / f"{name}_{target}"
    if (d / "manifest.json").is_file():
        return d, 0.0
    t0 = time.perf_counter()
    compile_model(zoo.get(name), d, target=target, arch="sm_90", weights="synthetic", seed=0,
                  tuning=None)   # the untuned baseline the worker benchmarks compare against
    art = Artifact.open(d)
    assert art.weights_regenerable
    if not keep_weights and name != "mlp":
        (d / "weights.bin").unlink()
    return d, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.worker_artifacts", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ARTIFACTS))
    p.add_argument("--models", default="mlp,resnet50,bert_base", help="zoo models to compile for cuda")
    p.add_argument("--keep-weights", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [("mlp", "cpu")] + [(m, "cuda") for m in a.models.split(",") if m]
    for name, target in jobs:
        d, secs = build(name, target, out, a.keep_weights)
        size = sum(f.stat().st_size for f in d.iterdir()) / 2**20
        print(f"{d}: {'exists' if secs == 0 else f'compiled in {secs:.0f} s'}, {size:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
