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
        assert variant_label(c.variant) == c.label and (f"-sk{split}" in c.label if split else "-sk" not in c.label)
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
        base = {k: v for k, v in plan["schedule"].items() if k != "matmul"}    # (the database after it has k)
        assert sched in (base, {k: v for k, v in base.items() if k != "split_k"})
    assert variant_label({"precision": "fp32", "schedule": {"matmul": {"block_size_x": 3}}}) == "fp32-mx"


def _run(tmp_path, rnd: int, tvm_ms: float, torch_ms: float, cand: bool = True) -> str:
    """A `bench.kernel_quality run` result with one fp32 candidate of mlp b1 and torch's fp32 graph figure."""
    def stats(ms):
        return {"n": 100, "p50_ms": ms, "p99_ms": ms * 1.005, "min_ms": ms, "mean_ms": ms}
    models = [{"id": f"mlp_b1_fp32-r{rnd}", "model": "mlp", "batch": 1, "label": f"fp32-r{rnd}",
               "variant": {"lowering": "direct", "precision": "fp32", "cuda_graph": False, "schedule": {}},
               "tvm": stats(tvm_ms), "graph": stats(tvm_ms * 0.9), "numerics": {"pass": True, "rel_err": 1e-7}}]
    d = {"format": "workbench-kq-results", "round": rnd, "complete": True, "elapsed_s": 1.0, "meta": {},
         "setup": {}, "models": models if cand else [],
         "torch": [{"model": "mlp", "batch": 1, "mode": "fp32_graph", **stats(torch_ms)}], "kernels": []}
    p = tmp_path / f"kq_round{rnd}.json"
    p.write_text(json.dumps(d))
    return str(p)


def test_a_winner_is_compared_with_the_torch_of_its_own_run(tmp_path):
    """Round 1's candidate (1.0 ms) wins; round 2 measured only torch, slower that lease: the ratio uses round 1's
    torch (1.0 / 1.1), not the latest (1.0 / 1.3). A pick over that pick's own output gives the same again."""
    first, second = _run(tmp_path, 1, 1.0, 1.1), _run(tmp_path, 2, 5.0, 1.3, cand=False)
    w = pick(load_results([first, second]))["winners"][0]
    assert w["id"] == "mlp_b1_fp32-r1" and w["torch_same_run"] and w["round"] == 1
    assert abs(w["ratio_vs_torch"]["fp32_graph"] - 1.0 / 1.1) < 1e-9
    # without torch in the winner's run: the latest figures
    third = _run(tmp_path, 3, 0.5, 2.0)
    w3 = pick(load_results([first, second, third]))["winners"][0]
    assert w3["round"] == 3 and abs(w3["ratio_vs_torch"]["fp32_graph"] - 0.5 / 2.0) < 1e-9
    (tmp_path / "torchless.json").write_text(json.dumps({**json.loads(Path(third).read_text()), "torch": []}))
    w4 = pick(load_results([first, second, str(tmp_path / "torchless.json")]))["winners"][0]
    assert not w4["torch_same_run"] and abs(w4["ratio_vs_torch"]["fp32_graph"] - 0.5 / 1.3) < 1e-9
    # the pick's output as the base of the next pick keeps each round's torch
    from bench.kernel_quality import main
    out = tmp_path / "picked"
    assert main(["pick", first, second, "--out", str(out), "--no-db"]) == 0
    again = pick(load_results([str(out / "kernel_quality.json")]))["winners"][0]
    assert again["round"] == 1 and abs(again["ratio_vs_torch"]["fp32_graph"] - 1.0 / 1.1) < 1e-9
