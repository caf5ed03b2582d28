"""Exec latency through the worker vs calling the compiled model directly, per model and batch size.

    python -m bench.worker_exec --device cuda [--models resnet50_cuda,mlp_cuda] [--reps 300]
    python -m bench.worker_exec --device cpu  [--models mlp_cpu] [--reps 300]
    ... [--set KEY=VALUE] [--compare KEY=VALUE] [--name NAME]   (worker config values; a second config, interleaved)

For each (model, batch size):
- direct: the minimal work in one thread: inputs to the device, run, outputs back (CUDA: on one stream, exec
  timed with CUDA events; CPU: wall time);
- worker: Infer actions submitted one at a time to a CUDAWorker/CPUWorker, each waited for: the exec duration
  the worker measured (CUDA events / wall) and the end-to-end latency (submit -> on_result);
- interleaved: the direct graph call (CUDA; the direct call on the CPU) and the worker's Infer alternated
  call by call (ABBA...), each after the caller slept for the worker's p50 end-to-end time, so that the
  machine's slow drift (seconds apart, the phases above moved the H200 VM's overhead by up to 80 us) hits
  both sides alike.
Figures: exec p50/p99/p99.9 both ways, p99/p50 through the worker (goal <= 1.01), and the worker's overhead
per action = p50(worker end to end) - p50(direct end to end) (goal < 50 us), from the separate phases and from
the interleaved one (also the median of the per-pair differences). Artifacts come from
`python -m bench.worker_artifacts` (.gpu/worker, or --artifacts; CPU artifacts are compiled on the fly).
Writes bench/results/worker_exec.json and .md (worker_exec_cpu.* with --device cpu)."""
from __future__ import annotations

import argparse
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self

import numpy as np

from bench.worker_common import ARTIFACTS, artifact, pct, stats_us, write
from workbench.contract import Infer, LoadModelFromDisk, LoadWeights
from workbench.worker.config import WorkerConfig

STEPS = ("submit_to_copy_input", "copy_input_host", "exec_host_minus_device", "copy_output_to_result")
CFG = {"weights_cache_size": "2 GiB", "io_pool_size": "256 MiB", "workspace_pool_size": "1 GiB",
       "host_io_pool_size": "256 MiB"}


def inputs_for(art, n: int, rng) -> list[np.ndarray]:
    out = []
    for s in art.inputs:
        if np.issubdtype(np.dtype(s.dtype), np.integer):
            out.append(rng.integers(0, 100, (n, *s.shape)).astype(s.dtype))
        else:
            out.append(rng.standard_normal((n, *s.shape)).astype(s.dtype))
    return out


# ------------------------------------------------------------------------------------------------ runners
class DirectRunner(Protocol):
    """One (model, batch size) of a direct path, set up once: `call()` does one timed call."""

    def call(self) -> int:
        """End-to-end ns of one call (inputs from the caller's numpy arrays -> outputs back in numpy)."""

    def exec_ns(self) -> int:
        """The exec time of the latest call (read after the timed span)."""

    def back_to_back(self, n: int) -> int:
        """ns for n calls queued with nothing waited for in between (the device's throughput bound)."""


class DirectCPU:
    """The direct call on the CPU: inputs staged, the model run through TVM's VM, outputs copied to numpy."""

    def __init__(self, art, loaded, binding, b: int):
        self.loaded, self.binding, self.b = loaded, binding, b
        self.x = inputs_for(art, b, np.random.default_rng(0))
        self.staged = [np.empty_like(a) for a in self.x]
        self._exec = 0

    def call(self) -> int:
        loaded, binding, b, staged, x = self.loaded, self.binding, self.b, self.staged, self.x
        t0 = time.perf_counter_ns()
        for s, a in zip(staged, x):
            s[...] = a
        t1 = time.perf_counter_ns()
        outs = loaded.run(b, staged, binding)
        t2 = time.perf_counter_ns()
        [np.array(o) for o in outs]
        t3 = time.perf_counter_ns()
        self._exec = t2 - t1
        return t3 - t0

    def exec_ns(self) -> int:
        return self._exec

    def back_to_back(self, n: int) -> int:       # the CPU runs each call to its end: n calls one after another
        t0 = time.perf_counter_ns()
        for _ in range(n):
            self.call()
        return time.perf_counter_ns() - t0


