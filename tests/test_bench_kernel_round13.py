"""Kernel-quality round 13 (split-K on the tuning database's variants) and `pick` over the committed results."""
import json
from pathlib import Path

from bench.build_kernel_candidates import ARCH, ROUNDS, variant_label
from bench.kernel_quality import load_results, pick
from workbench.models import tuning

MODELS = ["resnet50", "mobilenet_v2", "bert_base", "resnet18"]
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "kernel_quality.json"


def test_round13_adds_split_k_to_the_database_variants_with_the_unsplit_ones_beside_them():
    cands, jobs = ROUNDS[13](MODELS)
    assert jobs == [] and len({c.id for c in cands}) == len(cands)
    seen = set()
    for c in cands:
        split = c.variant["schedule"].get("split_k")
        plan = tuning.plan(c.model, "cuda", ARCH, [c.batch], c.variant["precision"]).variants[c.batch].to_json()
        unsplit = {k: v for k, v in plan["schedule"].items() if k != "split_k"}
        want = {**unsplit, "split_k": split} if split else unsplit
        assert {**c.variant, "schedule": want} == c.variant and c.variant["lowering"] == plan["lowering"]
        assert variant_label(c.variant) == c.label and (c.label.endswith(f"-sk{split}") if split else True)
        seen.add((c.model, c.variant["precision"], c.batch, split))
    assert seen == {(m, p, b, s) for m in MODELS for p in ("fp32", "fp16") for b in (1, 2, 4, 8, 16)
                    for s in ((None, 256, 1024) if b in (1, 16) else (256, 1024))}


def test_pick_over_the_committed_results_gives_the_winners_recorded_there():
    """The committed bench/results/kernel_quality.json stands in for the run JSONs it merged (ignored files, gone
    in a fresh checkout): picking over it alone gives its own winners again."""
    doc = json.loads(RESULTS.read_text())
    merged = load_results([str(RESULTS)])
    assert len(merged["rounds"]) == len(doc["rounds"]) and len(merged["models"]) == len(doc["models"])
    again = pick(merged)
    key = lambda w: (w["model"], w["batch"], w["precision"], w["id"])   # noqa: E731
    assert sorted(map(key, again["winners"])) == sorted(map(key, doc["picked"]["winners"]))


def test_round14_tries_the_k_tile_on_the_large_batch_fp32_variants():
    from bench.build_kernel_candidates import MATMUL_CONFIGS
    cands, _ = ROUNDS[14](MODELS)
    assert len({c.id for c in cands}) == len(cands)
    want = {(m, b, s) for m in MODELS for b in (4, 8, 16)
            for s in {tuning.plan(m, "cuda", ARCH, [b], "fp32").variants[b].schedule.split_k, None}}
    assert {(c.model, c.batch, c.variant["schedule"].get("split_k")) for c in cands} == want
    for c in cands:
        plan = tuning.plan(c.model, "cuda", ARCH, [c.batch], "fp32").variants[c.batch].to_json()
        sched = dict(c.variant["schedule"])
        assert sched.pop("matmul") == MATMUL_CONFIGS["k"] and c.batch in (4, 8, 16) and "-mk" in c.label
        assert sched in (plan["schedule"], {k: v for k, v in plan["schedule"].items() if k != "split_k"})
    assert variant_label({"precision": "fp32", "schedule": {"matmul": {"block_size_x": 3}}}) == "fp32-mx"
