"""EXPERIMENT.toml validation: every malformed file is rejected before anything runs, naming the line and key."""
from __future__ import annotations

from pathlib import Path

import pytest

from workbench.experiments.config import ExperimentError, from_dict, load, locate_keys
from workbench.workload.azure_trace import MINUTE_COLUMNS

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
name = "t"
seed = 3
duration_s = 2

[[models]]
name = "resnet50"
copies = 3

[workload]
kind = "closed_loop"
concurrency = 2
slo_ms = 100
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.toml"
    p.write_text(text)
    return p


def test_good_file_gets_defaults_and_one_run(tmp_path):
    cfg = load(write(tmp_path, GOOD))
    assert [r.label for r in cfg.runs] == ["run"]
    r = cfg.runs[0].raw
    assert r["clock"] == "virtual" and r["device"] == {"kind": "emulated", "gpus": 1, "workers": 1,
                                                         "profile": "h200"}
    assert r["policy"]["name"] == "clockwork" and r["report"]["bucket_s"] == 1.0


def test_sweep_expands_to_labelled_runs(tmp_path):
    cfg = load(write(tmp_path, GOOD + '[sweep]\n"workload.slo_ms" = [25, 50]\n"policy.name" = ["clockwork", "ray"]\n'))
    assert [r.label for r in cfg.runs] == ["slo_ms=25,policy=clockwork", "slo_ms=25,policy=ray",
                                           "slo_ms=50,policy=clockwork", "slo_ms=50,policy=ray"]
    assert cfg.runs[3].raw["workload"]["slo_ms"] == 50 and cfg.runs[3].policy == "ray"
    assert cfg.raw["workload"]["slo_ms"] == 100   # the base stays as written


@pytest.mark.parametrize("text, match", [
    (GOOD.replace('duration_s = 2', 'duration_s = 2\nduraton = 3'), r"line 4: duraton: unknown key"),
    (GOOD.replace("concurrency = 2", "concurency = 2"), r"line 11: workload.concurency: unknown key"),
    (GOOD.replace("slo_ms = 100", "slo_ms = 0"), r"line 12: workload.slo_ms: must be > 0 \(got 0\)"),
    (GOOD.replace("slo_ms = 100", "slo_ms = -5"), r"line 12: workload.slo_ms: must be > 0"),
    (GOOD.replace("slo_ms = 100", "slo_ms = inf"), r"line 12: workload.slo_ms: must be finite, got inf"),
    (GOOD.replace("duration_s = 2", "duration_s = nan"), r"line 3: duration_s: must be finite, got nan"),
    (GOOD.replace('name = "resnet50"', 'name = "resnet5"'),
     r"line 6: models\[0\].name: unknown model 'resnet5': profile 'h200' has \[.*'resnet50'"),
    (GOOD.replace("copies = 3", "copies = -1"), r"line 7: models\[0\].copies: must be >= 1"),
    (GOOD.replace('kind = "closed_loop"', 'kind = "open_loop"'), r"line 10: workload.kind: unknown workload"),
    (GOOD.replace("concurrency = 2", 'concurrency = "2"'), r"workload.concurrency: must be an integer, got str"),
    (GOOD + '[policy]\nname = "fifo"\n', r"line 14: policy.name: unknown policy 'fifo'"),
    (GOOD + '[device]\nkind = "cuda"\n', r"clock: a cuda device computes in real time"),
    (GOOD + '[controller]\nschedule_ahed = 5\n', r"controller: unknown ControllerConfig field"),
    (GOOD + '[worker]\npage_sise = 5\n', r"worker: .*page_sise"),
    (GOOD + '[sweep]\n"workload.slo_ms" = []\n', r"line 14: sweep.workload.slo_ms: must be a non-empty list"),
    (GOOD + '[sweep]\n"workload.slo_ms" = [10, 0]\n', r"workload.slo_ms: must be > 0 \(got 0\)"),
    (GOOD.replace("duration_s = 2", "duration_s = 2\nwarmup_s = 5"), r"warmup_s: must be shorter than duration_s"),
    (GOOD.replace("[[models]]", "[[models]]\nname = 'x'\n[[models]]"), r"unknown model 'x'|listed twice"),
])
def test_malformed_files_name_line_and_key(tmp_path, text, match):
    with pytest.raises(ExperimentError, match=match):
        load(write(tmp_path, text))


