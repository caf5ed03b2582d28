"""Exec latency through the worker vs calling the compiled model directly, per model and batch size.

    python -m bench.worker_exec --device cuda [--models resnet50_cuda,mlp_cuda] [--reps 300]
    python -m bench.worker_exec --device cpu  [--models mlp_cpu] [--reps 300]

For each (model, batch size):
- direct: the minimal work in one thread: inputs to the device, run, outputs back (CUDA: on one stream, exec
  timed with CUDA events; CPU: wall time);
- worker: Infer actions submitted one at a time to a CUDAWorker/CPUWorker, each waited for: the exec duration
  the worker measured (CUDA events / wall) and the end-to-end latency (submit -> on_result).
Figures: exec p50/p99/p99.9 both ways, p99/p50 through the worker (goal <= 1.01), and the worker's overhead
per action = p50(worker end to end) - p50(direct end to end) (goal < 50 us). Artifacts come from
`python -m bench.worker_artifacts` (.gpu/worker, or --artifacts; CPU artifacts are compiled on the fly).
Writes bench/results/worker_exec.json and .md (worker_exec_cpu.* with --device cpu)."""
from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np

from bench.worker_common import ARTIFACTS, artifact, pct, stats_us, write
from workbench.contract import Infer, LoadModelFromDisk, LoadWeights
from workbench.worker.config import WorkerConfig

STEPS = ("submit_to_copy_input", "copy_input_host", "exec_host_minus_device", "copy_output_to_result")
CFG = dict(weights_cache_size="2 GiB", io_pool_size="256 MiB", workspace_pool_size="1 GiB", host_io_pool_size="256 MiB")


def inputs_for(art, n: int, rng) -> list[np.ndarray]:
    out = []
    for s in art.inputs:
        if np.issubdtype(np.dtype(s.dtype), np.integer):
            out.append(rng.integers(0, 100, (n, *s.shape)).astype(s.dtype))
        else:
            out.append(rng.standard_normal((n, *s.shape)).astype(s.dtype))
    return out


def direct(art, device: str, sizes: list[int], reps: int, warmup: int) -> dict[int, tuple[list[int], list[int]]]:
    """Per batch size: (exec ns, end-to-end ns) of running the model directly."""
    from workbench.models.runtime import alloc_pages, copy_weights
    import tvm
    loaded = art.load(tvm.cpu(0) if device == "cpu" else tvm.cuda(0))
    pages = alloc_pages(art, "cpu" if device == "cpu" else "cuda:0")
    copy_weights(art, pages)
    binding = loaded.bind_weights(pages)
    return {b: _direct_one(art, loaded, binding, device, b, reps, warmup) for b in sizes}


