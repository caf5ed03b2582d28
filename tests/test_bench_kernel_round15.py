"""Kernel-quality rounds 15-17: the SIMT matmul schedule (schedule.simt) on the tuning database's fp32 variants."""
from bench.build_kernel_candidates import ARCH, ROUNDS, variant_label
from workbench.models import tuning

MODELS = ["resnet50", "mobilenet_v2", "bert_base", "resnet18"]


def test_round15_puts_each_fp32_variant_beside_its_simt_forms():
    cands, jobs = ROUNDS[15](MODELS)
    assert jobs == [] and len({c.id for c in cands}) == len(cands) == 4 * 5 * 3
    for model in MODELS:
        for b in (1, 2, 4, 8, 16):
            plan = tuning.plan(model, "cuda", ARCH, [b], "fp32").variants[b].to_json()
            base = {k: v for k, v in plan["schedule"].items() if k != "simt"}
            mine = [c.variant for c in cands if c.model == model and c.batch == b]
            assert all(v["precision"] == "fp32" and v["lowering"] == plan["lowering"] for v in mine)
            assert {**plan, "schedule": base} in mine                                 # as it is, beside the others
            assert {**plan, "schedule": {**base, "simt": True}} in mine
            toggled = dict(base, simt=True)
            if "split_k" in base:
                del toggled["split_k"]
            else:
                toggled["split_k"] = 256
            assert {**plan, "schedule": toggled} in mine
    assert all(variant_label(c.variant) == c.label and ("simt" in c.label.split("-")) == bool(c.variant["schedule"].get(
        "simt")) for c in cands)


def test_round16_measures_round15s_simt_candidates_again():
    again, _ = ROUNDS[16](MODELS)
    assert [c.id for c in again] == [c.id for c in ROUNDS[15](MODELS)[0] if c.variant["schedule"].get("simt")]
    assert len(again) == 4 * 5 * 2


def test_round17_tries_larger_split_k_targets_on_berts_simt_variants():
    cands, _ = ROUNDS[17](MODELS)
    assert {(c.model, c.batch) for c in cands} == {("bert_base", b) for b in (4, 8, 16)}
    for c in cands:
        plan = tuning.plan(c.model, "cuda", ARCH, [c.batch], "fp32").variants[c.batch].to_json()
        rest = {k: v for k, v in plan["schedule"].items() if k != "split_k"}
        assert c.variant["schedule"] == {**rest, "split_k": c.variant["schedule"]["split_k"]} and rest["simt"]
    assert sorted(c.variant["schedule"]["split_k"] for c in cands) == sorted([256, 512, 1024, 2048] * 3)
