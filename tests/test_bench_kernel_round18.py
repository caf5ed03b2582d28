"""Kernel-quality rounds 18-25: the non-matmul settings on the fp32 variants, BERT's einsum attention, the
bisection of round 19's failed BERT b1 fp32 candidate, per-kernel tiles on BERT's 768-column matmuls; `pick`'s
exclusion of figures measured on an older graph."""
import pytest

from bench.build_kernel_candidates import ARCH, ROUNDS, variant_label
from bench.kernel_quality import KERNELS_CHANGED, eligible
from workbench.models import tuning

MODELS = ["resnet50", "mobilenet_v2", "bert_base", "resnet18"]
ROW_SETTINGS = {"injective": 8, "rows": 8, "row_reduction": 256}


def _db(model: str, b: int, precision: str) -> dict:
    return tuning.plan(model, "cuda", ARCH, [b], precision).variants[b].to_json()


def test_round18_adds_the_row_settings_to_every_fp32_variant_and_keeps_berts_beside_them():
    cands, jobs = ROUNDS[18](MODELS)
    assert jobs == [] and len({c.id for c in cands}) == len(cands) == 4 * 5 + 5
    for c in cands:
        assert c.variant["precision"] == "fp32" and variant_label(c.variant) == c.label
        base = {k: v for k, v in _db(c.model, c.batch, "fp32")["schedule"].items() if k not in ROW_SETTINGS}
        assert c.variant["schedule"] in ({**base, **ROW_SETTINGS}, base)
        assert c.variant["schedule"] == {**base, **ROW_SETTINGS} or c.model == "bert_base"


def test_round19_measures_every_bert_variant_again_on_the_einsum_graph():
    cands, _ = ROUNDS[19](MODELS)
    assert {c.model for c in cands} == {"bert_base"} and len({c.id for c in cands}) == len(cands) == 2 + 5 * 3
    for b in (1, 2, 4, 8, 16):
        mine = [c.variant for c in cands if c.batch == b]
        db = _db("bert_base", b, "fp32")
        assert {**db, "schedule": {**db["schedule"], **ROW_SETTINGS}} in mine
        fp16 = {k: v for k, v in _db("bert_base", b, "fp16")["schedule"].items() if k != "split_k"}
        assert {v["schedule"].get("split_k") for v in mine if v["precision"] == "fp16"} == {None, 256}
        assert all({k: x for k, x in v["schedule"].items() if k != "split_k"} == fp16 for v in mine
                   if v["precision"] == "fp16")
        assert (b in (1, 16)) == any(v["schedule"] == {} for v in mine)        # TVM's default: the baseline


def test_round20_drops_each_setting_of_the_failed_candidate_in_turn():
    cands, _ = ROUNDS[20](MODELS)
    full = {"injective": 8, "rows": 8, "row_reduction": 256, "split_k": 256, "simt": True}
    got = [c.variant["schedule"] for c in cands]
    assert all(c.batch == 1 and c.model == "bert_base" and c.variant["precision"] == "fp32" for c in cands)
    assert got[0] == full and got[-1] == {"simt": True}
    assert sorted(map(sorted, got[1:-1])) == sorted(sorted(set(full) - {k}) for k in full)


def test_figures_measured_before_a_models_kernels_changed_cannot_win():
    changes = KERNELS_CHANGED[("bert_base", None)]
    (first, first_why), (latest, why) = changes[0], changes[-1]
    fp32_since, fp32_why = KERNELS_CHANGED[("bert_base", "fp32")][0]
    row = {"model": "bert_base", "tvm": {"p50_ms": 1.0, "p99_ms": 1.0}, "numerics": {"pass": True},
           "variant": {"cuda_graph": False, "precision": "fp16"}}
    for rnd, ok in ((None, False), (first - 1, False), (latest - 1, False), (latest, True)):
        got = eligible({**row, "round": rnd})
        assert got[0] is ok and (ok or str(latest) in got[1] and why in got[1])
    # as a round that measures them again selects: before its own change, only the earlier ones count
    assert eligible({**row, "round": latest - 1}, before=latest)[0]
    assert first_why in eligible({**row, "round": first - 1}, before=latest)[1]
    fp32 = {**row, "variant": {"cuda_graph": False, "precision": "fp32"}}
    assert not eligible({**fp32, "round": fp32_since - 1}, before=latest)[0]
    assert fp32_why in eligible({**fp32, "round": fp32_since - 1}, before=latest)[1]
    assert eligible({**fp32, "round": fp32_since}, before=latest)[0]
    assert eligible({**row, "model": "mobilenet_v2", "round": None})[0]


