"""CLI: `workbench kernel install` (and the checker's commands)."""
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


def register(sub) -> None:
    k = sub.add_parser("kernel", help="install the 'Clockwork Workbench' Jupyter kernel")
    k.add_argument("action", choices=["install"])
    k.add_argument("--user", action="store_true", help="install for this user instead of this environment")
    k.set_defaults(func=_kernel)
