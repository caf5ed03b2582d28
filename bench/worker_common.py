"""Helpers shared by the worker benchmarks: percentiles, machine metadata, writing <name>.json and .md."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

OUT = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("WORKBENCH_GPU_ARTIFACTS", ROOT / ".gpu" / "worker"))
# Also looked in: the models helper's bundle (python -m bench.build_gpu_artifacts), same names (<model>_cuda).
FALLBACKS = (ROOT / ".gpu" / "worker", ROOT / ".gpu" / "artifacts")


def pct(samples: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; nan when empty."""
    s = sorted(samples)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def stats_us(samples_ns: Sequence[float]) -> dict:
    return {"n": len(samples_ns), "p50_us": pct(samples_ns, 0.5) / 1e3, "p99_us": pct(samples_ns, 0.99) / 1e3,
            "p999_us": pct(samples_ns, 0.999) / 1e3, "min_us": min(samples_ns) / 1e3 if samples_ns else float("nan"),
            "max_us": max(samples_ns) / 1e3 if samples_ns else float("nan")}


def meta() -> dict:
    m = {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "python": sys.version.split()[0],
         "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        import cupy
        d = cupy.cuda.runtime.getDeviceProperties(0)
        m["gpu"] = d["name"].decode() if isinstance(d["name"], bytes) else str(d["name"])
    except Exception:  # noqa: BLE001
        m["gpu"] = None
    return m


def command(name: str) -> str:
    """The command line that is running, as a user would type it (`python -m bench.<module> args`)."""
    module = Path(sys.argv[0]).stem if sys.argv and sys.argv[0].endswith(".py") else name
    return " ".join(["python -m bench." + module, *sys.argv[1:]])


def write(name: str, data: dict, md_lines: list[str], out: Path = OUT) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    data = {**data, "meta": meta()}
    (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    m = data["meta"]
    head = [f"# {name}", "", f"Measured {m['when']} on {m['host']} ({m['cpus']} CPUs, GPU: {m['gpu']}, "
            f"Python {m['python']}). Written by `{command(name)}`.", ""]
    (out / f"{name}.md").write_text("\n".join(head + md_lines) + "\n")
    print("\n".join(md_lines))
    print(f"wrote {out / (name + '.json')} and .md")
    return out / f"{name}.json"


def read_build_manifest(d: Path, fmt: str, bench: str) -> dict:
    """<d>/manifest.json written by `python -m bench.<bench> build` (checked for its format), or a clear exit
    saying how to make it: the GPU half of a build/run benchmark starts here."""
    path = Path(d) / "manifest.json"
    if not path.is_file():
        raise SystemExit(f"no {path}: run `python -m bench.{bench} build --out {d}` on the CPU machine and carry {d}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != fmt:
        raise SystemExit(f"{path} is not a bench.{bench} build (format {manifest.get('format')!r}, expected {fmt!r})")
    return manifest


def artifact(name: str, base: Path = ARTIFACTS) -> Path | None:
    """<base>/<name> if it is an artifact, else the first of FALLBACKS that has it, else None."""
    for d in (Path(base), *FALLBACKS):
        if (d / name / "manifest.json").is_file():
            return d / name
    return None
