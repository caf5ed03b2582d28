"""Review of experiment input checks: swept values get the same checks as written ones, [controller] values of
the wrong type, and Azure trace files with an empty line or a count too large, all named before anything runs."""
from __future__ import annotations

import pytest

from workbench.experiments.config import ExperimentError, load
from workbench.workload import AzureTrace, TraceError
from workbench.workload.azure_trace import MINUTE_COLUMNS

from test_experiments_config import GOOD, write   # the valid experiment the config tests start from

HEADER = "HashOwner,HashApp,HashFunction,Trigger," + ",".join(MINUTE_COLUMNS)


@pytest.mark.parametrize("sweep,match", [
    ('"duration_s" = [1, -5]', r"exp.toml, line 15: sweep.duration_s: must be > 0 \(got -5\)"),
    ('"drain_s" = [0.5, -1]', r"line 15: sweep.drain_s: must be >= 0 \(got -1\)"),
    ('"seed" = [1, "x"]', r"line 15: sweep.seed: must be an integer, got str 'x'"),
    ('"warmup_s" = [0, 5]', r"line 15: sweep.warmup_s: warmup_s \(5\) must be shorter than duration_s \(2\) "
                            r"\(run warmup_s=5\)"),
    ('"clock" = ["virtual", "fast"]', r"line 15: sweep.clock: must be one of \['virtual', 'real'\]"),
])
def test_swept_top_level_values_are_checked_like_written_ones(tmp_path, sweep, match):
    """Before, a run of the sweep with a negative duration, a negative drain or a warm-up as long as the run
    was accepted and ran (or crashed midway)."""
    with pytest.raises(ExperimentError, match=match):
        load(write(tmp_path, GOOD + "\n[sweep]\n" + sweep + "\n"))
    ok = load(write(tmp_path, GOOD + '\n[sweep]\n"duration_s" = [2, 3]\n"warmup_s" = [0, 1.5]\n'))
    assert [r.label for r in ok.runs] == ["duration_s=2,warmup_s=0", "duration_s=2,warmup_s=1.5",
                                          "duration_s=3,warmup_s=0", "duration_s=3,warmup_s=1.5"]


@pytest.mark.parametrize("line,match", [
    ("default_slo = 1e8", r"line 14: controller: ControllerConfig.default_slo must be an int .*\(write 100000000\)"),
    ("grace = 2.5", r"line 14: controller: ControllerConfig.grace must be an int"),
    ("buffer_ms = true", r"line 14: controller: buffer_ms must be a number of milliseconds, got True"),
])
def test_controller_values_of_the_wrong_type_are_named(tmp_path, line, match):
    """`default_slo = 1e8` (a float) was accepted; every request's deadline became a float and the run's
    telemetry could not be read back (an int64 column)."""
    with pytest.raises(ExperimentError, match=match):
        load(write(tmp_path, GOOD + "\n[controller]\n" + line + "\n"))
    cfg = load(write(tmp_path, GOOD + "\n[controller]\ndefault_slo = 100000000\nbuffer_ms = 0.5\n"))
    assert cfg.runs[0].raw["controller"] == {"default_slo": 100_000_000, "buffer_ms": 0.5}


def _row(fn: str, first: int) -> str:
    return f"o,a,{fn},http," + ",".join([str(first)] + ["0"] * 1439)


@pytest.mark.parametrize("text,match", [
    ("\n".join([HEADER, _row("f", 1)]) + "\n\n", r"d01.csv, line 3: empty line \(remove it"),
    ("\r\n".join([HEADER, _row("f", 1)]) + "\r\n\r\n", r"d01.csv, line 3: empty line"),
    ("\n".join([HEADER, _row("f", 1), "", _row("g", 2)]) + "\n", r"d01.csv, line 3: empty line"),
    ("\n".join([HEADER, _row("f", 1), _row("g", 3_000_000_000)]) + "\n",
     r"d01.csv, line 3, column '1' \(field 5\): count 3000000000 is larger than 2147483647"),
])
def test_trace_with_an_empty_line_or_a_huge_count_names_the_line(tmp_path, text, match):
    """Before, both gave "malformed (could not locate the bad line)": an extra blank line at the end of a day
    file (a common edit) could not be found."""
    d = tmp_path / "trace"
    d.mkdir()
    (d / "invocations_per_function_md.anon.d01.csv").write_text(text)
    with pytest.raises(TraceError, match=match):
        AzureTrace.open(d)
    azure = GOOD.replace('kind = "closed_loop"\nconcurrency = 2', 'kind = "azure"\ntrace = "trace"\ninterval_s = 1')
    with pytest.raises(ExperimentError, match=r"exp.toml, line 9: workload: .*" + match):
        load(write(tmp_path, azure))
    (d / "invocations_per_function_md.anon.d01.csv").write_text("\n".join([HEADER, _row("f", 1)]) + "\n")
    assert AzureTrace.open(d).counts().sum() == 1