def test_round26_measures_berts_fp32_variants_again():
    cands, _ = ROUNDS[26](MODELS)
    assert {c.batch for c in cands} == {1, 2, 4, 8, 16} and all(c.variant["precision"] == "fp32" for c in cands)
    assert len(cands) == 8 and [c.batch for c in cands].count(16) == 3
    assert [c.batch for c in cands if c.variant["schedule"] == {}] == [1, 16]          # the default: the baseline
    for b in (1, 2, 4, 8, 16):
        db = _db("bert_base", b, "fp32")
        bare = {**db, "schedule": {k: v for k, v in db["schedule"].items() if k != "kernels"}}
        assert bare in [c.variant for c in cands if c.batch == b]
        assert (db in [c.variant for c in cands if c.batch == b]) == (b == 16 or db == bare)


def test_round21_measures_round19s_candidates_again():
    assert [c.id for c in ROUNDS[21](MODELS)[0]] == [c.id for c in ROUNDS[19](MODELS)[0]]


def test_round22_tries_one_warp_layer_norms_and_other_split_k_targets_for_bert():
    cands, _ = ROUNDS[22](MODELS)
    assert len({c.id for c in cands}) == len(cands)
    warp = [c for c in cands if c.variant["schedule"]["row_reduction"] == 32]
    assert sorted((c.batch, c.variant["precision"]) for c in warp) == sorted(
        (b, p) for b in (1, 2, 4, 8, 16) for p in ("fp32", "fp16"))
    for c in warp:
        db = _db("bert_base", c.batch, c.variant["precision"])["schedule"]
        assert c.variant["schedule"] == {**db, **(ROW_SETTINGS if c.variant["precision"] == "fp32" else {}),
                                         "row_reduction": 32} and "-rr32" in c.label
    cands = [c for c in cands if c not in warp]
    got = {(c.batch, c.variant["precision"], c.variant["schedule"].get("split_k")) for c in cands}
    assert got == {(16, "fp32", None), (16, "fp32", 512), (16, "fp32", 1024)} | {
        (b, "fp16", s) for b in (4, 8, 16) for s in (512, 1024)}
    for c in cands:
        rest = {k: v for k, v in c.variant["schedule"].items() if k != "split_k"}
        base = {k: v for k, v in _db("bert_base", c.batch, c.variant["precision"])["schedule"].items()
                if k != "split_k"}
        assert rest == ({**base, **ROW_SETTINGS} if c.variant["precision"] == "fp32" else base)


@pytest.mark.slow
def test_gemm_choices_pick_tiles_for_the_kernels_a_rule_folds():
    """bench.build_kernel_candidates._gemm_choices on BERT b16's real fused kernels: the mma choices land on the
    four fp16 matmuls with 768 output columns (projections, FFN output, pooler) and nowhere else; a SIMT choice on
    fp32 attention's QK^T alone (192 entries of 128 x 128 x 64, K read as [t, d])."""
    from bench.build_kernel_candidates import _gemm_choices
    from workbench.models import schedules, tensorcore, zoo
    from workbench.models.compiler import make_target
    seen = []
    v16 = {"lowering": "direct", "precision": "fp16", "cuda_graph": False,
           "schedule": {"activations": "fp16"}, "weights": "fp16"}

    def pick(q, m, n, k):
        seen.append((q, m, n, k))
        return "t64x96" if n == 768 else None

    got = _gemm_choices("bert_base", 16, v16, "mma", pick)
    assert sorted(seen, key=str) == sorted([(None, 2048, 768, 768)] * 2 + [
        (None, 2048, 768, 3072), (None, 2048, 3072, 768), (None, 16, 768, 768), (192, 128, 128, 64),
        (192, 128, 64, 128)], key=str)
    assert len(got) == 4 and all(c == {"rule": "mma", "config": "t64x96"} for c in got.values())
    tgt = make_target("cuda", "sm_90")
    keys = {k.key: k for k in schedules.kernels(schedules.fuse(zoo.get("bert_base", seed=0).make_module(16), tgt,
                                                               "fp16", "fp16", "fp16"), tgt)}
    assert all(tensorcore.gemm_shape(keys[k].func)[1] == 768 for k in got)
    v32 = {"lowering": "direct", "precision": "fp32", "cuda_graph": False, "schedule": {}}
    got = _gemm_choices("bert_base", 16, v32, "simt",
                        lambda q, m, n, k: "s64t4" if (q, n, k) == (192, 128, 64) else None)
    assert list(got.values()) == [{"rule": "simt", "config": "s64t4"}]


