"""The tuning database and the tuned CUDA pipeline, on the CPU machine: database files (validation, lookup of
the nearest measured batch, merging of per-kernel choices), `compile_model` consulting the database (variant
switch per batch size, lowering switch of a zoo model, manifest records), and the schedule rules themselves.
CUDA compiles need no GPU: the tests read the generated CUDA source to see which schedule was applied."""
from __future__ import annotations

import json
import re

import pytest

from workbench.models import schedules, tuning, zoo
from workbench.models.compiler import CompileError, compile_model, make_target, resolve_tuning
from workbench.models.schedules import ScheduleError, ScheduleSpec
from workbench.models.tuning import TuningError, Variant

BIG_TILE = {"block_size_x": 16, "block_size_y": 16, "micro_size_x": 8, "micro_size_y": 8, "micro_size_k": 8,
            "vector_size": 4}


def _launch_bounds(art, b: int) -> set[int]:
    """Thread-block sizes of the kernels in b{N}.so (from the CUDA source it carries)."""
    from workbench.models.cubin_cache import sources_in_so
    digests = art.manifest["batches"][str(b)]["cuda_source_sha256"]
    src = "".join(sources_in_so(art.so_path(b).read_bytes(), digests))
    return {int(n) for n in re.findall(r"__launch_bounds__\((\d+)\)", src)}


# ---------------------------------------------------------------------------------------------------------
# Variants and the database files
# ---------------------------------------------------------------------------------------------------------

def test_variant_json_round_trip_and_validation():
    v = Variant("matmul", "fp16", ScheduleSpec(BIG_TILE, 256, {"00ff": {"rule": "small_reduction", "threads": 128}}),
                cuda_graph=True)
    assert Variant.from_json(json.loads(json.dumps(v.to_json()))) == v
    assert not v.is_default and Variant().is_default
    assert "small_reduction=256" in v.describe() and "1 tuned kernels" in v.describe()
    with pytest.raises(ScheduleError, match="block_size_z"):
        ScheduleSpec(matmul={"block_size_z": 4})
    with pytest.raises(ScheduleError, match="multiple of 32"):
        ScheduleSpec(small_reduction=100)
    with pytest.raises(ScheduleError, match="rule"):
        ScheduleSpec(kernels={"k": {"rule": "magic"}})
    with pytest.raises(ScheduleError, match="lowering"):
        Variant(lowering="winograd")
    with pytest.raises(ScheduleError, match="unknown field"):
        Variant.from_json({"lowering": "direct", "tile": 3})


def test_record_then_plan_uses_exact_then_nearest_batch_and_merges_kernel_choices(tmp_path):
    k1 = {"aaaa": {"rule": "matmul", "config": {"block_size_x": 16}}}
    k16 = {"bbbb": {"rule": "small_reduction", "threads": 512}}
    v1 = Variant("matmul", schedule=ScheduleSpec({"micro_size_k": 8}, None, k1))
    v16 = Variant("matmul", schedule=ScheduleSpec(BIG_TILE, 256, k16))
    tuning.record("resnet50", "cuda", "sm_90", v1, 1, {"p50_ms": 3.0, "p99_ms": 3.1}, directory=tmp_path)
    path = tuning.record("resnet50", "cuda", "sm_90", v16, 16, {"p50_ms": 9.0, "p99_ms": 9.1}, directory=tmp_path,
                         torch={"fp32_graph": {"p50_ms": 6.4}}, gpu="NVIDIA H200")
    assert path == tmp_path / "cuda-sm_90" / "resnet50.json"
    d = json.loads(path.read_text())
    assert d["precisions"]["fp32"]["lowering"] == "matmul" and list(d["precisions"]["fp32"]["batches"]) == ["1", "16"]
    p = tuning.plan("resnet50", "cuda", "sm_90", [1, 2, 8, 16], directory=tmp_path)
    assert p.lowering == "matmul"
    assert [p.provenance[b]["from_batch"] for b in (1, 2, 8, 16)] == [1, 1, 16, 16]   # log2-nearest
    assert p.variants[1].schedule.matmul == {"micro_size_k": 8}
    assert p.variants[8].schedule.matmul == BIG_TILE and p.variants[8].schedule.small_reduction == 256
    for b in (1, 16):                      # kernel keys are shape-specific: every batch gets every choice
        assert p.variants[b].schedule.kernels == {**k1, **k16}
    assert tuning.plan("resnet50", "cuda", "sm_90", [1], precision="fp16", directory=tmp_path) is None
    assert tuning.plan("resnet50", "cuda", "sm_80", [1], directory=tmp_path) is None
    assert tuning.plan("resnet50", "cuda", "sm_90", [1], lowering="direct", directory=tmp_path) is None