class DirectGraphModel:
    """The direct graph path's own copy of a model on cuda:0 (weights bound, one non-blocking stream)."""

    def __init__(self, art):
        import cupy as cp
        import tvm

        from workbench.models.runtime import alloc_pages, copy_weights
        self.art = art
        self.loaded = art.load(tvm.cuda(0))
        self.pages = alloc_pages(art, "cuda:0")
        copy_weights(art, self.pages)
        self.binding = self.loaded.bind_weights(self.pages)
        self.stream = cp.cuda.Stream(non_blocking=True)


class DirectGraph:
    """One batch size of the direct path run the way the CUDA worker runs an exec: one CUDA graph
    (workbench.worker.cuda_graphs) holding the model, its events and the output copy to pinned memory. Every
    array the graph reads or writes is held here, as long as the graph may be replayed."""

    def __init__(self, model: DirectGraphModel, b: int):
        import cupy as cp
        import tvm
        import tvm_ffi

        from workbench.worker import cuda_graphs
        art, loaded, binding, stream = model.art, model.loaded, model.binding, model.stream
        self.cp, self.b, self.stream = cp, b, stream
        self.x = inputs_for(art, b, np.random.default_rng(0))
        self.dev_in = [cp.empty(a.shape, a.dtype) for a in self.x]
        args = [tvm.runtime.from_dlpack(d) for d in self.dev_in]
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
        self.spans = spans
        self.buf = np.frombuffer(cp.cuda.alloc_pinned_memory(off), np.uint8, off)
        # the outputs' views of the pinned buffer, made once, as the worker makes them (CUDADevice._out_views)
        self.outs = [self.buf[o:o + nb].view(spec.dtype).reshape((b, *spec.shape)) for o, nb, spec in spans]
        self.events = (cp.cuda.Event(), cp.cuda.Event(), cp.cuda.Event())
        self.args, self.launch = args, launch
        self.graph, self._outs = cuda_graphs.capture(cp, stream, launch, self.events, self.buf.ctypes.data, spans)

    def call(self) -> int:
        stream, graph, outs, fetched = self.stream, self.graph, self.outs, self.events[2]
        dev_in, x = self.dev_in, self.x
        t0 = time.perf_counter_ns()
        for d, h in zip(dev_in, x):                # from the caller's (pageable) arrays, as the worker does
            d.set(h, stream=stream)
        graph.launch(stream)
        fetched.synchronize()
        [v.copy() for v in outs]
        t1 = time.perf_counter_ns()
        return t1 - t0

    def exec_ns(self) -> int:
        return int(self.cp.cuda.get_elapsed_time(self.events[0], self.events[1]) * 1e6)

    def back_to_back(self, n: int) -> int:
        """n copies and graph launches queued on the stream, one wait at the end: the GPU never waits for the host
        (each graph's output copy lands in the same buffer: only the time matters here)."""
        stream, graph, dev_in, x = self.stream, self.graph, self.dev_in, self.x
        t0 = time.perf_counter_ns()
        for _ in range(n):
            for d, h in zip(dev_in, x):
                d.set(h, stream=stream)
            graph.launch(stream)
        self.events[2].synchronize()
        return time.perf_counter_ns() - t0


