"""`workbench` command. Each layer registers its own subcommands from a light `commands` module
(heavy imports happen inside the command functions, so `workbench check` never imports TVM)."""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define `register(subparsers)`; each parser sets `func(args) -> int`.
COMMAND_MODULES = [
    "workbench.models.commands",     # compile, inspect
    "workbench.env.commands",        # check, floors, kernel
    "workbench.ui.commands",         # notebook
    "workbench.worker.commands",     # worker config, worker profile
    "workbench.controller.commands",  # simulate
    "workbench.experiments.commands",  # run
]


class UserError(Exception):
    """A problem with what the user asked for: printed as one clear line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="workbench", description="Clockwork Workbench")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:   # that layer is not installed in this build
                continue
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"workbench {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
