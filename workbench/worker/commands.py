"""CLI: `workbench worker config [FILE]` (the effective worker configuration, or what is wrong with it) and
`workbench worker profile [NAME]` (what an emulation profile holds). Light imports only."""
from __future__ import annotations

import dataclasses


def _config(args) -> int:
    from workbench.cli import UserError
    from workbench.worker.config import ConfigError, WorkerConfig
    try:
        cfg = WorkerConfig.load(args.file)
    except ConfigError as e:
        raise UserError(str(e)) from None
    for f in dataclasses.fields(cfg):
        print(f"{f.name} = {getattr(cfg, f.name)!r}")
    print(f"# {cfg.num_pages} pages of {cfg.page_size} bytes per GPU")
    return 0


def _profile(args) -> int:
    from workbench.cli import UserError
    from workbench.worker.profile import Profile, ProfileError
    try:
        p = Profile.load(args.name)
    except ProfileError as e:
        raise UserError(str(e)) from None
    print(f"{p.path}: {p.device}, SM clock {p.sm_clock_mhz} MHz, H2D {p.h2d_bytes_per_s / 1e9:.1f} GB/s")
    print(f"source: {p.source}")
    for name, m in p.models.items():
        execs = ", ".join(f"b{b} {d.p50_ns / 1e6:.3f}" for b, d in sorted(m.exec.items()))
        print(f"  {name}: {m.weights_bytes / 1e6:.1f} MB weights, load {m.weights_load_ns / 1e6:.3f} ms, exec ms {execs}")
    return 0


def register(sub) -> None:
    w = sub.add_parser("worker", help="worker configuration and emulation profiles")
    wsub = w.add_subparsers(dest="worker_command", required=True)
    c = wsub.add_parser("config", help="print the effective worker config (defaults < FILE or $WORKBENCH_CONFIG)")
    c.add_argument("file", nargs="?", default=None)
    c.set_defaults(func=_config)
    p = wsub.add_parser("profile", help="print an emulation profile (data/profiles/NAME.json or a path)")
    p.add_argument("name", nargs="?", default="h200")
    p.set_defaults(func=_profile)
