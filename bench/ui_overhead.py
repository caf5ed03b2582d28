"""Kernel-side cost of the live UI while a workload runs, measured inside a real Jupyter kernel.

    python -m bench.ui_overhead [--device auto] [--model mlp] [--seconds 4] [--reps 3] [--concurrency 8]
                                [--hz 4] [--kernel python3]

A jupyter_client frontend (this process) starts a kernel and drains its IOPub channel, as JupyterLab would.
In the kernel, each repetition starts a fresh Session and runs the same closed-loop workload twice, "no UI" and
"dashboard displayed" (every live view's widgets open, the pump redrawing them at --hz), in alternating order:
throughput = successful requests per second. Reported: the ratio of medians (goal >= 0.97), the pump's update latency (a telemetry row arriving
-> every chart written) and tick cost, and the comm traffic the frontend received. Writes
bench/results/ui_overhead.json and .md.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

KERNEL_CODE = r"""
import json, time
from IPython.display import display
from workbench.ui import Session

def fresh():
    # A fresh session per pair of runs: one run's trouble (a controller stuck after late results in a busy
    # kernel) must not decide the next run's figure. The artifact and its measurements are cached.
    s = Session(device={device!r}, max_hz={hz})
    s.load({model!r}, copies=2)
    for _ in range(3):                                 # warm-up: weights on the device, estimates settled
        s.infer({model!r}, slo_ms=1000).result(timeout=60)
    s.run("closed_loop", models={model!r}, duration_s=1.0, concurrency={concurrency}, slo_ms={slo_ms}).wait()
    return s

def measure(s, ui):
    if ui:
        display(s.dashboard())
    before = s.requests.height
    t = time.perf_counter()
    run = s.run("closed_loop", models={model!r}, duration_s={seconds}, concurrency={concurrency}, slo_ms={slo_ms})
    run.wait()
    elapsed = time.perf_counter() - t
    reqs = s.requests.slice(before)
    counts = dict(reqs.group_by("status").len().iter_rows())
    bad = reqs.filter(reqs["status"] != "success")["message"].unique().to_list()[:3]
    runs.append({{"ui": ui, "seconds": elapsed, "statuses": counts, "failures": bad}})
    return counts.get("success", 0) / elapsed

plain, live, lat, cost, cpu, ticks, runs, errors, actions = [], [], [], [], [], 0, [], [], {{}}
for rep in range({reps}):
    s = fresh()
    for ui in ((False, True) if rep % 2 == 0 else (True, False)):   # alternate the order: no drift bias
        (live if ui else plain).append(measure(s, ui))
    s.flush()
    lat += s.pump.latencies_ns; cost += s.pump.tick_cost_ns; cpu += s.pump.tick_cpu_ns
    ticks += s.pump.ticks; errors += s.pump.errors
    for t, n, c in s.actions.group_by("type", "status_name").len().iter_rows():
        actions[f"{{t}} {{n}}"] = actions.get(f"{{t}} {{n}}", 0) + c
    device = s.device
    s.close()
lat, cost, cpu = sorted(lat), sorted(cost), sorted(cpu)
pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] / 1e6 if xs else None
out = {{"plain_rps": plain, "ui_rps": live, "ticks": ticks, "errors": errors,
        "update_latency_ms": {{"p50": pct(lat, .5), "p90": pct(lat, .9), "p99": pct(lat, .99), "n": len(lat)}},
        "tick_cost_ms": {{"p50": pct(cost, .5), "p90": pct(cost, .9), "p99": pct(cost, .99)}},
        "tick_cpu_ms": {{"p50": pct(cpu, .5), "p90": pct(cpu, .9), "p99": pct(cpu, .99)}},
        "device": device, "runs": runs, "actions": actions}}