def direct_graph(art, sizes: list[int], reps: int, warmup: int) -> dict[int, tuple[list[int], list[int], list[int]]]:
    """Per batch size: (exec ns, end-to-end ns, end-to-end ns from an idle caller) of the direct path run the way
    the CUDA worker runs an exec: one CUDA graph (workbench.worker.cuda_graphs) holding the model, its events and
    the output copy to pinned memory. The like-for-like baseline of the worker's overhead (the VM's launches cost
    host and GPU time that the worker's graphs do not). The idle-caller figure repeats the calls after the caller
    slept for the exec's end-to-end time, as a caller of the worker sleeps while each action runs: on the H200's
    VM a thread that slept pays ~150-200 us of cold caches and wake-up in its next ~300 us of work."""
    import cupy as cp
    import tvm
    import tvm_ffi
    from workbench.models.runtime import alloc_pages, copy_weights
    from workbench.worker import cuda_graphs
    loaded = art.load(tvm.cuda(0))
    pages = alloc_pages(art, "cuda:0")
    copy_weights(art, pages)
    binding = loaded.bind_weights(pages)
    stream = cp.cuda.Stream(non_blocking=True)
    res = {}
    for b in sizes:
        x = inputs_for(art, b, np.random.default_rng(0))
        dev_in = [cp.empty(a.shape, a.dtype) for a in x]
        args = [tvm.runtime.from_dlpack(d) for d in dev_in]
        fn = loaded.functions[b]

        def launch():
            with tvm_ffi.use_raw_stream(loaded.device, stream.ptr):
                out = fn(*args, *binding.tensors)
            return list(out) if not hasattr(out, "shape") else [out]
        launch()                                   # the first call loads the kernels (not allowed in a capture)
        stream.synchronize()
        spans, off = [], 0
        for spec in art.outputs:
            nb = spec.nbytes * b
            spans.append((off, nb, spec))
            off += -(-nb // 256) * 256
        buf = np.frombuffer(cp.cuda.alloc_pinned_memory(off), np.uint8, off)
        events = (cp.cuda.Event(), cp.cuda.Event(), cp.cuda.Event())
        graph, _outs = cuda_graphs.capture(cp, stream, launch, events, buf.ctypes.data, spans)
        execs, e2e, idle_e2e = [], [], []
        for idle in (0.0, None):
            if idle is None:                       # the same calls from a caller that was idle meanwhile
                idle = pct(e2e, 0.5) / 1e9
            for i in range(warmup + reps):
                if idle:
                    time.sleep(idle)
                t0 = time.perf_counter_ns()
                for d, h in zip(dev_in, x):        # from the caller's (pageable) arrays, as the worker does
                    d.set(h, stream=stream)
                graph.launch(stream)
                events[2].synchronize()
                [buf[o:o + nb].view(spec.dtype).reshape((b, *spec.shape)).copy() for o, nb, spec in spans]
                t1 = time.perf_counter_ns()
                if i >= warmup:
                    if idle:
                        idle_e2e.append(t1 - t0)
                    else:
                        execs.append(int(cp.cuda.get_elapsed_time(events[0], events[1]) * 1e6))
                        e2e.append(t1 - t0)
        res[b] = (execs, e2e, idle_e2e)
    return res


def _direct_one(art, loaded, binding, device: str, b: int, reps: int, warmup: int) -> tuple[list[int], list[int]]:
    x = inputs_for(art, b, np.random.default_rng(0))
    execs, e2e = [], []
    if device == "cpu":
        staged = [np.empty_like(a) for a in x]
        for i in range(warmup + reps):
            t0 = time.perf_counter_ns()
            for s, a in zip(staged, x):
                s[...] = a
            t1 = time.perf_counter_ns()
            outs = loaded.run(b, staged, binding)
            t2 = time.perf_counter_ns()
            [np.array(o) for o in outs]
            t3 = time.perf_counter_ns()
            if i >= warmup:
                execs.append(t2 - t1)
                e2e.append(t3 - t0)
        return execs, e2e
    import cupy as cp
    stream = cp.cuda.Stream(non_blocking=True)
    dev_in = [cp.empty(a.shape, a.dtype) for a in x]
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    for i in range(warmup + reps):
        t0 = time.perf_counter_ns()
        with stream:
            for d, h in zip(dev_in, x):      # from the caller's (pageable) arrays, as the in-process worker does
                d.set(h, stream=stream)
            e0.record(stream)
            outs = loaded.run(b, dev_in, binding, stream=stream)
            e1.record(stream)
            host = [o.get(stream=stream) for o in outs]
        stream.synchronize()
        t1 = time.perf_counter_ns()
        if i >= warmup:
            execs.append(int(cp.cuda.get_elapsed_time(e0, e1) * 1e6))
            e2e.append(t1 - t0)
    return execs, e2e


def through_worker(path: Path, art, device: str, sizes: list[int], reps: int, warmup: int) -> dict[int, dict]:
    cv = threading.Condition()
    box: dict = {}

    def on(r):
        t = time.monotonic_ns()       # the worker's clock (MonotonicClock): the breakdown below subtracts them
        with cv:
            box[r.id] = (r, t)
            cv.notify_all()

    if device == "cpu":
        from workbench.worker.cpu import CPUWorker
        w = CPUWorker(WorkerConfig.load(None, **CFG), on)
    else:
        from workbench.worker.cuda import CUDAWorker
        w = CUDAWorker(WorkerConfig.load(None, **CFG), on, num_gpus=1)

    def do(a, steps=None):
        t0 = time.monotonic_ns()
        w.submit(a)
        with cv:
            cv.wait_for(lambda: a.id in box, 120)
            r, t1 = box.pop(a.id)
        if steps is not None and r.ok:   # where the host time goes, on the worker's clock
            ci, ex, co = r.copy_input, r.exec, r.copy_output
            steps["submit_to_copy_input"].append(ci.begin - t0)
            steps["copy_input_host"].append(ex.begin - ci.begin)
            steps["exec_host_minus_device"].append((ex.end - ex.begin) - ex.duration)
            steps["copy_output_to_result"].append(t1 - ex.end)
        return r, t1 - t0
    try:
        r, _ = do(LoadModelFromDisk(id=1, model_id=0, path=str(path)))
        assert r.ok, r.message
        r, _ = do(LoadWeights(id=2, model_id=0, gpu=0))
        assert r.ok, r.message
        ids = iter(range(10, 10**9))
        res = {}
        for b in sizes:
            x = tuple(inputs_for(art, b, np.random.default_rng(0)))
            execs, e2e, cin, cout, clocks = [], [], [], [], []
            steps: dict[str, list[int]] = {k: [] for k in STEPS}
            for i in range(warmup + reps):
                r, dt = do(Infer(id=next(ids), model_id=0, gpu=0, batch_size=b, inputs=x),
                           steps if i >= warmup else None)
                assert r.ok, r.message
                if i >= warmup:
                    execs.append(r.exec.duration)
                    e2e.append(dt)
                    cin.append(r.copy_input.duration)
                    cout.append(r.copy_output.duration)
                    clocks.append(r.gpu_clock)
            res[b] = {"exec": execs, "e2e": e2e, "copy_input": cin, "copy_output": cout, "gpu_clock": clocks,
                      "steps": steps}
        return res
    finally:
        w.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.worker_exec", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--models", default=None, help="artifact names under --artifacts (default: by device)")
    p.add_argument("--artifacts", default=str(ARTIFACTS))
    p.add_argument("--batch-sizes", default=None, help="default: every compiled size")
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    a = p.parse_args(argv)
    from workbench.models.artifact import Artifact
    names = a.models.split(",") if a.models else (["mlp_cpu"] if a.device == "cpu" else
                                                   ["resnet50_cuda", "bert_base_cuda", "mlp_cuda"])
    rows, md = [], ["| model | batch | direct VM exec p50 / p99 / p99.9 (us) | direct graph exec p50 / p99 (us) | "
                    "worker exec p50 / p99 / p99.9 (us) | worker p99/p50 | direct VM / graph e2e p50 (us) | "
                    "worker e2e p50 / p99 (us) | overhead per action (us) | vs the VM (us) | direct graph e2e p50, "
                    "idle caller (us) | overhead vs the idle caller (us) |",
                    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in names:
        path = artifact(name, Path(a.artifacts))
        if path is None and a.device == "cpu" and name == "mlp_cpu":
            from bench.worker_artifacts import build
            path, _ = build("mlp", "cpu", Path(a.artifacts), True)
        if path is None:
            print(f"skip {name}: not found under {a.artifacts} (run python -m bench.worker_artifacts)")
            continue
        art = Artifact.open(path)
        sizes = [int(s) for s in a.batch_sizes.split(",")] if a.batch_sizes else list(art.batch_sizes)
        directs = direct(art, a.device, sizes, a.reps, a.warmup)
        graphs = (direct_graph(art, sizes, a.reps, a.warmup) if a.device == "cuda"
                  else {b: (*v, []) for b, v in directs.items()})
        workers = through_worker(path, art, a.device, sizes, a.reps, a.warmup)
        for b in sizes:
            (d_exec, d_e2e), (g_exec, g_e2e, g_idle), wk = directs[b], graphs[b], workers[b]
            row = {"model": name, "batch": b, "direct_exec": stats_us(d_exec), "direct_e2e": stats_us(d_e2e),
                   "direct_graph_exec": stats_us(g_exec), "direct_graph_e2e": stats_us(g_e2e),
                   "worker_exec": stats_us(wk["exec"]), "worker_e2e": stats_us(wk["e2e"]),
                   "worker_copy_input": stats_us(wk["copy_input"]), "worker_copy_output": stats_us(wk["copy_output"]),
                   "worker_p99_over_p50": pct(wk["exec"], 0.99) / pct(wk["exec"], 0.5),
                   "direct_graph_p99_over_p50": pct(g_exec, 0.99) / pct(g_exec, 0.5),
                   "overhead_us": (pct(wk["e2e"], 0.5) - pct(g_e2e, 0.5)) / 1e3,
                   "overhead_vs_vm_us": (pct(wk["e2e"], 0.5) - pct(d_e2e, 0.5)) / 1e3,
                   "direct_graph_idle_caller_e2e": stats_us(g_idle) if g_idle else None,
                   "overhead_idle_caller_us": (pct(wk["e2e"], 0.5) - pct(g_idle, 0.5)) / 1e3 if g_idle else None,
                   "gpu_clock_mhz_p50": pct(wk["gpu_clock"], 0.5),
                   "steps_p50_us": {k: pct(v, 0.5) / 1e3 for k, v in wk["steps"].items()}}
            rows.append(row)
            de, ge, we = row["direct_exec"], row["direct_graph_exec"], row["worker_exec"]
            md.append(f"| {name} | {b} | {de['p50_us']:.1f} / {de['p99_us']:.1f} / {de['p999_us']:.1f} | "
                      f"{ge['p50_us']:.1f} / {ge['p99_us']:.1f} | "
                      f"{we['p50_us']:.1f} / {we['p99_us']:.1f} / {we['p999_us']:.1f} | "
                      f"{row['worker_p99_over_p50']:.3f} | {row['direct_e2e']['p50_us']:.1f} / "
                      f"{row['direct_graph_e2e']['p50_us']:.1f} | "
                      f"{row['worker_e2e']['p50_us']:.1f} / {row['worker_e2e']['p99_us']:.1f} | "
                      f"{row['overhead_us']:.1f} | {row['overhead_vs_vm_us']:.1f} | "
                      + (f"{row['direct_graph_idle_caller_e2e']['p50_us']:.1f} | {row['overhead_idle_caller_us']:.1f} |"
                         if g_idle else "- | - |"))
    md += ["", f"{a.reps} actions per row after {a.warmup} warm-up, one at a time. Goals: worker p99/p50 <= 1.01, "
           "overhead per action < 50 us. Overhead = p50 end to end through the worker (submit -> on_result) "
           "minus p50 of the same steps done directly in one thread (inputs from the caller's numpy arrays, "
           "outputs back to numpy), run the way the worker runs them: on CUDA one CUDA graph per exec (direct "
           "graph; on the CPU the direct call). 'vs the VM': minus the direct call through TVM's VM instead, "
           "which the worker's graphs beat on the GPU, so it understates the worker's own cost. 'Idle caller' "
           "(CUDA): the direct graph calls again, each after the caller slept for the p50 end-to-end time, as the "
           "worker's caller sleeps while its action runs; the overhead against it is the worker's own cost with "
           "the caller in the same state (the plain overhead also holds the cost of waking cold: see "
           "direct_graph).", "",
           "Where the worker's host time goes (p50, us, on the worker's clock): submit -> input copy begins | "
           "input copy enqueued -> exec launch begins | exec host span minus its device time (launch, output "
           "copy, the one wait) | exec end -> on_result.", "",
           "| model | batch | " + " | ".join(STEPS) + " |", "| --- | --- |" + " --- |" * len(STEPS)]
    md += [f"| {r['model']} | {r['batch']} | " + " | ".join(f"{r['steps_p50_us'][k]:.1f}" for k in STEPS) + " |"
           for r in rows]
    write("worker_exec" if a.device == "cuda" else "worker_exec_cpu", {"rows": rows, "args": vars(a)}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