def test_damaged_database_file_names_the_file(tmp_path):
    f = tmp_path / "cuda-sm_90" / "mlp.json"
    f.parent.mkdir()
    f.write_text("{not json")
    with pytest.raises(TuningError, match="mlp.json.*not valid JSON"):
        tuning.plan("mlp", "cuda", "sm_90", [1], directory=tmp_path)
    f.write_text(json.dumps({"format": tuning.FORMAT, "version": 1, "model": "mlp", "target": "cuda",
                             "precisions": {"fp32": {"lowering": "direct", "batches": {
                                 "16": {"variant": {"lowering": "direct", "schedule": {"matmul": {"bogus": 1}}}}}}}}))
    with pytest.raises(TuningError, match=r"batches\.16\.variant.*bogus"):
        tuning.plan("mlp", "cuda", "sm_90", [16], directory=tmp_path)
    with pytest.raises(CompileError, match="does not exist"):
        resolve_tuning(zoo.get("mlp"), [1], "cuda", "sm_90", tuning=tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------------
# compile_model consults the database
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlp():
    return zoo.get("mlp")


def test_compile_applies_the_database_variant_per_batch_size(mlp, tmp_path):
    db = tmp_path / "db"
    tuning.record("mlp", "cuda", "sm_90", Variant(schedule=ScheduleSpec(matmul=BIG_TILE)), 16,
                  {"p50_ms": 0.05, "p99_ms": 0.06}, directory=db)
    tuned = compile_model(mlp, tmp_path / "tuned", batch_sizes=[1, 16], target="cuda", tuning=db)
    plain = compile_model(mlp, tmp_path / "plain", batch_sizes=[16], target="cuda", tuning=None)
    # b16: dlight's Matmul with the recorded 16x16 thread block; untuned: dlight's CUDA default 8x16
    assert 256 in _launch_bounds(tuned, 16) and 256 not in _launch_bounds(plain, 16)
    assert 128 in _launch_bounds(plain, 16)
    m = tuned.manifest
    assert m["tuning"]["database"] == str(db / "cuda-sm_90" / "mlp.json") and m["tuning"]["requested"] == "mlp"
    assert m["tuning"]["batches"]["16"]["from_batch"] == 16 and m["tuning"]["batches"]["1"]["from_batch"] == 16
    assert m["batches"]["16"]["variant"]["schedule"]["matmul"] == BIG_TILE
    assert plain.manifest["tuning"] is None and "variant" not in plain.manifest["batches"]["16"]
    # the weights and interface do not change with the variant
    assert m["weights"]["sha256"] == plain.manifest["weights"]["sha256"] and m["name"] == "mlp"


def test_per_kernel_choice_applies_to_its_kernel_only(mlp, tmp_path):
    tgt = make_target("cuda", "sm_90")
    kernels = schedules.kernels(schedules.fuse(mlp.make_module(16), tgt), tgt)
    first = next(k for k in kernels if k.name == "fused_matmul_add_relu")
    db = tmp_path / "db"
    tuning.record("mlp", "cuda", "sm_90", Variant(schedule=ScheduleSpec(kernels={
        first.key: {"rule": "matmul", "config": {"block_size_x": 4, "block_size_y": 8}}})), 16,
        {"p50_ms": 0.05, "p99_ms": 0.06}, directory=db)
    art = compile_model(mlp, tmp_path / "a", batch_sizes=[16], target="cuda", tuning=db)
    assert art.manifest["batches"]["16"]["tuned_kernels"] == 1
    bounds = _launch_bounds(art, 16)
    assert 32 in bounds and 128 in bounds           # the chosen kernel 4x8 threads, the others dlight's 8x16


def test_default_lowering_switches_to_the_database_lowering(tmp_path):
    tuning.record("resnet18", "cuda", "sm_90", Variant("matmul", schedule=ScheduleSpec(matmul=BIG_TILE)), 16,
                  {"p50_ms": 4.0, "p99_ms": 4.1}, directory=tmp_path)
    src = zoo.get("resnet18", seed=3)
    switched, variants, record = resolve_tuning(src, [1, 16], "cuda", "sm_90", tuning=tmp_path)
    assert switched.name == "resnet18-matmul" and switched.architecture["conv_lowering"] == "matmul"
    assert switched.architecture["zoo"]["seed"] == 3                  # same weights, re-laid out
    assert record["requested"] == "resnet18" and record["lowering"] == "matmul"
    assert variants[1].schedule.matmul == BIG_TILE
    # asked for by name, a lowering is kept: the database has nothing for direct resnet18
    explicit = zoo.get("resnet18-matmul")
    same, _, _ = resolve_tuning(explicit, [1], "cuda", "sm_90", tuning=tmp_path)
    assert same is explicit
    tuning.record("resnet18", "cuda", "sm_90", Variant("direct"), 4, {"p50_ms": 9.0}, directory=tmp_path / "d")
    kept, variants, _ = resolve_tuning(zoo.get("resnet18"), [4], "cuda", "sm_90", tuning=tmp_path / "d")
    assert kept.name == "resnet18" and variants[4] == Variant("direct")
    # not tuned: the CPU target, ONNX sources, tuning=None
    _, v, rec = resolve_tuning(src, [1], "cpu", "sm_90", tuning=tmp_path)
    assert rec is None and v == {1: None}
    _, v, rec = resolve_tuning(src, [1], "cuda", "sm_90", tuning=None)
    assert rec is None and v == {1: None}


@pytest.mark.slow
def test_lowering_switch_compiles_the_lowered_model(tmp_path):
    tuning.record("resnet18", "cuda", "sm_90", Variant("matmul"), 1, {"p50_ms": 3.0}, directory=tmp_path / "db")
    art = compile_model(zoo.get("resnet18"), tmp_path / "r18", batch_sizes=[1], target="cuda",
                        tuning=tmp_path / "db", weights="synthetic")
    m = art.manifest
    assert m["name"] == "resnet18-matmul" and m["source"]["origin"] == "zoo:resnet18-matmul"
    assert m["tuning"]["requested"] == "resnet18"
    shapes = {t.name: t.shape for t in art.tensors}
    assert shapes["conv1.weight"] == (7 * 7 * 3, 64)                 # [kh*kw*cin, cout]: the matmul layout


def test_fp16_needs_a_working_serializer(mlp, tmp_path):
    if schedules.tensorize_supported():
        art = compile_model(mlp, tmp_path / "h", batch_sizes=[16], target="cuda", precision="fp16", tuning=None)
        assert art.manifest["batches"]["16"]["variant"]["precision"] == "fp16"
    else:
        with pytest.raises((CompileError, ScheduleError), match="apache-tvm-ffi<0.1.15"):
            compile_model(mlp, tmp_path / "h", batch_sizes=[16], target="cuda", precision="fp16", tuning=None)
        assert not (tmp_path / "h").exists()
    with pytest.raises(CompileError, match="precision"):
        compile_model(mlp, tmp_path / "x", batch_sizes=[1], target="cuda", precision="int4")


# ---------------------------------------------------------------------------------------------------------
# The rules
# ---------------------------------------------------------------------------------------------------------

def test_small_reduction_takes_depthwise_convs_and_leaves_long_reductions():
    tgt = make_target("cuda", "sm_90")
    fused = schedules.fuse(zoo.get("mobilenet_v2").make_module(1), tgt)
    ks = schedules.kernels(fused, tgt)
    dw = [k for k in ks if k.default_rule == "general_reduction"]
    assert len(dw) == 10 and all(k.params[1][0][1:] == (1, 3, 3) for k in dw)   # the depthwise convs (10 shapes)
    [sch] = schedules.candidate_schedules(dw[0], tgt, [{"rule": "small_reduction", "threads": 128}])
    text = sch.script()
    assert 'thread="threadIdx.x"' in text and "T.int64(128)" in text and "local" in text   # one output per thread
    pool = next(k for k in ks if k.default_rule == "reduction")                   # global average pool: 49
    assert schedules.candidate_schedules(pool, tgt, [{"rule": "small_reduction", "threads": 128}]) != [None]
    tiny = schedules.kernels(schedules.fuse(zoo.get("tiny_transformer").make_module(1), tgt), tgt)
    layer_norm = next(k for k in tiny if k.name == "layer_norm")                   # reduces over 128: not taken
    assert schedules.candidate_schedules(layer_norm, tgt, [{"rule": "small_reduction", "threads": 64}]) == [None]
    assert layer_norm.outputs == [len(layer_norm.params) - 1]


def test_kernel_keys_are_stable_and_shape_specific(mlp):
    tgt = make_target("cuda", "sm_90")
    a = {k.name: k.key for k in schedules.kernels(schedules.fuse(mlp.make_module(16), tgt), tgt)}
    b = {k.name: k.key for k in schedules.kernels(schedules.fuse(zoo.get("mlp").make_module(16), tgt), tgt)}
    c = {k.name: k.key for k in schedules.kernels(schedules.fuse(mlp.make_module(8), tgt), tgt)}
    assert a == b and len(set(a.values())) == 3
    assert not set(a.values()) & set(c.values())


# ---------------------------------------------------------------------------------------------------------
# `workbench compile --tuning/--no-tuning/--precision`, and the baselines that must ignore the database
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def mlp_db(tmp_path, monkeypatch):
    """A tuning database with a b16 entry for mlp (a 16x16-thread Matmul tile), as $WORKBENCH_TUNING_DB."""
    db = tmp_path / "db"
    tuning.record("mlp", "cuda", "sm_90", Variant(schedule=ScheduleSpec(matmul=BIG_TILE)), 16,
                  {"p50_ms": 0.05, "p99_ms": 0.06}, directory=db, gpu="NVIDIA H200")
    monkeypatch.setenv(tuning.ENV_DIR, str(db))
    return db


def test_cli_compile_uses_the_database_unless_told_not_to(mlp_db, tmp_path, capsys):
    from workbench.cli import main as cli_main
    from workbench.models.artifact import Artifact
    base = ["compile", "mlp", "--target", "cuda", "--batch-sizes", "16", "-q"]
    assert cli_main(base + ["--out", str(tmp_path / "auto")]) == 0            # default: --tuning auto
    text = capsys.readouterr().out
    assert f"kernels    {mlp_db / 'cuda-sm_90' / 'mlp.json'}: lowering direct, fp32; b16<-b16 (0.05 ms)" in text
    tuned = Artifact.open(tmp_path / "auto")
    assert 256 in _launch_bounds(tuned, 16) and tuned.manifest["tuning"]["database"].startswith(str(mlp_db))
    assert cli_main(base + ["--out", str(tmp_path / "none"), "--no-tuning"]) == 0
    assert "kernels    TVM default schedules, fp32" in capsys.readouterr().out
    plain = Artifact.open(tmp_path / "none")
    assert plain.manifest["tuning"] is None and 256 not in _launch_bounds(plain, 16)
    assert cli_main(["inspect", str(tmp_path / "auto"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["tuning"]["lowering"] == "direct" and d["precision"] == {"16": "fp32"}


@pytest.mark.parametrize("extra, match", [
    (["--tuning", "nowhere"], "--tuning 'nowhere': no such tuning database directory"),
    (["--tuning", "{db}", "--no-tuning"], "--no-tuning contradicts --tuning"),
    (["--precision", "fp16"], "precision fp16 is for --target cuda only"),          # --target cpu
])
def test_cli_tuning_errors(mlp_db, tmp_path, capsys, monkeypatch, extra, match):
    from workbench.cli import main as cli_main
    monkeypatch.chdir(tmp_path)
    argv = ["compile", "mlp", "--out", "X", "-q"] + [e.format(db=mlp_db) for e in extra]
    assert cli_main(argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "X").exists()


def test_gpu_baseline_artifacts_ignore_the_database(mlp_db, tmp_path):
    """bench.build_gpu_artifacts builds the baseline the GPU tests and benchmarks compare against: untuned even
    with a database entry for the model, reused while up to date, rebuilt if a tuned build replaced it."""
    from bench.build_gpu_artifacts import build
    out = tmp_path / "artifacts"
    art, secs = build("mlp", "cuda", out, [16], "sm_90", 0, False)
    assert secs > 0 and art.manifest["tuning"] is None and 256 not in _launch_bounds(art, 16)
    assert build("mlp", "cuda", out, [16], "sm_90", 0, False)[1] == 0.0              # up to date
    art, secs = build("mlp", "cuda", out, [16], "sm_90", 0, False, tuning="auto")     # asked for: tuned
    assert secs > 0 and art.manifest["tuning"] is not None and 256 in _launch_bounds(art, 16)
    art, secs = build("mlp", "cuda", out, [16], "sm_90", 0, False)                    # baseline again
    assert secs > 0 and art.manifest["tuning"] is None


def test_compile_benchmark_is_untuned_unless_asked(mlp_db, tmp_path):
    from bench.compile_models import main as compile_main
    argv = ["--models", "mlp", "--targets", "cuda", "--batch-sizes", "16", "--out", str(tmp_path)]
    assert compile_main(argv) == 0
    assert compile_main(argv + ["--tuning", "auto"]) == 0
    rows = json.loads((tmp_path / "compile.json").read_text())["rows"]
    assert [(r["model"], r["tuning"]) for r in rows] == [("mlp", None), ("mlp", str(mlp_db / "cuda-sm_90" / "mlp.json"))]
    assert "| mlp (tuned) | cuda/sm_90 | 16 |" in (tmp_path / "compile.md").read_text()


# ---------------------------------------------------------------------------------------------------------
# bench.kernel_quality pick: eligibility, the goal table, the database
# ---------------------------------------------------------------------------------------------------------

def _cand(cid, model, b, label, p50, p99, lowering="direct", precision="fp32", cuda_graph=False, err=1e-6,
          moved=None, graph=None, graph_timing="queued"):
    r = {"id": cid, "model": model, "name": model, "batch": b, "label": label, "compile_s": 1.0, "kernels": 3,
         "variant": {"lowering": lowering, "precision": precision, "cuda_graph": cuda_graph, "schedule": {}},
         "tvm": {"p50_ms": p50, "p99_ms": p99, "n": 100},
         "numerics": {"rel_err": err, "pass": err <= (2e-3 if precision == "fp32" else 3e-2)}}
    if moved is not None:
        r["moved_weights"] = moved
    if graph is not None:     # the same run captured in one CUDA graph (p50, p99)
        r["graph"] = {"p50_ms": graph[0], "p99_ms": graph[1], "n": 100}
        if graph_timing is not None:
            r["graph"]["timing"] = graph_timing
    return r


def test_pick_excludes_unproven_cuda_graphs_and_reports_the_goal(tmp_path):
    from bench.kernel_quality import main as kq_main
    torch = [{"model": "resnet18", "batch": 1, "mode": m, "p50_ms": v, "p99_ms": v * 1.01}
             for m, v in (("fp32_eager", 3.0), ("fp32_graph", 2.0), ("tf32_graph", 0.5), ("fp16_graph", 0.4))]
    models = [
        _cand("r_fp32", "resnet18", 1, "fp32", 2.5, 2.52),
        _cand("r_fast_bad", "resnet18", 1, "fp32-x", 1.0, 1.0, err=0.1),                     # wrong numerics
        _cand("r_cg_old", "resnet18", 1, "fp32-cg", 1.5, 1.5, cuda_graph=True,                # round-1 check
              moved={"max_change": 1.0, "follows_weights": True}),
        _cand("r_cg_stale", "resnet18", 1, "fp32-cg2", 1.6, 1.6, cuda_graph=True,
              moved={"moved": "all", "max_change": float("inf"), "follows_weights": False}),
        _cand("r_cg_ok", "resnet18", 1, "fp32-cg3", 1.9, 1.95, cuda_graph=True,
              moved={"moved": "all", "max_change": 0.0, "follows_weights": True}, graph=(1.8, 1.81)),
        _cand("r_fp16", "resnet18", 1, "fp16", 0.39, 0.392, precision="fp16", err=1e-3),
    ]
    run = {"format": "workbench-kq-results", "round": 31, "complete": True, "elapsed_s": 10.0,
           "bundle_manifest": {"arch": "sm_90", "tvm_version": "0.27.0.post1", "build_s": 5.0},
           "meta": {"gpu": "NVIDIA H200", "when": "2026-11-29 12:00:00 UTC"}, "setup": {}, "weights": {},
           "torch": torch, "models": models, "kernels": [], "skipped": [], "errors": []}
    (tmp_path / "kq_round31.json").write_text(json.dumps(run))       # after every KERNELS_CHANGED round
    assert kq_main(["pick", str(tmp_path / "kq_round31.json"), "--db", str(tmp_path / "db"),
                    "--out", str(tmp_path / "out")]) == 0
    doc = json.loads((tmp_path / "out" / "kernel_quality.json").read_text())
    picked = doc["picked"]
    assert set(picked["ineligible"]) == {"r_fast_bad", "r_cg_old", "r_cg_stale"}
    assert "every weight moved" in picked["ineligible"]["r_cg_old"]
    assert {(w["precision"], w["id"]) for w in picked["winners"]} == {("fp32", "r_cg_ok"), ("fp16", "r_fp16")}
    goal = {g["numerics"]: g for g in picked["goal"]}
    assert goal["fp32"]["best_torch"] == "fp32_graph" and goal["fp32"]["ratio"] == pytest.approx(0.95)
    assert goal["fp32"]["fast_enough"] and not goal["fp32"]["predictable"]        # p99/p50 1.95/1.9 > 1.01
    assert goal["reduced"]["tvm_id"] == "r_fp16" and goal["reduced"]["meets_goal"]
    # as the worker runs it (one CUDA graph): 1.8 / 2.0 with p99/p50 1.81/1.8 meets what the VM run (1.95/1.9) did not
    assert goal["fp32"]["graph_ratio"] == pytest.approx(0.9) and goal["fp32"]["graph_meets_goal"]
    assert "graph_meets_goal" not in goal["reduced"]                                # no graph figure: not claimed
    md = (tmp_path / "out" / "kernel_quality.md").read_text()
    assert "Met in **1 of 2**" in md and "Batch sizes measured: b1 only" in md
    assert "met in **1 of 2** cells: resnet18 b1 fp32" in md and "as a graph: **met**" in md
    d = json.loads((tmp_path / "db" / "cuda-sm_90" / "resnet18.json").read_text())
    assert d["precisions"]["fp32"]["batches"]["1"]["variant"]["cuda_graph"] is True


def test_pick_ranks_candidates_as_the_worker_serves_them():
    """Winners are ranked by the CUDA-graph p50 (how the worker runs every exec) where measured, not the VM's; a
    candidate that misses p99/p50 <= 1.01 as served gives way to a predictable one within 3% of it, not to one
    further off."""
    from bench.kernel_quality import fastest
    vm_fast = _cand("vm_fast", "mlp", 1, "a", 1.00, 1.001, graph=(0.95, 0.951))
    graph_fast = _cand("graph_fast", "mlp", 1, "b", 1.10, 1.101, graph=(0.80, 0.801))
    no_graph = _cand("no_graph", "mlp", 1, "c", 0.85, 0.851)              # ranked by its VM p50
    assert fastest([vm_fast, graph_fast, no_graph])["id"] == "graph_fast"
    jittery = _cand("jittery", "mlp", 1, "d", 0.9, 0.9, graph=(0.78, 0.80))   # p99/p50 1.026 as a graph
    assert fastest([vm_fast, graph_fast, jittery])["id"] == "graph_fast"      # 0.80 <= 0.78 * 1.03, predictable
    assert fastest([vm_fast, jittery])["id"] == "jittery"                     # 0.95 is 22% slower: still the fastest


def test_graph_figures_count_only_when_their_replays_were_timed_queued():
    """Rounds before 27 timed each graph replay on an idle GPU, the host's launch of it inside the interval; such a
    figure is neither served nor compared (kernel_quality.graph_figure): the candidate ranks by its VM run."""
    from bench.kernel_quality import fastest, graph_figure, served
    queued = _cand("queued", "mlp", 1, "a", 1.0, 1.001, graph=(0.90, 0.901))
    synced = _cand("synced", "mlp", 1, "b", 1.1, 1.101, graph=(0.80, 0.801), graph_timing=None)
    assert graph_figure(queued)["p50_ms"] == 0.90 and served(queued)["p50_ms"] == 0.90
    assert graph_figure(synced) is None and served(synced) is synced["tvm"]
    assert fastest([queued, synced])["id"] == "queued"          # 0.90 as a graph against 1.1 through the VM
