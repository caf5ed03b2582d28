"""Dispatch rate of the emulated worker in virtual time: actions per second of wall time on one core.

    python -m bench.worker_emulated [--gpus 6] [--models 600] [--actions 200000] [--seed 0]

A closed-loop driver keeps every GPU busy: it holds `--depth` Infer actions outstanding per GPU on models whose
weights are loaded (random model, batch 1..16), and every `--churn`-th action it evicts a model and loads
another (the controller's job in a real run). The driver is a few lines per result, so the figure is close to
the worker's own cost. Writes bench/results/worker_emulated.json and .md."""
from __future__ import annotations

import argparse
import os
import random
import time

from bench.worker_common import write
from workbench.clock import VirtualClock
from workbench.contract import EvictWeights, Infer, LoadModelFromDisk, LoadWeights
from workbench.worker.config import WorkerConfig
from workbench.worker.emulated import EmulatedWorker


def run(gpus: int, models: int, actions: int, depth: int, churn: int, seed: int, profile: str = "h200") -> dict:
    clock = VirtualClock()
    rng = random.Random(seed)
    counts = {"results": 0, "errors": 0}
    ids = iter(range(1, 10**12))
    loaded: list[list[int]] = [[] for _ in range(gpus)]
    unloaded = list(range(models))
    state = {"submitted": 0}
    w: EmulatedWorker

    infer_gpu: dict[int, int] = {}

    def submit_infer(g: int) -> None:
        m = loaded[g][rng.randrange(len(loaded[g]))]
        i = next(ids)
        infer_gpu[i] = g
        w.submit(Infer(id=i, model_id=m, gpu=g, batch_size=rng.randint(1, 16)))
        state["submitted"] += 1

    def on_result(r) -> None:
        counts["results"] += 1
        counts["errors"] += not r.ok
        g = infer_gpu.pop(r.id, None)
        if g is None or state["submitted"] >= actions:
            return
        if state["submitted"] % churn == 0 and unloaded:
            victim = loaded[g].pop(rng.randrange(len(loaded[g])))
            new = unloaded.pop(rng.randrange(len(unloaded)))
            w.submit(EvictWeights(id=next(ids), model_id=victim, gpu=g))
            w.submit(LoadWeights(id=next(ids), model_id=new, gpu=g))
            unloaded.append(victim)
            loaded[g].append(new)
            state["submitted"] += 2
        submit_infer(g)

    cfg = WorkerConfig.load(None, weights_cache_size="40 GiB")
    w = EmulatedWorker(clock, gpus, profile, cfg, on_result, seed=seed)
    w.submit(LoadModelFromDisk(id=0, model_id=0, path="profile:resnet50", copies=models))
    clock.run()
    per_gpu = min(40, models // gpus)
    for g in range(gpus):
        for _ in range(per_gpu):
            m = unloaded.pop()
            loaded[g].append(m)
            w.submit(LoadWeights(id=next(ids), model_id=m, gpu=g))
    clock.run()
    counts["results"] = counts["errors"] = 0
    state["submitted"] = 0
    t0_virtual = clock.now()
    t0, c0 = time.perf_counter(), time.process_time()
    for g in range(gpus):
        for _ in range(depth):
            submit_infer(g)
    clock.run()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    virtual = (clock.now() - t0_virtual) / 1e9
    problems = w.check_consistency()
    return {"gpus": gpus, "models": models, "actions": counts["results"], "errors": counts["errors"],
            "wall_s": wall, "cpu_s": cpu, "virtual_s": virtual, "actions_per_s": counts["results"] / wall,
            "actions_per_cpu_s": counts["results"] / cpu,
            "speedup_vs_real_time": virtual / wall, "events": clock.events_run, "consistent": not problems}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.worker_emulated", description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=6)
    p.add_argument("--models", type=int, default=600)
    p.add_argument("--actions", type=int, default=200_000)
    p.add_argument("--depth", type=int, default=2, help="Infer actions outstanding per GPU")
    p.add_argument("--churn", type=int, default=50, help="an evict+load every N actions")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rows = [run(a.gpus, a.models, a.actions, a.depth, a.churn, a.seed),
            run(1, 100, a.actions // 2, a.depth, 10**9, a.seed)]
    from bench.controller_common import core_description
    core = core_description()
    md = ["| GPUs | model copies | actions | errors | wall s | CPU s | virtual s | actions/s wall | actions per CPU-s "
          "| virtual/wall |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        md.append(f"| {r['gpus']} | {r['models']} | {r['actions']} | {r['errors']} | {r['wall_s']:.2f} | "
                  f"{r['cpu_s']:.2f} | {r['virtual_s']:.1f} | {r['actions_per_s']:,.0f} | {r['actions_per_cpu_s']:,.0f} "
                  f"| {r['speedup_vs_real_time']:.0f}x |")
    md += ["", "Infer actions (batch 1..16 on ResNet-50 copies, profile h200) with an evict+load every "
           f"{a.churn} actions in the first row and none in the second; every action answered, cache consistent: "
           f"{all(r['consistent'] for r in rows)}. One process, one thread; 'per CPU-s' divides by the process's "
           f"CPU time, the fair figure on a shared machine (load average {os.getloadavg()[0]:.1f} during this run). "
           f"The worker's state machine (emulated_lean): {core}."]
    write("worker_emulated", {"runs": rows, "args": vars(a), "core": core}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
