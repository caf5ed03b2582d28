"""OS checks read for real from /proc, /sys and resource on this machine; the report and the CLI end to end."""
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from workbench.env import checks as C
from workbench.env.report import STATUSES, Check, CheckReport

ROOT = Path(__file__).resolve().parents[1]
INF = resource.RLIM_INFINITY


def _lim(v):
    return None if v == INF else v


def test_limits_equal_what_getrlimit_says():
    for check, lim in ((C.check_memlock(), resource.RLIMIT_MEMLOCK), (C.check_nofile(), resource.RLIMIT_NOFILE),
                       (C.check_rtprio(), resource.RLIMIT_RTPRIO)):
        soft, hard = resource.getrlimit(lim)
        assert (check.data["soft"], check.data["hard"]) == (_lim(soft), _lim(hard)), check
        assert C.fmt_limit(soft) in check.found and C.fmt_limit(hard) in check.found


def test_limit_statuses_follow_the_wanted_values():
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    assert C.check_memlock().status == ("pass" if soft == INF else "warn")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = "fail" if soft < C.NOFILE_MINIMUM else "pass" if soft >= C.NOFILE_WANTED else "warn"
    nofile = C.check_nofile()
    assert nofile.status == want
    assert nofile.data["launcher_can_fix"] == (hard == INF or hard >= C.NOFILE_WANTED)
    rt = C.check_rtprio()
    soft, _ = resource.getrlimit(resource.RLIMIT_RTPRIO)
    caps = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("CapEff:")), 16)
    assert rt.data["cap_sys_nice"] == bool(caps >> 23 & 1)
    assert rt.status == ("pass" if rt.data["cap_sys_nice"] or soft == INF or soft > 0 else "warn")


def test_max_map_count_reads_proc_and_counts_this_process_mappings():
    c = C.check_max_map_count()
    assert c.data["limit"] == int(Path("/proc/sys/vm/max_map_count").read_text())
    n = sum(1 for _ in open("/proc/self/maps"))
    assert abs(c.data["used"] - n) < 50          # same process, a few mappings apart
    assert c.data["model_instances"] == (c.data["limit"] - c.data["used"]) // C.MAPS_PER_MODEL
    assert c.status == ("fail" if c.data["model_instances"] < C.MAP_MODELS_MINIMUM
                        else "pass" if c.data["limit"] >= C.MAP_COUNT_WANTED else "warn")


def test_max_map_count_thresholds_on_real_files(tmp_path):
    f = tmp_path / "max_map_count"
    for value, status in ((100, "fail"), (65530, "warn"), (C.MAP_COUNT_WANTED, "pass"), (10_000_000, "pass")):
        f.write_text(f"{value}\n")
        c = C.check_max_map_count(str(f))
        assert (c.status, c.data["limit"]) == (status, value)
        assert (c.fix == "") == (status == "pass")
    c = C.check_max_map_count(str(tmp_path / "missing"))
    assert c.status == "unavailable" and "cannot read" in c.found


