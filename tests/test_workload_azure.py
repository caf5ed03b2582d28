"""Azure Functions trace: the shipped synthetic file, malformed files (named line/column), multi-day traces,
the function -> model mapping and the spreading of each minute's count."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from workbench.clock import VirtualClock
from workbench.workload import AzureReplay, AzureTrace, TraceError, map_functions
from workbench.workload.azure_synth import write_synthetic_trace
from workbench.workload.azure_trace import MINUTE_COLUMNS
from workbench.workload.sink import Sink

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data" / "azure"
NS = 1_000_000_000
HEADER = "HashOwner,HashApp,HashFunction,Trigger," + ",".join(MINUTE_COLUMNS)


def row(owner: str, counts: list[int], trigger: str = "http", fn: str | None = None) -> str:
    full = list(counts) + [0] * (1440 - len(counts))
    return f"{owner},app{owner},{fn or 'f' + owner},{trigger}," + ",".join(map(str, full))


def write(tmp_path: Path, lines: list[str], day: int = 1, header: str = HEADER) -> Path:
    p = tmp_path / f"invocations_per_function_md.anon.d{day:02d}.csv"
    p.write_text("\n".join([header] + lines) + "\n")
    return p


def test_shipped_synthetic_file_opens_with_the_real_layout():
    files = sorted(SHIPPED.glob("invocations_per_function_md.anon.d*.csv"))
    assert [f.name for f in files] == ["invocations_per_function_md.anon.d01.csv"]
    all_fns = AzureTrace.open(SHIPPED, drop_idle=False)
    tr = AzureTrace.open(SHIPPED)
    assert all_fns.num_functions == 200
    assert 0 < all_fns.num_functions - tr.num_functions < 40          # idle (all-zero) rows dropped
    assert set(tr.functions["Trigger"].unique()) <= {"http", "timer", "queue", "orchestration", "storage",
                                                     "event", "others"}
    c = tr.counts()
    assert c.shape == (tr.num_functions, 1440) and c.min() >= 0
    assert np.array_equal(c.sum(axis=1), tr.functions["total"].to_numpy())
    assert np.array_equal(tr.minute_totals(), c.sum(axis=0))
    ranks = tr.functions["rank"].to_numpy()
    assert sorted(ranks.tolist()) == list(range(tr.num_functions))
    assert tr.functions.sort("rank")["total"].is_sorted(descending=True)


def test_header_with_wrong_column_count_is_named(tmp_path):
    bad = "HashOwner,HashApp,HashFunction,Trigger," + ",".join(MINUTE_COLUMNS[:-1])
    write(tmp_path, [], header=bad)
    with pytest.raises(TraceError, match=r"d01.csv, line 1: 1443 columns = 4 id columns \+ 1439 minute columns"):
        AzureTrace.open(tmp_path)


def test_header_with_minutes_out_of_order_is_named(tmp_path):
    cols = list(MINUTE_COLUMNS)
    cols[9], cols[10] = cols[10], cols[9]
    write(tmp_path, [], header="HashOwner,HashApp,HashFunction,Trigger," + ",".join(cols))
    with pytest.raises(TraceError, match=r"line 1, column 14: header '11' where minute column '10'"):
        AzureTrace.open(tmp_path)


def test_row_with_wrong_field_count_is_named(tmp_path):
    short = row("b", [1, 2]).rsplit(",", 1)[0]        # 1443 fields
    write(tmp_path, [row("a", [1]), short])
    with pytest.raises(TraceError, match=r"line 3: 1443 fields, expected 1444"):
        AzureTrace.open(tmp_path)
    write(tmp_path, [row("a", [1]) + ",7", row("b", [1])])
    with pytest.raises(TraceError, match=r"line 2: 1445 fields, expected 1444"):
        AzureTrace.open(tmp_path)


def test_negative_and_non_integer_counts_are_named(tmp_path):
    write(tmp_path, [row("a", [1, 2]), row("b", [0, 0, 0, -4])])
    with pytest.raises(TraceError, match=r"line 3, column '4' \(field 8\): count '-4' is negative"):
        AzureTrace.open(tmp_path)
    write(tmp_path, [row("a", [1, 2.5])])
    with pytest.raises(TraceError, match=r"line 2, column '2' \(field 6\): count '2.5' is not a non-negative"):
        AzureTrace.open(tmp_path)
    write(tmp_path, [row("a", [1]).replace(",1,", ",,", 1)])
    with pytest.raises(TraceError, match=r"line 2, column '1' \(field 5\): count '' is not"):
        AzureTrace.open(tmp_path)


def test_missing_files_and_days_are_named(tmp_path):
    with pytest.raises(TraceError, match="no trace files named"):
        AzureTrace.open(tmp_path)
    write(tmp_path, [row("a", [1])])
    with pytest.raises(TraceError, match=r"no file for day\(s\) \[3\] \(days present: \[1\]\)"):
        AzureTrace.open(tmp_path, days=[3])
    with pytest.raises(TraceError, match="unknown trigger type"):
        AzureTrace.open(tmp_path, triggers=["cron"])


def test_days_join_on_function_keys_and_duplicates_add_up(tmp_path):
    write(tmp_path, [row("a", [1, 1]), row("b", [5]), row("a", [2])], day=1)   # "a" listed twice
    write(tmp_path, [row("c", [0, 3], trigger="timer"), row("a", [4])], day=2)
    tr = AzureTrace.open(tmp_path)
    assert tr.functions["HashOwner"].to_list() == ["a", "b", "c"]
    assert tr.functions["total"].to_list() == [8, 5, 3]
    c = tr.counts(0, 2880)
    assert c[0, :3].tolist() == [3, 1, 0] and c[0, 1440] == 4 and c[2, 1441] == 3
    assert tr.counts(1439, 3)[:, :].tolist() == [[0, 4, 0], [0, 0, 0], [0, 0, 3]]   # across the day boundary
    assert AzureTrace.open(tmp_path, triggers=["timer"]).functions["HashOwner"].to_list() == ["c"]
    with pytest.raises(TraceError, match="outside the trace"):
        tr.counts(2000, 1000)


def test_clockwork_mapping_gives_contiguous_blocks_by_rank():
    ranks = np.array([3, 0, 1, 2, 5, 4])
    assert map_functions(ranks, [10, 20, 30], "clockwork").tolist() == [20, 10, 10, 20, 30, 30]
    assert map_functions(ranks, [10, 20, 30], "round_robin").tolist() == [10, 10, 20, 30, 30, 20]
    with pytest.raises(ValueError, match="mapping must be one of"):
        map_functions(ranks, [1], "random")


@pytest.mark.parametrize("spread", ["even", "uniform", "poisson"])
def test_replay_spreads_each_minute_inside_its_interval(tmp_path, spread):
    write(tmp_path, [row("a", [6, 0, 3]), row("b", [2, 4, 1]), row("z", [])])
    clock = VirtualClock()
    sink = Sink(clock)
    w = AzureReplay(tmp_path, [100, 200], interval_s=1.0, minutes=3, spread=spread, shuffle_models=False,
                    seed=4, slo_ms=100)
    assert w.model_of.tolist() == [100, 200]        # "a" (9 calls) ranks first; idle "z" is dropped
    w.start(sink, clock)
    clock.run()
    t, m = sink.times(), sink.models()
    minute = t // NS
    per = {(int(k), int(mm)): int(((minute == k) & (m == mm)).sum()) for k in range(3) for mm in (100, 200)}
    if spread == "poisson":
        assert sum(per.values()) > 0 and t.max() < 3 * NS
    else:                                            # scale 1: exactly the trace's counts
        assert per == {(0, 100): 6, (0, 200): 2, (1, 100): 0, (1, 200): 4, (2, 100): 3, (2, 200): 1}
    if spread == "even":
        a0 = np.sort(t[(minute == 0) & (m == 100)])
        assert np.allclose(np.diff(a0), NS / 6, atol=2)


def test_replay_scale_and_determinism(tmp_path):
    write_synthetic_trace(tmp_path, n_functions=40, seed=3)

    def go(seed):
        clock = VirtualClock()
        sink = Sink(clock)
        w = AzureReplay(tmp_path, 10, scale=0.25, interval_s=0.5, minutes=20, spread="uniform", seed=seed)
        w.start(sink, clock)
        clock.run()
        return w, sink

    w, s = go(1)
    assert len(s.arrivals) == pytest.approx(w.expected_requests(), rel=0.05)
    assert s.arrivals == go(1)[1].arrivals and s.arrivals != go(2)[1].arrivals
    assert set(s.models().tolist()) <= set(range(10))


def test_replay_rejects_bad_parameters(tmp_path):
    write(tmp_path, [row("a", [1])])
    for bad in (0, float("inf")):
        with pytest.raises(ValueError, match=f"azure: scale must be a finite number > 0, got {bad}"):
            AzureReplay(tmp_path, 2, scale=bad)
    with pytest.raises(ValueError, match="azure: interval_s must be a finite number > 0, got nan"):
        AzureReplay(tmp_path, 2, interval_s=float("nan"))
    with pytest.raises(ValueError, match="start_minute 2000 is outside"):
        AzureReplay(tmp_path, 2, start_minute=2000)
    with pytest.raises(ValueError, match="spread must be one of"):
        AzureReplay(tmp_path, 2, spread="burst")


def test_generated_day_has_the_documented_shape(tmp_path):
    (p,) = write_synthetic_trace(tmp_path, n_functions=300, seed=1)
    df = pl.read_csv(p, n_rows=2)
    assert df.columns[:4] == ["HashOwner", "HashApp", "HashFunction", "Trigger"] and df.width == 1444
    assert len(df["HashFunction"][0]) == 64
    tr = AzureTrace.open(tmp_path, drop_idle=False)
    mean_per_min = tr.functions["total"].to_numpy() / 1440
    assert 0.65 < (mean_per_min <= 1).mean() < 0.95                    # most functions are rare
    assert mean_per_min.max() > 100                                     # and a few are very busy
    hourly = tr.minute_totals().reshape(24, 60).sum(axis=1)
    assert hourly[13:16].mean() > 1.5 * hourly[1:4].mean()              # afternoon peak, night trough


def test_windows_line_ends_quotes_and_numeric_looking_ids(tmp_path):
    lines = [HEADER, row("a", [1, 2]), '"d","e","0123",timer,' + ",".join(['"2"'] * 1440)]
    (tmp_path / "invocations_per_function_md.anon.d03.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    tr = AzureTrace.open(tmp_path)
    assert tr.days[0].day == 3
    assert tr.functions.select("HashFunction", "Trigger", "total").rows() == [("fa", "http", 3),
                                                                              ("0123", "timer", 2880)]
