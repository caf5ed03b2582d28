"""Pageable Infer inputs: staged through the pinned host io arena, or copied by the driver from where they lie?

    python -m bench.worker_staging [--models resnet50_cuda:1,bert_base_cuda:16,...] [--rounds 6]

The CUDA worker stages a pageable input smaller than `workbench.worker.cuda.STAGE_BELOW` (a host memcpy into
pinned memory, then DMA) and lets the driver copy a larger one. Each (model, batch) runs Infers through one
CUDAWorker with the threshold set either way, in alternating rounds of 100 (after 10 warm-up each), and reports
p50 end to end (submit -> on_result) and the input copy's GPU span. Writes bench/results/worker_staging.*"""
from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np

from bench.worker_common import ARTIFACTS, artifact, pct, write
from bench.worker_exec import CFG, inputs_for
from workbench.contract import Infer, LoadModelFromDisk, LoadWeights
from workbench.worker import cuda
from workbench.worker.config import WorkerConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.worker_staging", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet50_cuda:1,resnet50_cuda:4,bert_base_cuda:16,mlp_cuda:16,mlp_cuda:1,"
                                        "bert_base_cuda:1")
    p.add_argument("--artifacts", default=str(ARTIFACTS))
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--reps", type=int, default=100)
    a = p.parse_args(argv)
    from workbench.models.artifact import Artifact
    cv, box = threading.Condition(), {}

    def on(r):
        t = time.monotonic_ns()
        with cv:
            box[r.id] = (r, t)
            cv.notify_all()

    w = cuda.CUDAWorker(WorkerConfig.load(None, **CFG), on, num_gpus=1)
    ids = iter(range(1, 10**9))

    def do(action):
        t0 = time.monotonic_ns()
        w.submit(action)
        with cv:
            cv.wait_for(lambda: action.id in box, 60)
            r, t1 = box.pop(action.id)
        assert r.ok, r.message
        return r, t1 - t0

    default = cuda.STAGE_BELOW
    loaded: dict[str, int] = {}
    rows = []
    md = ["| model | batch | input bytes | staged: e2e p50 (us) | driver copy: e2e p50 (us) | driver / staged e2e | "
          "staged: input copy GPU span p50 (us) | driver copy: input copy GPU span p50 (us) | the worker does |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    try:
        for spec in a.models.split(","):
            name, b = spec.split(":")
            b = int(b)
            path = artifact(name, Path(a.artifacts))
            if path is None:
                print(f"skip {name}: not found under {a.artifacts}")
                continue
            if name not in loaded:
                loaded[name] = mid = len(loaded)
                do(LoadModelFromDisk(id=next(ids), model_id=mid, path=str(path)))
                do(LoadWeights(id=next(ids), model_id=mid, gpu=0))
            mid = loaded[name]
            x = tuple(inputs_for(Artifact.open(path), b, np.random.default_rng(0)))
            nbytes = sum(v.nbytes for v in x)
            e2e: dict[str, list[int]] = {"staged": [], "driver": []}
            span: dict[str, list[int]] = {"staged": [], "driver": []}
            for rnd in range(a.rounds):
                for mode in (("staged", "driver") if rnd % 2 == 0 else ("driver", "staged")):
                    cuda.STAGE_BELOW = 1 << 62 if mode == "staged" else 1
                    for i in range(10 + a.reps):
                        r, dt = do(Infer(id=next(ids), model_id=mid, gpu=0, batch_size=b, inputs=x))
                        if i >= 10:
                            e2e[mode].append(dt)
                            span[mode].append(r.copy_input.duration)
            s, d = pct(e2e["staged"], 0.5), pct(e2e["driver"], 0.5)
            rows.append({"model": name, "batch": b, "input_bytes": nbytes, "staged_e2e_p50_us": s / 1e3,
                         "driver_e2e_p50_us": d / 1e3, "staged_copy_span_p50_us": pct(span["staged"], 0.5) / 1e3,
                         "driver_copy_span_p50_us": pct(span["driver"], 0.5) / 1e3})
            md.append(f"| {name} | {b} | {nbytes:,} | {s / 1e3:.1f} | {d / 1e3:.1f} | {d / s:.4f} | "
                      f"{pct(span['staged'], 0.5) / 1e3:.1f} | {pct(span['driver'], 0.5) / 1e3:.1f} | "
                      f"{'stages' if nbytes < default else 'driver copy'} |")
    finally:
        cuda.STAGE_BELOW = default
        w.close()
    md += ["", f"{a.rounds} alternating rounds of {a.reps} Infers per way (after 10 warm-up each), one at a time, "
           f"inputs from the caller's pageable numpy arrays. 'staged': a host memcpy into the pinned host io arena, "
           f"then DMA; 'driver copy': cudaMemcpyAsync from the pageable array. The input copy's GPU span runs from "
           f"the event recorded before staging to the one after the copy. The worker stages inputs under "
           f"STAGE_BELOW = {default:,} bytes (last column)."]
    write("worker_staging", {"rows": rows, "args": vars(a), "stage_below": default}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
