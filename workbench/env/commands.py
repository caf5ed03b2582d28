"""CLI: `workbench check [--json]`, `workbench floors [--json] [--out FILE]`, `workbench kernel install`."""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

KERNEL_NAME = "clockwork-workbench"
KERNEL_SRC = Path(__file__).resolve().parents[2] / "kernels" / KERNEL_NAME


def install_kernel(prefix: str | None = None, user: bool = False) -> str:
    """Install the kernel spec from kernels/, pointing at this interpreter. Returns the install path."""
    from jupyter_client.kernelspec import KernelSpecManager
    from workbench.cli import UserError

    src = KERNEL_SRC / "kernel.json"
    if not src.is_file():
        raise UserError(f"kernel spec not found at {src}: run from a source checkout (pip install -e .)")
    spec = json.loads(src.read_text())
    spec["argv"] = [sys.executable if a == "python" else a for a in spec["argv"]]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / KERNEL_NAME
        shutil.copytree(KERNEL_SRC, d)
        (d / "kernel.json").write_text(json.dumps(spec, indent=1))
        return KernelSpecManager().install_kernel_spec(
            str(d), KERNEL_NAME, user=user, prefix=None if user else (prefix or sys.prefix))


def _kernel(args) -> int:
    if args.action == "install":
        print(f"installed kernel '{KERNEL_NAME}' in {install_kernel(user=args.user)}")
    return 0


def _check(args) -> int:
    from workbench.env import checks
    from workbench.env import floors as fl
    floors = None
    if args.floors:
        floors = fl.measure(page_bytes=args.page_mib * 2**20, model_bytes=int(args.model_mb * 1e6))
    report = checks.check(floors=floors, gpu=not args.no_gpu, devices=not args.no_devices)
    print(report.to_json() if args.json else report.to_text())
    return report.exit_code


def _floors(args) -> int:
    from workbench.cli import UserError
    from workbench.env import floors as fl
    devices = None if args.device is None else [args.device]
    try:
        f = fl.measure(page_bytes=args.page_mib * 2**20, model_bytes=int(args.model_mb * 1e6), reps=args.reps,
                       cpu=not args.no_cpu, gpu=not args.no_gpu, devices=devices)
    except ValueError as e:
        raise UserError(str(e)) from e
    text = json.dumps(f.to_dict(), indent=1) if args.json else f.to_text()
    if args.out:
        out = Path(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(f.to_dict(), indent=1) if args.json or out.suffix == ".json" else f.to_text())
        except OSError as e:
            raise UserError(f"cannot write {out}: {e.strerror}") from e
        print(f"floors written to {out}", file=sys.stderr)
    print(text)
    return 0


def _size_args(p) -> None:
    p.add_argument("--page-mib", type=int, default=16, help="page size to copy, MiB (default 16)")
    p.add_argument("--model-mb", type=float, default=100, help="whole-model size to copy, MB (default 100)")


def register(sub) -> None:
    c = sub.add_parser("check", help="is this machine fit for predictable serving? (exit code 1 if a check fails)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--floors", action="store_true", help="also measure the physical floors (a few seconds)")
    c.add_argument("--no-gpu", action="store_true", help="skip the NVML checks")
    c.add_argument("--no-devices", action="store_true", help="do not import TVM and cupy to compare their devices")
    _size_args(c)
    c.set_defaults(func=_check)
    f = sub.add_parser("floors", help="measure the physical floors: copy bandwidth, launch latency, timers, clocks")
    f.add_argument("--json", action="store_true", help="print the floors as JSON")
    f.add_argument("--out", metavar="FILE", help="also write them to FILE (JSON if --json or FILE ends in .json)")
    f.add_argument("--reps", type=int, default=20, help="repetitions per copy (default 20; p50 is reported)")
    f.add_argument("--device", type=int, default=None, help="only this CUDA device (default: every visible one)")
    f.add_argument("--no-gpu", action="store_true", help="CPU floors only")
    f.add_argument("--no-cpu", action="store_true", help="GPU floors only")
    _size_args(f)
    f.set_defaults(func=_floors)
    k = sub.add_parser("kernel", help="install the 'Clockwork Workbench' Jupyter kernel")
    k.add_argument("action", choices=["install"])
    k.add_argument("--user", action="store_true", help="install for this user instead of this environment")
    k.set_defaults(func=_kernel)