print("RESULT " + json.dumps(out))
"""


def run_in_process(code: str) -> tuple[dict, dict]:
    """Where no Jupyter kernel can be started (e.g. a GPU machine without jupyter): run the same code here,
    with widget comms that serialize every message to JSON (what ipykernel does) and then drop it."""
    import contextlib
    import io

    import comm
    from comm.base_comm import BaseComm

    counts = {"comm_msg": 0, "comm_open": 0, "bytes": 0}

    class SerializingComm(BaseComm):
        def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
            counts[msg_type] = counts.get(msg_type, 0) + 1
            counts["bytes"] += len(json.dumps(data or {}, default=str))

    comm.create_comm = lambda *a, **k: SerializingComm(*a, **k)
    import IPython.display
    def display(*objs, **kw):   # build the widgets as a frontend's display would (comms open, views live)
        for o in objs:
            getattr(o, "_repr_mimebundle_", lambda: None)()
    IPython.display.display = display
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "<ui_overhead>", "exec"), {"__name__": "__ui_overhead__"})
    line = next(x for x in buf.getvalue().splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), {"comm_msg": counts["comm_msg"], "comm_open": counts["comm_open"],
                                               "comm_bytes": counts["bytes"]}


def run(device: str, model: str, seconds: float, reps: int, concurrency: int, hz: float, kernel: str,
        slo_ms: float, in_process: bool = False) -> dict:
    code = KERNEL_CODE.format(device=device, model=model, seconds=seconds, reps=reps, concurrency=concurrency,
                              hz=hz, slo_ms=slo_ms)
    if in_process:
        result, front = run_in_process(code)
        return _finish(result, front, model, seconds, reps, concurrency, hz, "in-process (no kernel)", slo_ms)
    from jupyter_client.manager import start_new_kernel
    from workbench.ui.report import kernel_env

    km, kc = start_new_kernel(kernel_name=kernel, env=kernel_env())
    msgs = {"comm_msg": 0, "comm_open": 0}
    comm_bytes = 0
    result, error = None, None
    try:
        msg_id = kc.execute(code)
        deadline = time.monotonic() + 120 + reps * 2 * (seconds + 5)
        while time.monotonic() < deadline:
            try:
                msg = kc.get_iopub_msg(timeout=5)
            except Exception:  # noqa: BLE001 - queue.Empty: keep waiting
                continue
            mtype = msg["header"]["msg_type"]
            if mtype in msgs:
                msgs[mtype] += 1
                comm_bytes += len(json.dumps(msg["content"], default=str))
            elif mtype == "stream" and "RESULT " in msg["content"]["text"]:
                line = next(x for x in msg["content"]["text"].splitlines() if x.startswith("RESULT "))
                result = json.loads(line[len("RESULT "):])
            elif mtype == "error":
                error = "\n".join(msg["content"]["traceback"])
            elif mtype == "status" and msg["content"]["execution_state"] == "idle" \
                    and msg["parent_header"].get("msg_id") == msg_id:
                break
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    if result is None:
        raise RuntimeError(f"the kernel did not report a result: {error or 'timeout'}")
    return _finish(result, {**msgs, "comm_bytes": comm_bytes}, model, seconds, reps, concurrency, hz, kernel, slo_ms)


def _finish(result: dict, front: dict, model: str, seconds: float, reps: int, concurrency: int, hz: float,
            kernel: str, slo_ms: float) -> dict:
    plain, ui = statistics.median(result["plain_rps"]), statistics.median(result["ui_rps"])
    result.update({"model": model, "seconds": seconds, "reps": reps, "concurrency": concurrency, "max_hz": hz,
                   "kernel": kernel, "slo_ms": slo_ms, "plain_rps_median": plain, "ui_rps_median": ui,
                   "ratio": ui / plain if plain else None, "goal_ratio": 0.97,
                   "frontend": {**front, "comm_bytes_per_s": front["comm_bytes"] / (reps * seconds)},
                   "host": platform.node(), "python": platform.python_version(),
                   "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return result


def write(result: dict, name: str = "ui_overhead") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    r = result
    ok = r["ratio"] is not None and r["ratio"] >= r["goal_ratio"]
    lines = [
        "# UI overhead: throughput with and without the live dashboard",
        "",
        f"Device `{r['device']}`, model `{r['model']}` ×2, closed loop with {r['concurrency']} clients "
        f"(SLO {r['slo_ms']} ms), {r['seconds']} s per run, {r['reps']} runs each (a fresh session per pair, "
        f"order alternating); pump at "
        f"{r['max_hz']} Hz; measured in `{r['kernel']}` kernel (driven by jupyter_client) on {r['host']} "
        f"({r['measured']}).",
        "",
        "| | successful requests/s (median) | runs |",
        "| --- | --- | --- |",
        f"| no UI | {r['plain_rps_median']:.0f} | {', '.join(f'{x:.0f}' for x in r['plain_rps'])} |",
        f"| dashboard live | {r['ui_rps_median']:.0f} | {', '.join(f'{x:.0f}' for x in r['ui_rps'])} |",
        "",
        f"**Ratio {r['ratio']:.3f}** (goal >= {r['goal_ratio']}: {'met' if ok else 'NOT met'}).",
        "",
        "Chart update latency (kernel side: a telemetry row arrives -> every live chart written, ms): "
        f"p50 {r['update_latency_ms']['p50']:.1f}, p90 {r['update_latency_ms']['p90']:.1f}, "
        f"p99 {r['update_latency_ms']['p99']:.1f} over {r['update_latency_ms']['n']} ticks "
        f"(bounded below by the rate limit: 1/{r['max_hz']:g} s between ticks).",
        f"Pump tick (snapshot + aggregates + widget writes), wall ms: p50 {r['tick_cost_ms']['p50']:.1f}, "
        f"p99 {r['tick_cost_ms']['p99']:.1f}; the pump thread's own CPU ms per tick: p50 "
        f"{r['tick_cpu_ms']['p50']:.1f}, p99 {r['tick_cpu_ms']['p99']:.1f} (x {r['max_hz']:g} Hz = "
        f"{r['tick_cpu_ms']['p50'] * r['max_hz'] / 10:.1f}% of one core).",
        f"Frontend received {r['frontend'].get('comm_msg', 0)} comm messages, "
        f"{r['frontend']['comm_bytes_per_s'] / 1024:.1f} KiB/s while the dashboard was live.",
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ui_overhead", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default="mlp")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--hz", type=float, default=4.0)
    p.add_argument("--slo-ms", type=float, default=100.0)
    p.add_argument("--kernel", default="python3")
    p.add_argument("--name", default="ui_overhead", help="results file name (bench/results/<name>.json)")
    p.add_argument("--in-process", action="store_true",
                   help="no Jupyter kernel: run here with JSON-serializing comms (machines without jupyter)")
    a = p.parse_args(argv)
    in_process = a.in_process
    if not in_process:
        try:
            import ipykernel  # noqa: F401
            import jupyter_client  # noqa: F401
        except ImportError:
            print("no jupyter_client/ipykernel here: measuring in-process (--in-process)")
            in_process = True
    r = run(a.device, a.model, a.seconds, a.reps, a.concurrency, a.hz, a.kernel, a.slo_ms, in_process)
    write(r, a.name)
    print((RESULTS / f"{a.name}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