class WorkerSession:
    """One CUDAWorker/CPUWorker (created once per model and process) with the model loaded (model 0) and its
    weights on GPU 0; every worker phase of the model runs through it. Close it (or use `with`). Actions are
    submitted as the process worker's host submits them (`answer_here`: this caller holds no lock and its
    on_result does not submit), so a short exec may be answered inside submit (worker config submit_wait_max)."""

    def __init__(self, path: Path, device: str, settings: dict | None = None):
        self.cv = threading.Condition()
        self.box: dict = {}
        self.ids = iter(range(10, 10**9))
        cfg = WorkerConfig.load(None, **{**CFG, **(settings or {})})
        if device == "cpu":
            from workbench.worker.cpu import CPUWorker
            self.w = CPUWorker(cfg, self._on)
        else:
            from workbench.worker.cuda import CUDAWorker
            self.w = CUDAWorker(cfg, self._on, num_gpus=1)
        try:
            r, _, _ = self.do(LoadModelFromDisk(id=1, model_id=0, path=str(path)))
            assert r.ok, r.message
            r, _, _ = self.do(LoadWeights(id=2, model_id=0, gpu=0))
            assert r.ok, r.message
        except BaseException:
            self.w.close()
            raise

    def _on(self, r) -> None:
        t = time.monotonic_ns()       # the worker's clock (MonotonicClock): the breakdown subtracts its stamps
        with self.cv:
            self.box[r.id] = (r, t)
            self.cv.notify_all()

    def do(self, a) -> tuple[Any, int, int]:
        """(result, submitted, on_result called): one action submitted and waited for, on the worker's clock."""
        cv, box = self.cv, self.box
        t0 = time.monotonic_ns()
        self.w.submit(a, answer_here=True)
        with cv:
            if not cv.wait_for(lambda: a.id in box, 120):
                raise TimeoutError(f"action {a.id} ({type(a).__name__}) got no result within 120 s")
            r, t1 = box.pop(a.id)
        return r, t0, t1

    def close(self) -> None:
        self.w.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class WorkerCall:
    """One Infer through the worker: end to end (submit -> on_result) and the result's figures (ns, MHz)."""
    e2e: int
    exec: int
    copy_input: int
    copy_output: int
    gpu_clock: int
    steps: dict[str, int]           # where the host time went (STEPS), on the worker's clock


class WorkerInfer:
    """One batch size of the worker path: `call()` submits one Infer of the same inputs and waits for it."""

    def __init__(self, session: WorkerSession, art, b: int):
        self.session, self.b = session, b
        self.x = tuple(inputs_for(art, b, np.random.default_rng(0)))

    def call(self) -> WorkerCall:
        a = Infer(id=next(self.session.ids), model_id=0, gpu=0, batch_size=self.b, inputs=self.x)
        r, t0, t1 = self.session.do(a)
        assert r.ok, r.message
        ci, ex, co = r.copy_input, r.exec, r.copy_output
        steps = {"submit_to_copy_input": ci.begin - t0, "copy_input_host": ex.begin - ci.begin,
                 "exec_host_minus_device": (ex.end - ex.begin) - ex.duration, "copy_output_to_result": t1 - ex.end}
        return WorkerCall(t1 - t0, ex.duration, ci.duration, co.duration, r.gpu_clock, steps)


# ------------------------------------------------------------------------------------------------ phases
def direct(art, device: str, sizes: list[int], reps: int,
           warmup: int) -> tuple[dict[int, tuple[list[int], list[int]]], dict[int, DirectCPU]]:
    """Per batch size: (exec ns, end-to-end ns) of running the model directly; and on the CPU the runners,
    kept for the interleaved phase (on CUDA its direct side is the graph path, see direct_graph)."""
    import tvm

    from workbench.models.runtime import alloc_pages, copy_weights
    loaded = art.load(tvm.cpu(0) if device == "cpu" else tvm.cuda(0))
    pages = alloc_pages(art, "cpu" if device == "cpu" else "cuda:0")
    copy_weights(art, pages)
    binding = loaded.bind_weights(pages)
    runners = {b: DirectCPU(art, loaded, binding, b) for b in sizes} if device == "cpu" else {}
    return {b: _direct_one(art, loaded, binding, device, b, reps, warmup, runners.get(b)) for b in sizes}, runners