def test_governor_on_this_machine_matches_sys():
    c = C.check_governor()
    files = list(Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_governor"))
    if not files:
        assert c.status == "unavailable" and "no cpufreq" in c.found
    else:
        govs = {p.read_text().strip() for p in files}
        assert set(c.data["governors"]) == govs
        assert c.status == ("pass" if govs == {"performance"} else "warn")


def test_governor_statuses_on_a_sysfs_tree(tmp_path):
    for i, gov in enumerate(["performance", "performance", "powersave"]):
        d = tmp_path / f"cpu{i}" / "cpufreq"
        d.mkdir(parents=True)
        (d / "scaling_governor").write_text(gov + "\n")
    c = C.check_governor(str(tmp_path))
    assert c.status == "warn" and c.data == {"governors": {"performance": 2, "powersave": 1}, "cpus": 3}
    assert "scaling_governor" in c.fix
    (tmp_path / "cpu2" / "cpufreq" / "scaling_governor").write_text("performance\n")
    assert C.check_governor(str(tmp_path)).status == "pass"


def test_clocksource_matches_sys(tmp_path):
    c = C.check_clocksource()
    p = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
    if p.exists():
        assert c.data["current"] == p.read_text().strip()
        assert c.status == ("pass" if c.data["current"] in C.GOOD_CLOCKSOURCES else "warn")
    (tmp_path / "current_clocksource").write_text("hpet\n")
    (tmp_path / "available_clocksource").write_text("tsc hpet acpi_pm\n")
    bad = C.check_clocksource(str(tmp_path))
    assert bad.status == "warn" and bad.fix.startswith("echo tsc | sudo tee")


def test_cuda_environment_variables():
    assert C.check_cuda_cache_disable({"CUDA_CACHE_DISABLE": "1"}).status == "pass"
    assert C.check_cuda_cache_disable({}).status == "warn"
    assert C.check_cuda_cache_disable({"CUDA_CACHE_DISABLE": "0"}).status == "warn"
    assert C.check_cuda_force_ptx_jit({}).status == "pass"
    assert C.check_cuda_force_ptx_jit({"CUDA_FORCE_PTX_JIT": "0"}).status == "pass"
    bad = C.check_cuda_force_ptx_jit({"CUDA_FORCE_PTX_JIT": "1"})
    assert bad.status == "fail" and bad.found == "'1'" and bad.fix.startswith("unset CUDA_FORCE_PTX_JIT")
    assert C.check_cuda_launch_blocking({"CUDA_LAUNCH_BLOCKING": "1"}).status == "warn"


def test_cubin_cache_location_size_and_problems(tmp_path, monkeypatch):
    d = tmp_path / "cubins"
    env = {"WORKBENCH_CUBIN_CACHE": str(d)}
    c = C.check_cubin_cache(env)
    assert c.status == "warn" and c.data == {"path": str(d), "exists": False} and c.fix == f"mkdir -p {d}"
    (d / "sm_90").mkdir(parents=True)
    (d / "sm_90" / "a.cubin").write_bytes(b"\x7fELF" + bytes(1000))
    (d / "sm_90" / "b.cubin").write_bytes(b"\x7fELF" + bytes(3000))
    (d / "sm_90" / ".tmp-x").write_bytes(bytes(10))       # an interrupted write is not a cubin
    c = C.check_cubin_cache(env)
    assert c.status == "pass" and c.data["files"] == 2 and c.data["bytes"] == 4008
    assert c.data["per_arch"] == {"sm_90": 2} and "2 cubins (sm_90: 2)" in c.found
    f = tmp_path / "file"
    f.write_text("x")
    assert C.check_cubin_cache({"WORKBENCH_CUBIN_CACHE": str(f)}).status == "fail"
    # with no explicit environment the compiler's rule decides, and it honours the variable
    monkeypatch.setenv("WORKBENCH_CUBIN_CACHE", str(d))
    assert C.cubin_cache_dir() == d


def test_cubin_cache_default_location(monkeypatch):
    monkeypatch.delenv("WORKBENCH_CUBIN_CACHE", raising=False)
    assert C.cubin_cache_dir() == Path("~/.cache/workbench/cubin").expanduser()
    assert C.cubin_cache_dir({}) == Path("~/.cache/workbench/cubin").expanduser()


def test_launch_report_parsing():
    assert C.check_launch_report({}).status == "unavailable"
    ok = [{"setting": "CUDA_CACHE_DISABLE", "ok": True, "value": "1"}]
    assert C.check_launch_report({"WORKBENCH_LAUNCH_REPORT": json.dumps(ok)}).status == "pass"
    bad = ok + [{"setting": "RLIMIT_NOFILE", "ok": False, "value": "256/4096", "why": "no CAP_SYS_RESOURCE",
                 "fix": "edit limits.conf"}]
    c = C.check_launch_report({"WORKBENCH_LAUNCH_REPORT": json.dumps(bad)})
    assert c.status == "warn" and "no CAP_SYS_RESOURCE" in c.found and c.fix == "edit limits.conf"
    assert C.check_launch_report({"WORKBENCH_LAUNCH_REPORT": "{not json"}).status == "warn"


def test_report_renderings_and_lookup():
    r = CheckReport(C.os_checks({"CUDA_FORCE_PTX_JIT": "1"}))
    assert r.exit_code == 1 and r.status == "fail" and r.failed()[0].name == "CUDA_FORCE_PTX_JIT"
    assert r["cuda-env/CUDA_FORCE_PTX_JIT"] is r.get("CUDA_FORCE_PTX_JIT")
    with pytest.raises(KeyError, match="have:"):
        r["no such check"]
    d = json.loads(r.to_json())
    assert [Check.from_dict(c) for c in d["checks"]] == r.checks
    assert d["counts"] == r.counts() and sum(d["counts"].values()) == len(r)
    df = r.to_frame()
    assert isinstance(df, pl.DataFrame) and df.height == len(r)
    assert df.columns == ["group", "name", "status", "found", "wanted", "why", "fix"]
    assert set(df["status"]) <= set(STATUSES)
    html = r._repr_html_()
    assert html.count("<tr") == len(r) + 1 and "CUDA_FORCE_PTX_JIT" in html
    assert "fix: unset CUDA_FORCE_PTX_JIT" in r.to_text()
    assert r.to_markdown().count("\n| ") >= len(r)
    assert all(c.to_dict()["status"] == c.status for c in r)
    with pytest.raises(ValueError, match="status 'ok'"):
        Check("x", "ok", "", "", "")


def _run_check(*args, env=None, preexec_fn=None):
    e = {k: v for k, v in os.environ.items() if k != "CUDA_FORCE_PTX_JIT"}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "workbench", "check", *args], cwd=ROOT, env=e,
                          preexec_fn=preexec_fn, capture_output=True, text=True, timeout=120)