def test_toml_syntax_error_names_the_line(tmp_path):
    with pytest.raises(ExperimentError, match=r"exp.toml: TOML syntax error: .*at line 11, column 15"):
        load(write(tmp_path, GOOD.replace("concurrency = 2", "concurrency = = 2")))


def test_missing_required_keys(tmp_path):
    with pytest.raises(ExperimentError, match="missing required key 'duration_s'"):
        load(write(tmp_path, GOOD.replace("duration_s = 2\n", "")))
    with pytest.raises(ExperimentError, match=r"workload: missing required key 'rate'"):
        load(write(tmp_path, GOOD.replace('kind = "closed_loop"\nconcurrency = 2', 'kind = "poisson"')))


def _trace(tmp_path: Path, rows: list[str]) -> Path:
    d = tmp_path / "trace"
    d.mkdir()
    (d / "invocations_per_function_md.anon.d01.csv").write_text(
        "HashOwner,HashApp,HashFunction,Trigger," + ",".join(MINUTE_COLUMNS) + "\n" + "\n".join(rows) + "\n")
    return d


AZURE = GOOD.replace('kind = "closed_loop"\nconcurrency = 2', 'kind = "azure"\ntrace = "trace"\ninterval_s = 1')


def test_bad_trace_is_rejected_before_running(tmp_path):
    zeros = ["0"] * 1440
    bad = zeros.copy()
    bad[5] = "-3"
    _trace(tmp_path, ["o,a,f,http," + ",".join(["1"] * 1440), "o,a,g,http," + ",".join(bad)])
    with pytest.raises(ExperimentError, match=r"line 9: workload: .*d01.csv, line 3, column '6' \(field 10\): "
                                              r"count '-3' is negative"):
        load(write(tmp_path, AZURE))


def test_trace_with_wrong_column_count_is_rejected(tmp_path):
    d = _trace(tmp_path, [])
    f = d / "invocations_per_function_md.anon.d01.csv"
    f.write_text("HashOwner,HashApp,HashFunction,Trigger," + ",".join(MINUTE_COLUMNS[:100]) + "\n")
    with pytest.raises(ExperimentError, match=r"1443 columns|104 columns = 4 id columns \+ 100 minute"):
        load(write(tmp_path, AZURE))


def test_missing_trace_directory_is_named(tmp_path):
    with pytest.raises(ExperimentError, match=r"workload.trace: .*trace does not exist"):
        load(write(tmp_path, AZURE))


def test_dict_config_for_notebooks():
    cfg = from_dict({"name": "nb", "duration_s": 1, "models": [{"name": "mlp", "copies": 2}],
                     "workload": {"kind": "poisson", "rate": 100, "slo_ms": 10}})
    assert cfg.runs[0].raw["workload"]["rate"] == 100
    with pytest.raises(ExperimentError, match=r"experiment: workload.rate: must be > 0"):
        from_dict({"name": "nb", "duration_s": 1, "models": [{"name": "mlp"}],
                   "workload": {"kind": "poisson", "rate": 0}})


def test_locate_keys_handles_arrays_of_tables_and_quoted_keys():
    text = GOOD + '[[models]]\nname = "mlp"\n[sweep]\n"workload.slo_ms" = [1]\n'
    where = locate_keys(text)
    assert where["models[0].name"] == 6 and where["models[1].name"] == 14
    assert where["sweep.workload.slo_ms"] == 16


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "experiments").glob("*_ci.toml")))
def test_shipped_ci_experiments_validate(name):
    cfg = load(REPO / "experiments" / name)
    assert cfg.runs and all(r.raw["clock"] == "virtual" and r.raw["device"]["kind"] == "emulated" for r in cfg.runs)
