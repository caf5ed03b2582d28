"""Kernel-quality rounds 34 and 35: implicit GEMM (schedule.implicit_gemm) on the reduced ResNets' database
variants."""
from bench.build_kernel_candidates import ROUNDS, _db_variant, _target, variant_label
from workbench.models import schedules, tensorcore, tuning, zoo

CELLS = [("resnet18", 16), ("resnet18", 8), ("resnet50", 16)]


def _db(model: str, b: int) -> dict:
    """The database's variant as round 34 found it (the round's own settings, which its picks brought, removed)."""
    return _db_variant(model, b, "fp16", without=("implicit_gemm", "kernels"))


def test_round34_adds_implicit_gemm_to_the_database_variants_with_and_without_split_k():
    cands, jobs = ROUNDS[34](["resnet18", "resnet50", "bert_base"])
    assert jobs == [] and len({c.id for c in cands}) == len(cands) == 3 * 3 + 3
    assert ROUNDS[34](["bert_base"]) == ([], [])
    for model, b in CELLS:
        mine = [c for c in cands if (c.model, c.batch) == (model, b)]
        db = _db(model, b)
        ig = {**db, "schedule": {**db["schedule"], "implicit_gemm": True}}
        no_sk = {**ig, "schedule": {k: v for k, v in ig["schedule"].items() if k != "split_k"}}
        assert "split_k" in db["schedule"] and not db["schedule"].get("implicit_gemm")
        assert [c.variant for c in mine[:3]] == [db, ig, no_sk]
        assert all(c.lowering == "matmul" and c.label.startswith(variant_label(c.variant)) for c in mine)
        assert [c.label.endswith("-ig") for c in mine[:3]] == [False, True, True]
        assert len(mine) == (6 if (model, b) == ("resnet18", 16) else 3)


def test_round34_tiles_only_the_implicit_conv_kernels():
    cands, _ = ROUNDS[34](["resnet18"])
    tiled = [c for c in cands if c.label.rsplit("-", 1)[-1] in ("c0", "c1", "c2")]
    assert [c.label[-3:] for c in tiled] == ["-c0", "-c1", "-c2"] and all(c.batch == 16 for c in tiled)
    (ig,) = [c.variant for c in cands if c.batch == 16 and c.label.endswith("-sk256-ig")]
    v = tuning.Variant.from_json(ig)
    fused = schedules.fuse(zoo.get("resnet18", conv="matmul").make_module(16), _target(), "fp16", "fp16", "fp16",
                           "fp16", v.schedule.split_k, True)
    convs = {k.key: k for k in schedules.kernels(fused, _target()) if k.name.startswith("fused_implicit_conv")}
    assert len(convs) >= 6                                  # layers 1-3 (layer4's convs split-K keeps explicit)
    for i, c in enumerate(tiled):
        assert {**c.variant, "schedule": {**c.variant["schedule"], "kernels": None}} == \
            {**ig, "schedule": {**ig["schedule"], "kernels": None}}
        got = c.variant["schedule"]["kernels"]
        assert set(got) <= set(convs) and got
        for key, choice in got.items():
            _, m, n, k, _ = tensorcore.batched_gemm_shape(convs[key].func)
            assert choice == {"rule": "mma", "config": tensorcore.configs_for(m, n, k)[i]}


def test_round35_takes_implicit_gemm_to_the_other_batch_sizes_and_round34s_tiles_to_two_more_cells():
    cands, jobs = ROUNDS[35](["resnet18", "resnet50"])
    assert jobs == [] and len({c.id for c in cands}) == len(cands) == 7 * 3 + 2 * 4
    plain = [(1, 2, 4), (1, 2, 4, 8)]
    for model, sizes in zip(("resnet18", "resnet50"), plain):
        for b in sizes:
            db = _db(model, b)
            ig = {**db, "schedule": {**db["schedule"], "implicit_gemm": True}}
            no_sk = {**ig, "schedule": {k: v for k, v in ig["schedule"].items() if k != "split_k"}}
            assert [c.variant for c in cands if (c.model, c.batch) == (model, b)] == [db, ig, no_sk]
    for model, b in (("resnet18", 8), ("resnet50", 16)):
        mine = [c for c in cands if (c.model, c.batch) == (model, b)]
        db = _db(model, b)
        assert mine[0].variant == {**db, "schedule": {**db["schedule"], "implicit_gemm": True}}
        assert [c.label[-3:] for c in mine[1:]] == ["-c0", "-c1", "-c2"]
        assert all(c.variant["schedule"]["kernels"] for c in mine[1:])    # the implicit convs' tiles
    assert ROUNDS[35](["resnet50"])[0] == [c for c in cands if c.model == "resnet50"]
