"""CLI: `workbench simulate` — a quick virtual-time run of the controller on emulated GPUs (light imports)."""
from __future__ import annotations


def _models(spec: str) -> dict[str, int]:
    from workbench.cli import UserError
    out = {}
    for part in spec.split(","):
        name, _, copies = part.strip().partition(":")
        try:
            out[name] = int(copies or 1)
        except ValueError:
            raise UserError(f"--models: {part!r} is not NAME[:COPIES] (e.g. resnet50:100,bert_base:10)") from None
    return out


def _simulate(args) -> int:
    from workbench.cli import UserError
    from workbench.controller.controller import ControllerError
    from workbench.controller.simulation import simulate
    from workbench.worker.profile import ProfileError
    from workbench.workload.base import positive
    from workbench.workload.poisson import Poisson
    try:
        for flag in ("rate", "seconds", "slo_ms"):
            positive(getattr(args, flag), f"--{flag.replace('_', '-')}")
        res = simulate(_models(args.models), num_gpus=args.gpus, workers=args.workers, policy=args.policy,
                       duration_s=args.seconds, seed=args.seed, profile=args.profile,
                       workload=lambda ids: Poisson(ids, rate=args.rate, slo_ms=args.slo_ms, seed=args.seed))
    except (ProfileError, ValueError, ControllerError) as e:
        raise UserError(str(e)) from None
    st = ", ".join(f"{k} {v:,}" for k, v in res.statuses.items() if v)
    print(f"{res.policy}: {res.submitted:,} requests in {res.virtual_s:g} virtual s on {res.num_gpus} GPU(s): {st}")
    print(f"goodput {res.goodput:,.1f} r/s, SLO attainment {res.slo_attainment:.4f}, "
          f"simulated {res.speed:,.1f}x faster than real time ({res.wall_s:.2f} s wall)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("simulate", help="simulate the controller on emulated GPUs in virtual time (Poisson load)")
    p.add_argument("--models", default="resnet50:10", help="NAME[:COPIES],... from the emulation profile")
    p.add_argument("--policy", default="clockwork", choices=["clockwork", "triton", "ray"])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--gpus", type=int, default=1, help="GPUs per worker")
    p.add_argument("--rate", type=float, default=200.0, help="total requests/s, spread evenly over the models")
    p.add_argument("--slo-ms", type=float, default=100.0)
    p.add_argument("--seconds", type=float, default=10.0, help="virtual seconds of arrivals")
    p.add_argument("--profile", default="h200", help="emulation profile name or file")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_simulate)
