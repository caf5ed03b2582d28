"""CLI: `workbench notebook NB --out DIR` runs a notebook headless and writes its reproducible report."""
from __future__ import annotations

import json
from pathlib import Path


def _parameters(values: list[str]) -> dict:
    out = {}
    from workbench.cli import UserError
    for v in values or []:
        name, sep, raw = v.partition("=")
        if not sep or not name.isidentifier():
            raise UserError(f"-p {v!r}: write NAME=VALUE (VALUE as JSON, or a plain string)")
        try:
            out[name] = json.loads(raw)
        except json.JSONDecodeError:
            out[name] = raw
    return out


def _notebook(args) -> int:
    from workbench.cli import UserError
    from workbench.ui.report import ReportError, run_notebook

    nb = Path(args.notebook)
    if not nb.is_file():
        raise UserError(f"notebook {nb} does not exist")
    out = Path(args.out) if args.out else Path("reports") / nb.stem
    try:
        rep = run_notebook(nb, out, kernel=args.kernel, timeout=args.timeout, parameters=_parameters(args.param))
    except ReportError as e:
        raise UserError(str(e)) from None
    print(f"executed {nb} in {rep.seconds:.1f} s (kernel {rep.kernel})")
    print(f"  notebook: {rep.notebook}")
    print(f"  report:   {rep.html}  (opens offline)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("notebook", help="run a notebook headless and export its report (offline HTML)")
    p.add_argument("notebook", help="the .ipynb to run top to bottom")
    p.add_argument("--out", help="report directory (default reports/<notebook name>)")
    p.add_argument("--kernel", help="kernel name (default: 'clockwork-workbench' if installed, else python3)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    p.add_argument("-p", "--param", action="append", metavar="NAME=VALUE",
                   help="set a variable before the first cell (repeatable; VALUE is JSON or a string)")
    p.set_defaults(func=_notebook)
