"""Run a snippet in a child Python that sees no CUDA device (CUDA_VISIBLE_DEVICES=""), so the no-GPU paths are
exercised on every machine, the H200 included, instead of being skipped where a GPU is present."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env_without_gpu() -> dict[str, str]:
    """This process's environment with every CUDA device hidden and the repo importable."""
    path = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join(path)}


def run_without_gpu(code: str, timeout: float = 300) -> str:
    """Run ``code`` (dedented) with no CUDA device visible; its stdout. Fails the test, with the child's output,
    when the child exits non-zero (a failed assert in ``code`` included)."""
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env_without_gpu(),
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"the no-GPU child failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout
