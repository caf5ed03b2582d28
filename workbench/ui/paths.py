"""Where the UI keeps its caches: $WORKBENCH_CACHE, else $XDG_CACHE_HOME/workbench, else ~/.cache/workbench."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("WORKBENCH_CACHE"):
        return Path(os.environ["WORKBENCH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "workbench"


def cache_dir(*parts: str) -> Path:
    """A sub-directory of the cache root (created on demand; creation errors surface on first write)."""
    d = cache_root().joinpath(*parts)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    return d