def test_cli_json_parses_and_exits_0_without_failures():
    p = _run_check("--json", env={"CUDA_CACHE_DISABLE": "1"})
    d = json.loads(p.stdout)
    assert p.returncode == d["exit_code"]
    assert p.returncode == (1 if any(c["status"] == "fail" for c in d["checks"]) else 0)
    names = {c["name"] for c in d["checks"]}
    assert {"RLIMIT_MEMLOCK", "RLIMIT_NOFILE", "RLIMIT_RTPRIO", "vm.max_map_count", "cpu governor",
            "CUDA_CACHE_DISABLE", "CUDA_FORCE_PTX_JIT", "cubin cache", "kernel launcher",
            "TVM and cupy devices"} <= names
    assert "nvml" in names or "GPU" in names      # NVML unavailable here, or one check per GPU
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nofile = next(c for c in d["checks"] if c["name"] == "RLIMIT_NOFILE")
    assert (nofile["data"]["soft"], nofile["data"]["hard"]) == (_lim(soft), _lim(hard))
    assert next(c for c in d["checks"] if c["name"] == "CUDA_CACHE_DISABLE")["status"] == "pass"


def test_cli_fails_with_exit_1_when_nofile_is_too_low():
    def lower():
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    p = _run_check("--json", "--no-devices", preexec_fn=lower)
    d = json.loads(p.stdout)
    nofile = next(c for c in d["checks"] if c["name"] == "RLIMIT_NOFILE")
    assert nofile["status"] == "fail" and nofile["data"]["soft"] == 256
    assert p.returncode == 1 and d["exit_code"] == 1
    assert "ulimit -n" in nofile["fix"] or "limits.conf" in nofile["fix"]


def test_cli_text_names_the_fix_for_forced_ptx_jit():
    p = _run_check("--no-gpu", env={"CUDA_FORCE_PTX_JIT": "1"})
    assert p.returncode == 1
    assert "fail" in p.stdout and "unset CUDA_FORCE_PTX_JIT" in p.stdout