def direct_graph(art, sizes: list[int], reps: int,
                 warmup: int) -> tuple[dict[int, tuple[list[int], list[int], list[int]]], dict[int, DirectGraph]]:
    """Per batch size: (exec ns, end-to-end ns, end-to-end ns from an idle caller) of the direct path run the way
    the CUDA worker runs an exec (DirectGraph); and the runners, kept for the interleaved phase. The like-for-like
    baseline of the worker's overhead (the VM's launches cost host and GPU time that the worker's graphs do not).
    The idle-caller figure repeats the calls after the caller slept for the exec's end-to-end time, as a caller
    of the worker sleeps while each action runs: on the H200's VM a thread that slept pays ~150-200 us of cold
    caches and wake-up in its next ~300 us of work."""
    model = DirectGraphModel(art)
    res, runners = {}, {}
    for b in sizes:
        run = runners[b] = DirectGraph(model, b)
        execs, e2e, idle_e2e = [], [], []
        for idle in (0.0, None):
            if idle is None:                       # the same calls from a caller that was idle meanwhile
                idle = pct(e2e, 0.5) / 1e9
            for i in range(warmup + reps):
                if idle:
                    time.sleep(idle)
                dt = run.call()
                if i >= warmup:
                    if idle:
                        idle_e2e.append(dt)
                    else:
                        execs.append(run.exec_ns())
                        e2e.append(dt)
        res[b] = (execs, e2e, idle_e2e)
    return res, runners


def _direct_one(art, loaded, binding, device: str, b: int, reps: int, warmup: int,
                runner: DirectCPU | None = None) -> tuple[list[int], list[int]]:
    execs, e2e = [], []
    if device == "cpu":
        run = runner or DirectCPU(art, loaded, binding, b)
        for i in range(warmup + reps):
            dt = run.call()
            if i >= warmup:
                execs.append(run.exec_ns())
                e2e.append(dt)
        return execs, e2e
    import cupy as cp
    x = inputs_for(art, b, np.random.default_rng(0))
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
            _host = [o.get(stream=stream) for o in outs]
        stream.synchronize()
        t1 = time.perf_counter_ns()
        if i >= warmup:
            execs.append(int(cp.cuda.get_elapsed_time(e0, e1) * 1e6))
            e2e.append(t1 - t0)
    return execs, e2e


def through_worker(session: WorkerSession, art, sizes: list[int], reps: int,
                   warmup: int) -> tuple[dict[int, dict], dict[int, WorkerInfer]]:
    """Per batch size: the worker's figures of Infers one at a time (each waited for); and the runners, kept for
    the interleaved phase."""
    res, runners = {}, {}
    for b in sizes:
        run = runners[b] = WorkerInfer(session, art, b)
        execs, e2e, cin, cout, clocks = [], [], [], [], []
        steps: dict[str, list[int]] = {k: [] for k in STEPS}
        for i in range(warmup + reps):
            c = run.call()
            if i >= warmup:
                execs.append(c.exec)
                e2e.append(c.e2e)
                cin.append(c.copy_input)
                cout.append(c.copy_output)
                clocks.append(c.gpu_clock)
                for k in STEPS:
                    steps[k].append(c.steps[k])
        res[b] = {"exec": execs, "e2e": e2e, "copy_input": cin, "copy_output": cout, "gpu_clock": clocks,
                  "steps": steps}
    return res, runners


def interleaved(direct_run: DirectRunner, worker_run: WorkerInfer, idle_s: float, reps: int,
                warmup: int, compared: WorkerInfer | None = None) -> dict[str, list[int]]:
    """The direct call and the worker's Infer side by side: per iteration one of each, the first one swapped
    every iteration (direct first on even iterations: ABBA...), each after the caller slept `idle_s`, so both
    start from an equally idle caller and any drift of the machine hits both alike. Per kept iteration i:
    direct[i] and worker[i] (end-to-end ns) form a pair; also both exec times and which went first. With
    `compared` (a worker of another config, --compare) each iteration runs the three, in rotating order."""
    out: dict[str, list[int]] = {"direct": [], "worker": [], "direct_exec": [], "worker_exec": [],
                                 "direct_first": [], "compared": [], "compared_exec": []}
    sides = 3 if compared is not None else 2
    for i in range(warmup + reps):
        got = {}
        for k in range(sides):
            side = (i + k) % sides                 # 0: direct, 1: worker, 2: compared
            time.sleep(idle_s)
            if side == 0:
                got["direct"] = (direct_run.call(), direct_run.exec_ns())
            else:
                got[side] = (worker_run if side == 1 else compared).call()
        if i >= warmup:
            (d, d_exec), w = got["direct"], got[1]
            out["direct"].append(d)
            out["worker"].append(w.e2e)
            out["direct_exec"].append(d_exec)
            out["worker_exec"].append(w.exec)
            out["direct_first"].append(int(i % sides == 0))
            if sides == 3:
                out["compared"].append(got[2].e2e)
                out["compared_exec"].append(got[2].exec)
    return out


