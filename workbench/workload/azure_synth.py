"""Synthetic Azure Functions 2019 trace files: the real layout (`invocations_per_function_md.anon.dNN.csv`,
4 id columns + 1,440 per-minute counts) with statistics imitating the published ones (Shahrad et al., "Serverless
in the Wild", ATC '20), for tests, demos and the reader benchmark. Not real data: see data/azure/README.md.

What it imitates (approximately; figures as reported in the paper, not fitted to the files):
- heavy-tailed mean rates: log10(invocations/minute) ~ Normal(-1.56, 1.77), so ~45% of functions average at
  most one invocation per hour and ~81% at most one per minute, with the busiest at thousands per minute;
- trigger mix by function: http 55%, timer 15.6%, queue 15.2%, orchestration 6.9%, storage 2.8%, event 2.2%,
  others 2.2%; timer functions fire periodically (every 1, 5, 10, 15, 30 or 60 min);
- a diurnal cycle (+-40% around the mean, peak in the afternoon) and minute-to-minute burstiness (gamma-mixed
  Poisson counts, so inter-arrival CVs above 1 are common);
- apps of one to a few functions, owners of one to a few apps (64-hex-digit hashes);
- a few functions with no invocations at all in the day (rows of zeros).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import polars as pl

from workbench.workload.azure_trace import ID_COLUMNS, MINUTE_COLUMNS, MINUTES_PER_DAY

TRIGGER_MIX = {"http": 0.550, "timer": 0.156, "queue": 0.152, "orchestration": 0.069, "storage": 0.028,
               "event": 0.022, "others": 0.023}
LOG10_RATE_MEAN, LOG10_RATE_SD = -1.555, 1.771
TIMER_PERIODS = (1, 5, 10, 15, 30, 60)
IDLE_FRACTION = 0.02
DIURNAL_AMPLITUDE = 0.4
DIURNAL_PEAK_MINUTE = 14 * 60


def _hash(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def synthetic_functions(n_functions: int, seed: int = 0) -> pl.DataFrame:
    """The function table: HashOwner, HashApp, HashFunction, Trigger, rate (mean invocations/minute), period
    (timer functions: minutes between firings, else 0), shape (gamma burstiness; lower = burstier)."""
    rng = np.random.default_rng(seed)
    n = int(n_functions)
    trig = rng.choice(list(TRIGGER_MIX), size=n, p=np.array(list(TRIGGER_MIX.values())) / sum(TRIGGER_MIX.values()))
    rate = 10.0 ** rng.normal(LOG10_RATE_MEAN, LOG10_RATE_SD, size=n)
    period = np.where(trig == "timer", rng.choice(TIMER_PERIODS, size=n), 0)
    rate = np.where(trig == "timer", 1.0 / np.maximum(period, 1) * rng.integers(1, 4, size=n), rate)
    rate[rng.random(n) < IDLE_FRACTION] = 0.0
    shape = 10.0 ** rng.uniform(-0.5, 1.5, size=n)
    # owners hold 1-3 apps, apps hold 1-4 functions (most apps have one)
    new_app = rng.random(n) < 0.6
    new_app[:1] = True
    app = np.cumsum(new_app) - 1
    new_owner = rng.random(int(app[-1]) + 1 if n else 0) < 0.7
    new_owner[:1] = True
    owner_of_app = np.cumsum(new_owner) - 1
    owners = [_hash("owner", seed, owner_of_app[a]) for a in app]
    apps = [_hash("app", seed, a) for a in app]
    funcs = [_hash("function", seed, i) for i in range(n)]
    return pl.DataFrame({"HashOwner": owners, "HashApp": apps, "HashFunction": funcs, "Trigger": trig,
                         "rate": rate, "period": period.astype(np.int64), "shape": shape})


def synthetic_counts(functions: pl.DataFrame, day: int = 1, seed: int = 0) -> np.ndarray:
    """int32 (n_functions, 1440) counts for one day of `functions`."""
    rng = np.random.default_rng([seed, day])
    n = functions.height
    m = np.arange(MINUTES_PER_DAY)
    diurnal = 1.0 + DIURNAL_AMPLITUDE * np.cos(2 * np.pi * (m - DIURNAL_PEAK_MINUTE) / MINUTES_PER_DAY)
    rate = functions["rate"].to_numpy()
    period = functions["period"].to_numpy()
    shape = functions["shape"].to_numpy()
    out = np.zeros((n, MINUTES_PER_DAY), np.int32)
    block = 4096   # bounded memory for day-sized files
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        lam = rate[lo:hi, None] * diurnal[None, :]
        lam = lam * rng.gamma(shape[lo:hi, None], 1.0 / shape[lo:hi, None], size=lam.shape)
        counts = rng.poisson(lam)
        timers = period[lo:hi] > 0
        if timers.any():   # periodic: fire every `period` minutes with a fixed count, at a random phase
            p = period[lo:hi][timers]
            phase = rng.integers(0, p)
            per = np.maximum(1, np.round(rate[lo:hi][timers] * p)).astype(np.int64)
            fire = ((m[None, :] - phase[:, None]) % p[:, None]) == 0
            counts[timers] = np.where(fire, per[:, None], 0)
        counts[rate[lo:hi] == 0] = 0
        out[lo:hi] = counts
    return out


def write_synthetic_trace(directory: str | os.PathLike, n_functions: int = 200, days: int = 1,
                          seed: int = 0) -> list[Path]:
    """Write `days` day files (d01, d02, ...) of `n_functions` functions into `directory`; returns the paths.
    A real day has ~46,000 functions: `n_functions=46_000` makes a day-sized file (~150 MB)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    fns = synthetic_functions(n_functions, seed)
    ids = fns.select(ID_COLUMNS)
    paths = []
    for day in range(1, days + 1):
        counts = synthetic_counts(fns, day, seed)
        table = pl.concat([ids, pl.DataFrame(counts, schema=list(MINUTE_COLUMNS), orient="row")],
                          how="horizontal")
        p = d / f"invocations_per_function_md.anon.d{day:02d}.csv"
        tmp = p.with_name(p.name + ".tmp")
        table.write_csv(tmp)
        os.replace(tmp, p)
        paths.append(p)
    return paths


