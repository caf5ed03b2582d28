"""CLI: `workbench run EXPERIMENT.toml --out DIR` (`--check` to validate only) and `workbench report DIR`
(rebuild the HTML report of a finished run, e.g. one run on the GPU machine with --no-report)."""
from __future__ import annotations

import sys
from pathlib import Path


def _run(args) -> int:
    from workbench.cli import UserError
    from workbench.experiments.config import ExperimentError, load
    from workbench.workload.azure_trace import TraceError

    try:
        cfg = load(args.experiment)
    except (ExperimentError, TraceError) as e:
        raise UserError(str(e)) from None
    n = len(cfg.runs)
    if args.check:
        print(f"{args.experiment}: ok ({n} run{'s' if n != 1 else ''}: {', '.join(r.label for r in cfg.runs)})")
        return 0
    out = Path(args.out) if args.out else Path("reports") / cfg.name   # reports/ is git-ignored
    from workbench.experiments.runner import run
    summary = run(cfg, out, progress=not args.quiet, report=False if args.no_report else None)
    for r in summary["runs"]:
        s = r["summary"]
        att = s.get("slo_attainment")
        print(f"{r['label']}: {s.get('requests', 0)} requests, SLO attainment "
              f"{'n/a' if att is None else f'{att:.4%}'}, goodput {s.get('goodput_rps', 0):.1f} r/s"
              f"{'  (interrupted)' if r['interrupted'] else ''}")
    print(f"results in {out}/ (summary.json{', report.html' if (out / 'report.html').exists() else ''})")
    if summary["interrupted"]:
        print("interrupted: the results hold what was recorded so far", file=sys.stderr)
        return 130
    return 0


def _report(args) -> int:
    from workbench.cli import UserError
    from workbench.experiments.report import rebuild_report
    try:
        print(rebuild_report(args.out))
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    return 0


def register(sub) -> None:
    p = sub.add_parser("run", help="run an experiment (EXPERIMENT.toml) headless and write its results")
    p.add_argument("experiment", help="the experiment file (see experiments/*.toml)")
    p.add_argument("--out", "-o", help="output directory (default: reports/<name>)")
    p.add_argument("--check", action="store_true", help="only validate the file and list its runs")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.set_defaults(func=_run)
    r = sub.add_parser("report", help="(re)write report.html of an experiment output directory")
    r.add_argument("out", help="the directory `workbench run` wrote")
    r.set_defaults(func=_report)