def under_load(direct_run: DirectRunner, worker_run: WorkerInfer, n: int, depth: int) -> dict:
    """Per action with the device kept busy (Clockwork's controller keeps up to schedule_ahead of work queued on
    each GPU): n Infers with `depth` always in flight, each result answered by sending the next, against the
    direct path's n calls queued back to back. ns per action both ways, and the worker's GPU busy fraction."""
    session, b, x = worker_run.session, worker_run.b, worker_run.x
    w, cv, box = session.w, session.cv, session.box

    def send() -> None:
        w.submit(Infer(id=next(session.ids), model_id=0, gpu=0, batch_size=b, inputs=x), answer_here=True)

    direct_ns = direct_run.back_to_back(n)
    execs: list[int] = []
    t0 = time.monotonic_ns()
    last = sent = 0
    for _ in range(min(depth, n)):
        send()
        sent += 1
    while len(execs) < n:
        with cv:
            if not cv.wait_for(lambda: box, 120):
                raise TimeoutError("no Infer result within 120 s under load")
            got = list(box.values())
            box.clear()
        for r, t in got:
            assert r.ok, r.message
            execs.append(r.exec.duration)
            last = max(last, t)
        while sent < n and sent - len(execs) < depth:
            send()
            sent += 1
    span = last - t0
    return {"load_depth": depth, "load_n": n, "direct_back_to_back_per_action_us": direct_ns / n / 1e3,
            "worker_loaded_per_action_us": span / n / 1e3, "worker_loaded_gpu_busy": sum(execs) / span,
            "overhead_loaded_us": (span - direct_ns) / n / 1e3}


def interleaved_figures(il: dict[str, list[int]]) -> dict:
    """The row's interleaved figures (us): both sides' stats, p50(worker) - p50(direct), and the median and
    quartiles of the per-pair differences (also split by which side went first)."""
    diffs = [w - d for d, w in zip(il["direct"], il["worker"])]
    by_order = {k: [x for x, f in zip(diffs, il["direct_first"]) if f == first]
                for k, first in (("direct_first", 1), ("worker_first", 0))}
    return {"interleaved_direct_e2e": stats_us(il["direct"]), "interleaved_worker_e2e": stats_us(il["worker"]),
            "interleaved_direct_exec": stats_us(il["direct_exec"]),
            "interleaved_worker_exec": stats_us(il["worker_exec"]),
            "overhead_interleaved_us": (pct(il["worker"], 0.5) - pct(il["direct"], 0.5)) / 1e3,
            "overhead_paired_us": pct(diffs, 0.5) / 1e3, "overhead_paired_p25_us": pct(diffs, 0.25) / 1e3,
            "overhead_paired_p75_us": pct(diffs, 0.75) / 1e3,
            "overhead_paired_by_order_us": {k: pct(v, 0.5) / 1e3 for k, v in by_order.items()},
            "interleaved_pairs_ns": [[d, w] for d, w in zip(il["direct"], il["worker"])],
            **(compared_figures(il) if il.get("compared") else {})}


def compared_figures(il: dict[str, list[int]]) -> dict:
    """With --compare: the compared config's paired overhead (vs the direct call) and its paired difference from
    the worker's (compared - worker, us: median and quartiles), all from the same iterations."""
    vs_direct = [c - d for d, c in zip(il["direct"], il["compared"])]
    vs_worker = [c - w for w, c in zip(il["worker"], il["compared"])]
    return {"compared_e2e": stats_us(il["compared"]), "compared_exec": stats_us(il["compared_exec"]),
            "compared_overhead_paired_us": pct(vs_direct, 0.5) / 1e3,
            "compared_minus_worker_us": [pct(vs_worker, q) / 1e3 for q in (0.25, 0.5, 0.75)],
            "compared_e2e_ns": il["compared"]}


