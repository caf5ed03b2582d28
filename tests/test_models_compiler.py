"""The ahead-of-time compiler and the `workbench compile` / `workbench inspect` CLI, with real TVM compiles of
the zoo's mlp (CPU and CUDA; CUDA needs no GPU) and of a small ONNX file."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from workbench.cli import main as cli_main
from workbench.models import zoo
from workbench.models.artifact import FORMAT, FORMAT_VERSION, Artifact, ArtifactError, sha256_file
from workbench.models.compiler import CompileError, compile_model

BATCHES = (1, 2, 4, 8, 16)


@pytest.fixture(scope="module")
def mlp():
    return zoo.get("mlp")


@pytest.fixture(scope="module")
def cpu_art(mlp, tmp_path_factory) -> Artifact:
    return compile_model(mlp, tmp_path_factory.mktemp("c") / "mlp", batch_sizes=BATCHES, page_size=64 * 1024)


def test_manifest_describes_every_batch_size(cpu_art):
    import tvm
    m = cpu_art.manifest
    assert (m["format"], m["format_version"]) == (FORMAT, FORMAT_VERSION)
    assert m["name"] == "mlp" and m["source"] == {"origin": "zoo:mlp", "kind": "zoo", "model": "mlp"}
    assert m["tvm_version"] == tvm.__version__ and m["target"] == "cpu" and m["arch"] is None
    assert m["batch_sizes"] == list(BATCHES) and m["function"] == "main"
    assert m["inputs"] == [{"name": "input", "shape": [128], "dtype": "float32"}]
    assert m["outputs"] == [{"name": "output", "shape": [10], "dtype": "float32"}]
    prev_ws = 0
    for b in BATCHES:
        e = m["batches"][str(b)]
        assert e["inputs"] == [{"name": "input", "shape": [b, 128], "dtype": "float32"}]
        assert e["outputs"] == [{"name": "output", "shape": [b, 10], "dtype": "float32"}]
        assert cpu_art.io_bytes(b) == b * (128 + 10) * 4
        # the hidden activations [b, 256] fp32 are planned storage: the estimate must cover one of them
        assert cpu_art.workspace_bytes(b) >= b * 256 * 4 and cpu_art.workspace_bytes(b) >= prev_ws
        assert cpu_art.workspace_alloc_bytes(b) >= cpu_art.workspace_bytes(b)
        prev_ws = cpu_art.workspace_bytes(b)
        so = cpu_art.path / f"b{b}.so"
        assert e["file"] == so.name and e["sha256"] == sha256_file(so) and e["bytes"] == so.stat().st_size
        assert e["compile_seconds"] > 0
    w = m["weights"]
    assert w["sha256"] == sha256_file(cpu_art.path / "weights.bin")
    assert w["total_bytes"] == sum(a.nbytes for _, a in zoo.get("mlp").weights())
    assert w["generator"] is None
    assert m["architecture"]["params"] == w["total_bytes"] // 4


def test_existing_out_dir_needs_overwrite(mlp, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep").write_text("mine")
    with pytest.raises(ArtifactError, match="already exists: pass overwrite=True"):
        compile_model(mlp, out, batch_sizes=(1,))
    assert (out / "keep").read_text() == "mine"
    art = compile_model(mlp, out, batch_sizes=(1,), overwrite=True)
    assert art.batch_sizes == (1,) and not (out / "keep").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]              # no temp or .old dirs left


def test_failed_compile_leaves_nothing(mlp, tmp_path):
    def make_module(b):
        if b == 4:
            raise RuntimeError("boom at batch 4")
        return mlp.make_module(b)
    broken = dataclasses.replace(mlp, make_module=make_module)
    out = tmp_path / "m"
    with pytest.raises(CompileError, match=r"compiling mlp batch 4 \(cpu\) failed: RuntimeError: boom at batch 4"):
        compile_model(broken, out, batch_sizes=(1, 4))
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_artifact(mlp, cpu_art, tmp_path):
    import shutil
    out = tmp_path / "m"
    shutil.copytree(cpu_art.path, out)
    before = (out / "manifest.json").read_text()
    broken = dataclasses.replace(mlp, make_module=lambda b: (_ for _ in ()).throw(RuntimeError("nope")))
    with pytest.raises(CompileError):
        compile_model(broken, out, batch_sizes=(1,), overwrite=True)
    assert (out / "manifest.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_weights_that_do_not_match_the_function(mlp, tmp_path):
    def weights():
        w = mlp.weights()
        w[2] = ("fc2.weight", np.zeros((256, 255), np.float32))
        return w
    with pytest.raises(CompileError, match=r"parameter 3 \(fc2.weight\) is float32\[256, 256\], the source says "
                                           r"float32\[256, 255\]"):
        compile_model(dataclasses.replace(mlp, weights=weights), tmp_path / "m", batch_sizes=(1,))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"target": "tpu"}, "unknown target 'tpu'"),
    ({"target": "cuda", "arch": "sm_xx"}, "invalid CUDA arch 'sm_xx'"),
    ({"target": "cuda", "arch": "sm_52"}, "not supported by this NVRTC"),
    ({"batch_sizes": (0, 2)}, "batch sizes must be positive"),
    ({"batch_sizes": ("a",)}, "batch sizes must be positive"),
    ({"page_size": 1000}, "page size 1000 must be a positive multiple of 256"),
    ({"weights": "random"}, "weights must be 'source' or 'synthetic'"),
])
def test_bad_arguments(mlp, tmp_path, kwargs, match):
    with pytest.raises(CompileError, match=match):
        compile_model(mlp, tmp_path / "m", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_cuda_compile_without_a_gpu(mlp, tmp_path):
    from workbench.models.compiler import cuda_sources, lower, make_target
    art = compile_model(mlp, tmp_path / "m", batch_sizes=(1, 16), target="cuda", arch="sm_90")
    m = art.manifest
    assert (m["target"], m["arch"]) == ("cuda", "sm_90") and '"kind":"cuda"' in m["target_str"]
    assert art.target == "cuda" and art.arch == "sm_90"
    for b in (1, 16):
        so = (art.path / f"b{b}.so").read_bytes()
        # The .so carries the CUDA source verbatim: the hash recorded (and used by --precompile-cubins) is of
        # exactly the text TVM hands to tvm_callback_cuda_compile when the .so is loaded on a GPU.
        [digest] = m["batches"][str(b)]["cuda_source_sha256"]
        from tvm import relax
        ex = relax.build(lower(mlp.make_module(b), make_target("cuda", "sm_90")), make_target("cuda", "sm_90"),
                         relax_pipeline=None)
        [src] = cuda_sources(ex)
        assert hashlib.sha256(src.encode()).hexdigest() == digest
        assert src.encode() in so and "__global__" in src
    with pytest.raises(ArtifactError, match=r"compiled for cuda, but the device is cpu"):
        art.load("cpu")


def test_synthetic_weights_record_their_generator(mlp, tmp_path):
    art = compile_model(mlp, tmp_path / "m", batch_sizes=(1,), weights="synthetic", seed=5)
    assert art.manifest["weights"]["generator"] == {"name": "workbench-synthetic-v1", "seed": 5}
    assert art.manifest["source"]["seed"] == 5
    w = art.weight_arrays()
    ref = dict(mlp.weights())
    assert not np.array_equal(w[0], ref["fc1.weight"]) and w[0].shape == ref["fc1.weight"].shape


def test_plan_peak_bytes_counts_live_storage_only():
    """The workspace estimate replays alloc/kill: two buffers alive together count twice, reused ones once."""
    import tvm
    from tvm.script import relax as R, ir as I
    from workbench.models.compiler import lower, plan_memory, plan_peak_bytes

    @I.ir_module
    class Chain:
        @R.function
        def main(x: R.Tensor((64, 64), "float32")) -> R.Tensor((64, 64), "float32"):
            a = R.nn.relu(x)
            b = R.exp(a)
            c = R.nn.relu(b)
            d = R.exp(c)
            return d

    low = lower(Chain, tvm.target.Target("llvm"))
    peak, out_bytes = plan_peak_bytes(low["main"])
    t = 64 * 64 * 4
    assert out_bytes == t
    # TVM plans the chain into two reused buffers (plus the output's): both are alive while the middle ops
    # run, so the peak is two buffers, not one (the names repeat in the IR: vars are tracked by identity)
    assert peak == 2 * t
    assert plan_memory(low["main"]) == (2 * t, t, 2 * t)      # two storages allocated, each once


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------

def test_cli_compile_and_inspect(tmp_path, capsys):
    out = tmp_path / "mlp"
    assert cli_main(["compile", "mlp", "--out", str(out), "--batch-sizes", "1,2", "--page-size", "64KiB",
                     "--seed", "1", "-q"]) == 0
    text = capsys.readouterr().out
    assert "mlp" in text and "zoo:mlp, seed 1" in text
    assert cli_main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    for needle in ("target     cpu", "input float32[N, 128]", "output float32[N, 10]", "7 pages",
                   "runs 0-3, 4-5", "weights.bin", "b2.so"):
        assert needle in text, needle
    assert cli_main(["inspect", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["batch_sizes"] == [1, 2] and d["weights"]["num_pages"] == 7 and d["source"]["seed"] == 1
    assert d["per_batch"]["2"]["io_bytes"] == 2 * 138 * 4
    assert set(d["files"]) == {"manifest.json", "weights.bin", "b1.so", "b2.so"}
    art = Artifact.open(out)
    assert np.array_equal(art.weight_arrays()[0], dict(zoo.get("mlp", seed=1).weights())["fc1.weight"])


@pytest.mark.parametrize("argv, match", [
    (["compile", "resnet51", "--out", "X"], "unknown model 'resnet51': valid zoo names are mlp, resnet18"),
    (["compile", "FILE.txt", "--out", "X"], "unknown file type"),
    (["compile", "missing.onnx", "--out", "X"], "ONNX file .*missing.onnx' does not exist"),
    (["compile", "mlp", "--out", "X", "--batch-sizes", "1,x"], "invalid --batch-sizes '1,x'"),
    (["compile", "mlp", "--out", "X", "--page-size", "16 parsecs"], "invalid size '16 parsecs'"),
    (["compile", "mlp", "--out", "X", "--target", "cuda", "--arch", "ampere"], "invalid CUDA arch 'ampere'"),
    (["inspect", "X"], "artifact directory .*X does not exist"),
])
def test_cli_errors(tmp_path, capsys, monkeypatch, argv, match):
    import re
    monkeypatch.chdir(tmp_path)
    Path("FILE.txt").write_text("not a model")
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert not Path("X").exists()


# ---------------------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------------------

def _onnx_mlp(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32) * 0.3, "w1"),
             numpy_helper.from_array(rng.standard_normal(32).astype(np.float32) * 0.1, "b1"),
             numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32) * 0.3, "w2"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32) * 0.1, "b2")]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_onnx_compile_run_matches_onnxruntime(tmp_path, capsys):
    import onnxruntime as ort
    from workbench.models.runtime import alloc_pages, copy_weights
    path = _onnx_mlp(tmp_path / "tiny.onnx")
    out = tmp_path / "art"
    assert cli_main(["compile", str(path), "--out", str(out), "--batch-sizes", "1,2,4,8,16", "-q"]) == 0
    art = Artifact.open(out)
    assert art.manifest["source"]["kind"] == "onnx"
    assert art.manifest["source"]["sha256"] == sha256_file(path)
    assert [(t.name, t.shape) for t in art.inputs] == [("x", (16,))]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = art.load("cpu")
    pages = alloc_pages(art)
    copy_weights(art, pages)
    binding = model.bind_weights(pages)
    for b in art.batch_sizes:
        x = np.random.default_rng(b).standard_normal((b, 16)).astype(np.float32)
        [y] = model.run(b, [x], binding)
        np.testing.assert_allclose(y, sess.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_cli_onnx_op_tvm_cannot_import(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Celu", ["x"], ["y"], name="my_celu")], "celu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "celu.onnx"
    onnx.save(model, str(path))
    assert cli_main(["compile", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Celu" in err and "celu.onnx" in err and not (tmp_path / "out").exists()
