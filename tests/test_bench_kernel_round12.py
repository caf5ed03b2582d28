"""Kernel-quality round 12: the tuning database's variants at the compiled batch sizes no round measured."""
from bench.build_kernel_candidates import ARCH, ROUNDS, variant_label
from workbench.models import tuning
from workbench.models.compiler import DEFAULT_BATCH_SIZES

MODELS = ["resnet50", "mobilenet_v2", "bert_base", "resnet18"]


def test_round12_builds_what_workbench_compile_would_at_b2_b4_b8():
    cands, jobs = ROUNDS[12](MODELS)
    assert jobs == []
    got = {(c.model, c.variant["precision"], c.batch): c for c in cands}
    assert set(got) == {(m, p, b) for m in MODELS for p in ("fp32", "fp16") for b in (2, 4, 8)}
    for (model, precision, b), c in got.items():
        plan = tuning.plan(model, "cuda", ARCH, [b], precision)
        assert c.variant == plan.variants[b].to_json()
        # measured by earlier rounds at the others: together every batch size the compiler builds by default
        measured = {int(x) for x in tuning.load_model_file(plan.file)["precisions"][precision]["batches"]}
        assert measured | {2, 4, 8} >= set(DEFAULT_BATCH_SIZES)
    assert len({c.id for c in cands}) == len(cands)


def test_a_model_without_database_entries_gets_no_candidates():
    assert ROUNDS[12](["mlp"]) == ([], [])


def test_variant_labels_follow_the_hand_written_rounds():
    for c in ROUNDS[11](MODELS)[0]:
        assert variant_label(c.variant) == c.label, c.id
    assert variant_label({"precision": "fp32", "schedule": {"small_reduction": 256}, "cuda_graph": True}) == \
        "fp32-sr256-g"
    assert variant_label({"precision": "fp16", "schedule": {"mma": False}}) == "fp16"