def synthetic_trace_dir(n_functions: int, seed: int = 0, days: int = 1) -> Path:
    """A directory holding a synthetic trace of that size (generated once, then reused from the cache:
    $WORKBENCH_CACHE or ~/.cache/workbench/azure-synthetic/)."""
    base = Path(os.environ.get("WORKBENCH_CACHE") or
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "workbench")
    d = base.expanduser() / "azure-synthetic" / f"f{int(n_functions)}-s{int(seed)}-d{int(days)}"
    if all((d / f"invocations_per_function_md.anon.d{k:02d}.csv").is_file() for k in range(1, days + 1)):
        return d
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    write_synthetic_trace(tmp, n_functions, days, seed)
    try:
        os.replace(tmp, d)
    except OSError:   # another process made it first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def parse_synthetic(spec: str) -> tuple[int, int, int] | None:
    """"synthetic:N[:SEED[:DAYS]]" -> (N, seed, days); None for anything else."""
    if not spec.startswith("synthetic:"):
        return None
    parts = spec.split(":")[1:]
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"trace {spec!r}: expected synthetic:FUNCTIONS[:SEED[:DAYS]] with integers") from None
    if not 1 <= len(vals) <= 3 or vals[0] < 1 or (len(vals) > 2 and vals[2] < 1):
        raise ValueError(f"trace {spec!r}: expected synthetic:FUNCTIONS[:SEED[:DAYS]] (FUNCTIONS, DAYS >= 1)")
    n = vals[0]
    seed = vals[1] if len(vals) > 1 else 0
    days = vals[2] if len(vals) > 2 else 1
    return n, seed, days