def test_rounds_23_and_24_put_wider_tiles_on_berts_768_column_matmuls(monkeypatch):
    import bench.build_kernel_candidates as bkc
    calls = []

    def choices(model, b, variant, rule, pick):
        calls.append((b, variant["precision"], rule))
        return {f"{rule}{b}": {"rule": rule, "config": pick(None, 16 * 128, 768, 768) or "-"},
                f"k{b}": {"rule": rule, "config": pick(None, b * 128, 768, 768 // 4) or "-"}}

    monkeypatch.setattr(bkc, "_gemm_choices", choices)
    c23, _ = ROUNDS[23](MODELS)
    assert [(c.batch, c.label.rsplit("-", 1)[1]) for c in c23] == [
        (b, t) for b in (4, 8, 16) for t in ("t128x96", "t64x96", "t64x48")]
    assert all(c.variant["precision"] == "fp16" and "-k-" in c.label for c in c23)
    c24, _ = ROUNDS[24](MODELS)
    assert [(c.batch, c.variant["precision"]) for c in c24] == ([(16, "fp16")] * 2 + [(4, "fp16")] * 2
                                                                 + [(16, "fp32")] * 2)
    assert "split_k" not in c24[2].variant["schedule"] and c24[3].variant["schedule"]["split_k"]
    assert [r for _, _, r in calls[-6:]] == ["mma"] * 4 + ["simt"] * 2
    assert {c.variant["schedule"]["kernels"]["k4"]["config"] for c in c24[2:4]} == {"t64x96"}   # K = 768 / S
    assert c24[3].variant["schedule"]["kernels"]["mma4"]["config"] == "-"                        # unsplit: left


def test_round25_puts_berts_fp32_768_column_matmuls_on_the_96_column_simt_tiles(monkeypatch):
    import bench.build_kernel_candidates as bkc
    monkeypatch.setattr(bkc, "_gemm_choices", lambda model, b, v, rule, pick: {
        "k": {"rule": rule, "config": pick(None, 2048, 768, 3072)},
        "other": {"rule": rule, "config": pick(192, 128, 128, 64)}})
    cands, _ = ROUNDS[25](MODELS)
    assert [(c.batch, "split_k" in c.variant["schedule"], c.label.rsplit("-", 1)[1]) for c in cands] == [
        (16, True, "s128x96"), (16, True, "s64x96"), (16, False, "s128x96"), (16, False, "s64x96")]
    assert all(c.variant["schedule"]["kernels"]["k"]["config"] == c.label.rsplit("-", 1)[1]
               and c.variant["schedule"]["kernels"]["other"]["config"] is None for c in cands)


def test_round28_tries_split_targets_and_tiles_for_resnet18_b8_and_berts_ffn(monkeypatch):
    import bench.build_kernel_candidates as bkc
    from workbench.models import tensorcore
    monkeypatch.setattr(bkc, "_gemm_choices", lambda model, b, v, rule, pick: {
        "ffn1": {"rule": rule, "config": pick(None, b * 128, 3072, 768)},
        "part": {"rule": rule, "config": pick(4, 392, 512, 1152)}})
    cands, jobs = ROUNDS[28](MODELS)
    assert jobs == [] and len({c.id for c in cands}) == len(cands)
    r18 = [c for c in cands if c.model == "resnet18"]
    assert [c.variant["schedule"]["split_k"] for c in r18] == [128, 512, 256, 256, 256]
    assert {c.batch for c in r18} == {8}
    tiles = tensorcore.configs_for(4 * 392, 512, 1152)
    assert [c.variant["schedule"]["kernels"]["part"]["config"] for c in r18[2:]] == (tiles + [None] * 3)[:3]
    bert = [c for c in cands if c.model == "bert_base"]
    for c in bert:
        got = c.variant["schedule"]["kernels"]
        assert got["ffn1"]["config"] == c.label.rsplit("-", 1)[1] and got["part"]["config"] is None
        assert {k: v for k, v in got.items() if k not in ("ffn1", "part")} == \
            _db("bert_base", c.batch, c.variant["precision"])["schedule"].get("kernels", {})   # the db's choices kept
    assert sorted({(c.batch, c.variant["precision"]) for c in bert}) == [(4, "fp16"), (16, "fp16"), (16, "fp32")]
    assert [c.label.rsplit("-", 1)[1] for c in bert if c.variant["precision"] == "fp32"] == [
        "s64x96", "s128x96", "s128x64"]


def test_round31_moves_one_class_of_berts_b16_matmuls_at_a_time(monkeypatch):
    import bench.build_kernel_candidates as bkc
    shapes = [(4, 2048, 768, 192), (4, 2048, 768, 768), (192, 128, 64, 128), (None, 2048, 3072, 768),
              (None, 2048, 768, 768)]
    monkeypatch.setattr(bkc, "_gemm_choices", lambda model, b, v, rule, pick: {
        str(w): {"rule": rule, "config": c} for w in shapes if (c := pick(*w)) is not None})
    cands, jobs = ROUNDS[31](MODELS)
    assert jobs == [] and all(c.batch == 16 and c.model == "bert_base" for c in cands)
    got = [(c.variant["precision"], c.label.split("-")[-2:], c.variant["schedule"]["kernels"]) for c in cands]
    assert len(got) == 9 and len({c.id for c in cands}) == 9
    for precision, (name, tile), kernels in got:
        mine = {k: v for k, v in kernels.items() if k.startswith("(")}
        assert len(mine) == 1 and next(iter(mine.values())) == {"rule": "simt" if precision == "fp32" else "mma",
                                                                 "config": tile}, (name, tile, kernels)
    assert ROUNDS[31](["resnet18"]) == ([], [])


def test_round32_varies_resnet18_b1_fp16s_split_and_reductions():
    cands, jobs = ROUNDS[32](MODELS)
    db = _db("resnet18", 1, "fp16")["schedule"]
    rows = {"reduce_inputs": "fp16", "row_reduction": 256, "rows": 8}
    assert jobs == [] and [c.variant["schedule"] for c in cands] == [
        {**db, "split_k": 128}, {**db, "split_k": 512}, {**db, **rows}, {**db, **rows, "split_k": 512}]
    assert all((c.model, c.batch, c.variant["precision"]) == ("resnet18", 1, "fp16") for c in cands)
    assert ROUNDS[32](["bert_base"]) == ([], [])


def test_round33_varies_berts_b16_split_and_its_qk_tile(monkeypatch):
    import bench.build_kernel_candidates as bkc
    shapes = [(192, 128, 128, 64), (192, 128, 64, 128), (4, 2048, 768, 192)]
    monkeypatch.setattr(bkc, "_gemm_choices", lambda model, b, v, rule, pick: {
        str(w): {"rule": rule, "config": c} for w in shapes if (c := pick(*w)) is not None})
    cands, jobs = ROUNDS[33](MODELS)
    assert jobs == [] and len({c.id for c in cands}) == len(cands) == 6
    assert all((c.model, c.batch) == ("bert_base", 16) for c in cands)
    splits = {(c.variant["precision"], c.variant["schedule"]["split_k"]) for c in cands[:4]}
    assert splits == {("fp32", 1024), ("fp32", 4096), ("fp16", 1024), ("fp16", 2048)}
    for c in cands[:4]:      # only the split target differs from the database's variant
        db = _db("bert_base", 16, c.variant["precision"])
        assert {**c.variant["schedule"], "split_k": db["schedule"]["split_k"]} == db["schedule"]
    for c, tile in zip(cands[4:], ("s64t4", "s128x64")):
        mine = {k: v for k, v in c.variant["schedule"]["kernels"].items() if k.startswith("(")}
        assert mine == {str(shapes[0]): {"rule": "simt", "config": tile}} and c.label.endswith(f"-qk-{tile}")
    assert ROUNDS[33](["resnet18"]) == ([], [])


def _row(cid: str, b: int, precision: str, p50: float, graph: float | None, rnd: int = 31, **variant) -> dict:
    return {"id": cid, "model": "resnet18", "batch": b, "label": cid, "round": rnd,
            "variant": {"lowering": "matmul", "precision": precision, "cuda_graph": False, "schedule": {}, **variant},
            "tvm": {"p50_ms": p50, "p99_ms": p50}, "numerics": {"pass": True},
            **({"graph": {"p50_ms": graph, "p99_ms": graph}} if graph else {})}


def test_round27_takes_each_cells_leaders_as_the_earlier_rounds_served_them():
    from bench.build_kernel_candidates import REMEASURE_PER_CELL, round27
    rows = [_row("fast", 1, "fp32", 2.0, 1.0), _row("near", 1, "fp32", 1.2, 1.14),       # 14% behind: taken
            _row("far", 1, "fp32", 1.1, 1.2),                                             # 20% behind as a graph
            _row("vm_only", 1, "fp32", 1.05, None),                                       # ranked by its VM run
            _row("cg", 1, "fp32", 0.5, None, cuda_graph=True),                            # never captured outside
            _row("fp16", 1, "fp16", 0.5, 0.4), _row("b2", 2, "fp32", 3.0, 2.0),
            {**_row("broken", 1, "fp32", 0.1, 0.1), "numerics": {"pass": False}}]
    rows += [_row(f"many{i}", 4, "fp32", 1.0 + i / 100, None) for i in range(REMEASURE_PER_CELL + 2)]
    cands, jobs = round27({"models": rows}, ["resnet18"])
    got: dict = {}
    for c in cands:
        got.setdefault((c.batch, c.variant["precision"]), []).append(c.label)
    assert jobs == [] and got[(1, "fp32")] == ["fast", "vm_only", "near"] and got[(1, "fp16")] == ["fp16"]
    assert got[(2, "fp32")] == ["b2"] and got[(4, "fp32")] == [f"many{i}" for i in range(REMEASURE_PER_CELL)]
    assert round27({"models": rows}, ["bert_base"]) == ([], [])


def test_round29_builds_berts_leaders_again_as_they_stood_before_its_change():
    from bench.build_kernel_candidates import round29
    rows = [{**_row(cid, 4, "fp16", p50, graph, rnd), "model": "bert_base"} for cid, p50, graph, rnd in (
        ("a", 2.0, 1.00, 28), ("b", 2.0, 1.02, 27), ("c", 2.0, 1.05, 20), ("d", 2.0, 1.06, 28),
        ("stale", 0.5, 0.5, 18))]                                     # before round 19's einsums: not a leader
    for r in rows:
        r["graph"]["timing"] = "queued"
    cands, jobs = round29({"models": rows}, MODELS)
    assert jobs == [] and [(c.batch, c.label) for c in cands] == [(1, "fp32"), (16, "fp32"), (4, "a"), (4, "b"),
                                                                   (4, "c")]
    assert cands[0].variant["schedule"] == {} and round29({"models": rows}, ["resnet18"]) == ([], [])


def test_round30_builds_the_resnets_leaders_again():
    from bench.build_kernel_candidates import round30
    rows = [_row("r18", 8, "fp16", 1.0, 0.5, 29), {**_row("r50", 2, "fp32", 1.0, 0.9, 27), "model": "resnet50"},
            {**_row("bert", 4, "fp16", 1.0, 0.9, 29), "model": "bert_base"}]
    for r in rows:
        r["graph"]["timing"] = "queued"
    cands, jobs = round30({"models": rows}, MODELS)
    assert jobs == [] and [(c.model, c.batch, c.label) for c in cands] == [
        ("resnet18", 1, "fp32"), ("resnet18", 16, "fp32"), ("resnet50", 1, "fp32"), ("resnet50", 16, "fp32"),
        ("resnet18", 8, "r18"), ("resnet50", 2, "r50")]
    assert round30({"models": rows}, ["bert_base"]) == ([], [])


def test_reuse_builds_copies_the_binary_of_the_round_that_measured_it(tmp_path):
    import json

    from bench.build_kernel_candidates import ModelCandidate, reuse_builds
    variant = {"lowering": "matmul", "precision": "fp32", "cuda_graph": False, "schedule": {}}
    for rnd, body in ((25, b"old"), (26, b"measured")):
        d = tmp_path / "gpu" / f"kq{rnd}"
        (d / "models").mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"format": "workbench-kq-candidates", "round": rnd}))
        (d / "models" / "resnet18-matmul_b1_x.so").write_bytes(body)
        (d / "models" / "resnet18-matmul_b1_x.json").write_text(json.dumps({"variant": variant}))
    c = ModelCandidate("resnet18", 1, "x", variant)
    other = ModelCandidate("resnet18", 1, "y", variant)                   # built nowhere: left to build_model
    out = tmp_path / "kq27"
    results = {"models": [{"id": c.id, "round": 26}, {"id": other.id, "round": 26}]}
    assert reuse_builds([c, other], results, out, tmp_path / "gpu") == 1
    assert (out / "models" / f"{c.id}.so").read_bytes() == b"measured"
    assert not (out / "models" / f"{other.id}.json").exists()
    changed = ModelCandidate("resnet18", 1, "x", {**variant, "schedule": {"simt": True}})
    assert reuse_builds([changed], results, tmp_path / "kq27b", tmp_path / "gpu") == 0   # another variant
