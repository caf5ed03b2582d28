"""Declarative experiments (EXPERIMENT.toml): `workbench run EXPERIMENT.toml --out DIR` on the command line,
`workbench.experiments.run(config, out=...)` in a notebook (returns the summary)."""
from __future__ import annotations

from typing import Any


def run(config: Any, out: Any, **kw: Any) -> dict:
    """Run an experiment (a path to EXPERIMENT.toml, a dict of the same structure, or an ExperimentConfig)
    into the directory `out`; returns the summary written to out/summary.json. See runner.run."""
    from workbench.experiments.runner import run as _run
    return _run(config, out, **kw)


def load(path: Any):
    """Parse and validate an EXPERIMENT.toml (raises ExperimentError naming the line and key)."""
    from workbench.experiments.config import load as _load
    return _load(path)


__all__ = ["run", "load"]
