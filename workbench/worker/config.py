"""Worker configuration: the package's documented default (default_config.toml), overridden by a file the user
names or by the file in $WORKBENCH_CONFIG (Clockwork: config/default.cfg and CLOCKWORK_CONFIG_FILE)."""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_FILE = Path(__file__).with_name("default_config.toml")
ENV_VAR = "WORKBENCH_CONFIG"

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_TIME_UNITS = {"ns": 1, "us": 10**3, "µs": 10**3, "ms": 10**6, "s": 10**9}


class ConfigError(ValueError):
    """A configuration problem; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class WorkerConfig:
    weights_cache_size: int
    page_size: int
    io_pool_size: int
    workspace_pool_size: int
    host_io_pool_size: int
    telemetry: bool
    log_dir: str
    allow_zero_size_inputs: bool
    copy_input_lead_in: int          # ns
    cuda_graphs: bool = True         # CUDA worker: replay each exec as a CUDA graph (worker/cuda_graphs.py)
    wake_early: int = 200_000        # ns: threaded executors wake this early, then yield until a task is due
    exec_wake_ahead: int = 400_000   # ns: CUDA worker: the exec thread wakes this long before an exec's end
    exec_rehearse: bool = True       # CUDA worker: then rehearses the exec's ending, if it has time to (wait_exec)
    submit_wait_max: int = 100_000   # ns: CUDA worker: execs expected within this may be waited for in submit
    source: str = "defaults"         # where the values came from (files, in order), for messages

    @property
    def num_pages(self) -> int:
        return self.weights_cache_size // self.page_size

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **overrides: Any) -> "WorkerConfig":
        """Defaults, then the file `path` (or $WORKBENCH_CONFIG when path is None), then keyword overrides."""
        values = _read(DEFAULT_FILE)
        sources = [str(DEFAULT_FILE)]
        user = path if path is not None else os.environ.get(ENV_VAR) or None
        if user is not None:
            p = Path(user)
            if not p.is_file():
                origin = f" (from ${ENV_VAR})" if path is None else ""
                raise ConfigError(f"worker config file {p}{origin} does not exist: fix the path or unset it")
            values.update(_read(p, known=values))
            sources.append(str(p))
        _check_known(overrides, values, "keyword overrides")
        values.update(overrides)
        return cls._build(values, " + ".join(sources) + (" + overrides" if overrides else ""))

    def replace(self, **changes: Any) -> "WorkerConfig":
        """A copy with some values changed (validated like a file)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"}
        _check_known(changes, values, "replace()")
        values.update(changes)
        return WorkerConfig._build(values, self.source + " + replace()")

    @classmethod
    def _build(cls, v: dict[str, Any], source: str) -> "WorkerConfig":
        def size(key: str) -> int:
            return _parse_size(v[key], key, source)

        cfg = cls(
            weights_cache_size=size("weights_cache_size"), page_size=size("page_size"),
            io_pool_size=size("io_pool_size"), workspace_pool_size=size("workspace_pool_size"),
            host_io_pool_size=size("host_io_pool_size"),
            telemetry=_parse_bool(v["telemetry"], "telemetry", source),
            log_dir=str(v["log_dir"]),
            allow_zero_size_inputs=_parse_bool(v["allow_zero_size_inputs"], "allow_zero_size_inputs", source),
            copy_input_lead_in=_parse_duration(v["copy_input_lead_in"], "copy_input_lead_in", source),
            cuda_graphs=_parse_bool(v["cuda_graphs"], "cuda_graphs", source),
            wake_early=_parse_duration(v["wake_early"], "wake_early", source),
            exec_wake_ahead=_parse_duration(v["exec_wake_ahead"], "exec_wake_ahead", source),
            exec_rehearse=_parse_bool(v["exec_rehearse"], "exec_rehearse", source),
            submit_wait_max=_parse_duration(v["submit_wait_max"], "submit_wait_max", source),
            source=source)
        if cfg.page_size <= 0:
            raise ConfigError(f"{source}: page_size must be > 0, got {cfg.page_size}")
        if cfg.page_size % 256:   # pages hold 256-byte aligned tensors: no artifact can be compiled for it
            raise ConfigError(f"{source}: page_size = {cfg.page_size} is not a multiple of 256 bytes (every tensor "
                              f"in a page is 256-byte aligned; artifacts are compiled for such page sizes only): "
                              f"use {-(-cfg.page_size // 256) * 256} or a size like \"16 MiB\"")
        if cfg.weights_cache_size < cfg.page_size:
            raise ConfigError(f"{source}: weights_cache_size ({cfg.weights_cache_size}) is smaller than one page "
                              f"({cfg.page_size}): raise weights_cache_size or lower page_size")
        for key in ("io_pool_size", "workspace_pool_size", "host_io_pool_size"):
            if getattr(cfg, key) <= 0:
                raise ConfigError(f"{source}: {key} must be > 0, got {getattr(cfg, key)}")
        for key in ("copy_input_lead_in", "wake_early", "exec_wake_ahead", "submit_wait_max"):
            if getattr(cfg, key) < 0:
                raise ConfigError(f"{source}: {key} must be >= 0 ns, got {getattr(cfg, key)}")
        return cfg

    def device_bytes(self) -> int:
        """Device memory one GPU needs for this config: weights cache + io pool + workspace pool."""
        return self.num_pages * self.page_size + self.io_pool_size + self.workspace_pool_size

    def check_fits(self, free_bytes: int, device: str) -> None:
        """Raise ConfigError if the per-GPU pools do not fit in `free_bytes` of `device`."""
        need = self.device_bytes()
        if need > free_bytes:
            room = free_bytes - self.io_pool_size - self.workspace_pool_size - (1 << 30)   # 1 GiB for kernels
            hint = (f"lower weights_cache_size to at most \"{_fmt(room)}\"" if room >= self.page_size
                    else "lower io_pool_size / workspace_pool_size or free the device")
            raise ConfigError(
                f"worker config ({self.source}) needs {_fmt(need)} per device (weights_cache_size "
                f"{_fmt(self.num_pages * self.page_size)} + io_pool_size {_fmt(self.io_pool_size)} + "
                f"workspace_pool_size {_fmt(self.workspace_pool_size)}) but {device} has {_fmt(free_bytes)} free: "
                f"{hint} in a config file (${ENV_VAR} or WorkerConfig.load(path))")


def _fmt(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _read(path: Path, known: dict | None = None) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"worker config file {path} is not valid TOML: {e}") from None
    if known is not None:
        _check_known(data, known, f"worker config file {path}")
    return data


def _check_known(data: dict, known: dict, where: str) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known keys: "
                          f"{', '.join(sorted(known))}")


def _parse_size(v: Any, key: str, source: str) -> int:
    if isinstance(v, bool):
        raise ConfigError(f"{source}: {key} must be a size in bytes, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", v)
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise ConfigError(f"{source}: {key} = {v!r} is not a size: use bytes (16777216) or a unit (\"16 MiB\")")


def _parse_duration(v: Any, key: str, source: str) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zµ]*)\s*", v)
        if m and m.group(2) in _TIME_UNITS:
            return int(float(m.group(1)) * _TIME_UNITS[m.group(2)])
    raise ConfigError(f"{source}: {key} = {v!r} is not a duration: use ns (5000000) or a unit (\"5 ms\")")


def _parse_bool(v: Any, key: str, source: str) -> bool:
    if isinstance(v, bool):
        return v
    raise ConfigError(f"{source}: {key} = {v!r} must be true or false")