def _toml_value(text: str):
    """A --set value as the config file would read it (300000, "300 us", true); else the text itself."""
    import tomllib
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.worker_exec", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--models", default=None, help="artifact names under --artifacts (default: by device)")
    p.add_argument("--artifacts", default=str(ARTIFACTS))
    p.add_argument("--batch-sizes", default=None, help="default: every compiled size")
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--depth", type=int, default=4, help="Infers kept in flight in the under-load phase")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a worker config value (repeatable), e.g. exec_wake_ahead=0")
    p.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                   help="also run, interleaved with the others, a worker with these config values (repeatable)")
    p.add_argument("--name", default=None, help="results file name (default worker_exec, worker_exec_cpu)")
    a = p.parse_args(argv)
    settings = {k: _toml_value(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    compare = {**settings, **{k: _toml_value(v) for k, v in (kv.split("=", 1) for kv in a.compare)}}
    for values in (settings, compare):     # a bad key or value stops here, before any measuring
        WorkerConfig.load(None, **{**CFG, **values})
    from workbench.models.artifact import Artifact
    names = a.models.split(",") if a.models else (["mlp_cpu"] if a.device == "cpu" else
                                                   ["resnet50_cuda", "bert_base_cuda", "mlp_cuda"])
    rows, md = [], [("| model | batch | direct VM exec p50 / p99 / p99.9 (us) | direct graph exec p50 / p99 (us) | "
                    "worker exec p50 / p99 / p99.9 (us) | worker p99/p50 | direct VM / graph e2e p50 (us) | "
                    "worker e2e p50 / p99 (us) | overhead per action (us) | vs the VM (us) | direct graph e2e p50, "
                    "idle caller (us) | overhead vs the idle caller (us) | interleaved e2e p50, direct / worker (us) "
                    "| overhead, interleaved (us): p50 diff; paired median [p25, p75] | under load: per action, "
                    "direct / worker (us); GPU busy | overhead under load (us) |"),
                    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
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
        directs, cpu_runners = direct(art, a.device, sizes, a.reps, a.warmup)
        if a.device == "cuda":
            graphs, direct_runners = direct_graph(art, sizes, a.reps, a.warmup)
        else:                                      # on the CPU the graph path is the direct call
            graphs, direct_runners = {b: (*v, []) for b, v in directs.items()}, cpu_runners
        with WorkerSession(path, a.device, settings) as session, \
                WorkerSession(path, a.device, compare) if a.compare else nullcontext() as other:
            workers, worker_runners = through_worker(session, art, sizes, a.reps, a.warmup)
            others = through_worker(other, art, sizes, a.warmup, a.warmup)[1] if other else {}
            inter = {b: interleaved(direct_runners[b], worker_runners[b], pct(workers[b]["e2e"], 0.5) / 1e9,
                                    a.reps, a.warmup, others.get(b)) for b in sizes}
            loaded = {b: under_load(direct_runners[b], worker_runners[b], a.reps, a.depth) for b in sizes}
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
                   "steps_p50_us": {k: pct(v, 0.5) / 1e3 for k, v in wk["steps"].items()},
                   "interleaved_idle_us": pct(wk["e2e"], 0.5) / 1e3, **interleaved_figures(inter[b]), **loaded[b]}
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
                         if g_idle else "- | - |")
                      + f" {row['interleaved_direct_e2e']['p50_us']:.1f} / "
                      f"{row['interleaved_worker_e2e']['p50_us']:.1f} | "
                      f"{row['overhead_interleaved_us']:.1f}; {row['overhead_paired_us']:.1f} "
                      f"[{row['overhead_paired_p25_us']:.1f}, {row['overhead_paired_p75_us']:.1f}] | "
                      f"{row['direct_back_to_back_per_action_us']:.1f} / {row['worker_loaded_per_action_us']:.1f}; "
                      f"{row['worker_loaded_gpu_busy']:.3f} | {row['overhead_loaded_us']:.1f} |")
    md += ["", (f"{a.reps} actions per row after {a.warmup} warm-up, one at a time. Goals: worker p99/p50 <= 1.01, "
           "overhead per action < 50 us. Overhead = p50 end to end through the worker (submit -> on_result) "
           "minus p50 of the same steps done directly in one thread (inputs from the caller's numpy arrays, "
           "outputs back to numpy), run the way the worker runs them: on CUDA one CUDA graph per exec (direct "
           "graph; on the CPU the direct call). 'vs the VM': minus the direct call through TVM's VM instead, "
           "which the worker's graphs beat on the GPU, so it understates the worker's own cost. 'Idle caller' "
           "(CUDA): the direct graph calls again, each after the caller slept for the p50 end-to-end time, as the "
           "worker's caller sleeps while its action runs; the overhead against it is the worker's own cost with "
           "the caller in the same state (the plain overhead also holds the cost of waking cold: see "
           "direct_graph)."), "",
           ("Interleaved: the columns before it come from separate phases, seconds apart, and the machine drifts "
           "meanwhile (on the H200 VM two identical runs gave ResNet-50 b1 overheads of 41 and 153 us). So after "
           "them the direct graph call (the direct call on the CPU) and the worker's Infer run side by side: "
           f"{a.reps} pairs after {a.warmup} warm-up, one of each per pair, the one that goes first swapped every "
           "pair (ABBA...), each call after the caller slept for the worker's p50 end-to-end time (as in the idle "
           "caller figure), so both sides start from an equally idle caller and see the same drift. 'p50 diff' = "
           "p50(worker) - p50(direct) of those calls; 'paired median [p25, p75]' = the median and quartiles of "
           "worker - direct within each pair, the figure least moved by drift."), "",
           (f"Under load: the worker kept busy as Clockwork's controller keeps it (work queued ahead, up to "
            f"schedule_ahead per GPU): {a.reps} Infers with {a.depth} always in flight, each result answered by "
            "sending the next; per action = from the first submit to the last on_result, divided by their number. "
            "Direct: the same number of input copies and graph launches queued back to back on one stream, one "
            "wait at the end (the GPU never waits for the host). Overhead under load = worker - direct per action: "
            "what the worker costs the GPU's throughput (its exec launches one at a time per GPU, after the "
            "previous one is waited for). GPU busy = the worker's exec times summed / its span."), "",
           ("Where the worker's host time goes (p50, us, on the worker's clock): submit -> input copy begins | "
           "input copy enqueued -> exec launch begins | exec host span minus its device time (launch, output "
           "copy, the one wait) | exec end -> on_result."), "",
           "| model | batch | " + " | ".join(STEPS) + " |", "| --- | --- |" + " --- |" * len(STEPS)]
    md += [f"| {r['model']} | {r['batch']} | " + " | ".join(f"{r['steps_p50_us'][k]:.1f}" for k in STEPS) + " |"
           for r in rows]
    if settings:
        md += ["", "Worker config set for this run: " + ", ".join(f"{k} = {v}" for k, v in settings.items()) + "."]
    if a.compare:
        md += ["", "Compared, interleaved with the direct call and the worker above (three calls per iteration in "
               "rotating order, each after the same idle sleep): a worker with " + ", ".join(a.compare) + ".", "",
               "| model | batch | paired overhead, worker / compared (us) | compared - worker, paired (us): median "
               "[p25, p75] |", "| --- | --- | --- | --- |"]
        md += [f"| {r['model']} | {r['batch']} | {r['overhead_paired_us']:.1f} / "
               f"{r['compared_overhead_paired_us']:.1f} | {r['compared_minus_worker_us'][1]:.1f} "
               f"[{r['compared_minus_worker_us'][0]:.1f}, {r['compared_minus_worker_us'][2]:.1f}] |" for r in rows]
    write(a.name or ("worker_exec" if a.device == "cuda" else "worker_exec_cpu"), {"rows": rows, "args": vars(a)}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
