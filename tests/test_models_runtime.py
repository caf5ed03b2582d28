"""Running artifacts on the CPU with weights bound as zero-copy views into pages the caller owns; outputs checked
against the zoo's NumPy reference for every batch size; every bad input names what is wrong."""
from __future__ import annotations

import numpy as np
import pytest

from workbench.models import zoo
from workbench.models.artifact import Artifact, ArtifactError
from workbench.models.compiler import compile_model
from workbench.models.reference import reference_forward
from workbench.models.runtime import alloc_pages, copy_weights

BATCHES = (1, 2, 4, 8, 16)


@pytest.fixture(scope="module")
def mlp_art(tmp_path_factory) -> Artifact:
    # 64 KiB pages: fc2.weight (256 KiB) and fc1.weight (128 KiB) become runs of 4 and 2 pages
    return compile_model(zoo.get("mlp"), tmp_path_factory.mktemp("r") / "mlp", batch_sizes=BATCHES,
                         page_size=64 * 1024)


@pytest.fixture(scope="module")
def loaded(mlp_art):
    return mlp_art.load("cpu")


@pytest.fixture
def binding(mlp_art, loaded):
    pages = alloc_pages(mlp_art)
    copy_weights(mlp_art, pages)
    return loaded.bind_weights(pages)


def _x(b: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + b).standard_normal((b, 128)).astype(np.float32)


def test_every_batch_size_matches_the_numpy_reference(mlp_art, loaded, binding):
    weights = zoo.get("mlp").weights()
    assert loaded.batch_sizes == BATCHES
    for b in BATCHES:
        x = _x(b)
        [y] = loaded.run(b, [x], binding)
        assert isinstance(y, np.ndarray) and y.shape == (b, 10) and y.dtype == np.float32
        np.testing.assert_allclose(y, reference_forward("mlp", [x], weights), rtol=1e-4, atol=1e-5)


def test_weights_are_zero_copy_views_into_the_pages(mlp_art, loaded):
    pages = alloc_pages(mlp_art)
    copy_weights(mlp_art, pages)
    binding = loaded.bind_weights(pages)
    x = _x(4)
    [before] = loaded.run(4, [x], binding)
    bias = next(t for t in mlp_art.tensors if t.name == "fc3.bias")
    view = pages[bias.page][bias.offset:bias.offset + bias.nbytes].view(np.float32)
    view += 1.0                                         # change the weights in place, no re-binding
    [after] = loaded.run(4, [x], binding)
    np.testing.assert_allclose(after, before + 1.0, rtol=1e-5, atol=1e-5)


def test_pages_of_a_run_can_be_views_of_one_weights_buffer(mlp_art, loaded):
    """`page_views` splits read_weights() into pages: no copy at all (the host-side layout of a model)."""
    w = mlp_art.read_weights()
    pages = mlp_art.page_views(w)
    assert pages[0].size == 4 * mlp_art.page_size and pages[1].size == mlp_art.page_size
    raw = np.zeros(w.size + 256, np.uint8)
    aligned = raw[(-raw.ctypes.data) % 256:][:w.size]
    aligned[:] = w
    binding = loaded.bind_weights(mlp_art.page_views(aligned))
    x = _x(2)
    np.testing.assert_allclose(loaded.run(2, [x], binding)[0],
                               reference_forward("mlp", [x], zoo.get("mlp").weights()), rtol=1e-4, atol=1e-5)


def test_two_copies_share_one_loaded_model(mlp_art, loaded, binding):
    pages2 = alloc_pages(mlp_art)
    copy_weights(mlp_art, pages2)
    fc3 = next(t for t in mlp_art.tensors if t.name == "fc3.weight")
    pages2[fc3.page][fc3.offset:fc3.offset + fc3.nbytes] = 0      # copy 2: last layer's weights zeroed
    binding2 = loaded.bind_weights(pages2)
    x = _x(8)
    [y1] = loaded.run(8, [x], binding)
    [y2] = loaded.run(8, [x], binding2)
    fc3_bias = dict(zoo.get("mlp").weights())["fc3.bias"]
    np.testing.assert_allclose(y2, np.broadcast_to(fc3_bias, (8, 10)), rtol=1e-6)
    assert not np.allclose(y1, y2)
    [y1_again] = loaded.run(8, [x], binding)
    np.testing.assert_array_equal(y1, y1_again)


def test_bad_inputs_name_the_input(loaded, binding):
    with pytest.raises(ArtifactError, match=r"input 'input' must be float32\[4, 128\] for batch size 4, got "
                                            r"float32\[4, 127\]"):
        loaded.run(4, [np.zeros((4, 127), np.float32)], binding)
    with pytest.raises(ArtifactError, match=r"input 'input' must be float32\[4, 128\] .*got float64\[4, 128\]"):
        loaded.run(4, [np.zeros((4, 128))], binding)
    with pytest.raises(ArtifactError, match=r"input 'input' must be float32\[2, 128\] .*got float32\[3, 128\]"):
        loaded.run(2, [np.zeros((3, 128), np.float32)], binding)
    with pytest.raises(ArtifactError, match=r"takes 1 input\(s\) \(input\), got 2"):
        loaded.run(1, [_x(1), _x(1)], binding)
    with pytest.raises(ArtifactError, match=r"batch size 3 is not loaded .*padded_batch_size\(3\) = 4"):
        loaded.run(3, [np.zeros((3, 128), np.float32)], binding)
    assert loaded.padded_batch_size(3) == 4 and loaded.padded_batch_size(9) == 16


def test_load_some_batch_sizes(mlp_art, binding):
    part = mlp_art.load("cpu", batch_sizes=[16, 2])
    assert part.batch_sizes == (2, 16) and part.padded_batch_size(3) == 16
    [y] = part.run(2, [_x(2)], binding)               # bindings are per model, not per load
    assert y.shape == (2, 10)
    with pytest.raises(ArtifactError, match=r"batch size 4 is not loaded \(loaded: 2, 16\)"):
        part.run(4, [_x(4)], binding)
    with pytest.raises(ArtifactError, match=r"batch size 3 is not compiled \(compiled: 1, 2, 4, 8, 16\)"):
        mlp_art.load("cpu", batch_sizes=[3])


def test_bad_pages(mlp_art, loaded):
    pages = alloc_pages(mlp_art)
    with pytest.raises(ArtifactError, match=r"got 6 pages, the artifact has 7"):
        loaded.bind_weights(pages[:-1])
    short = list(pages)
    short[0] = pages[0][:mlp_art.page_size]                    # the run of 4 given as a single page
    with pytest.raises(ArtifactError, match=r"run 0 has 65536 bytes, needs 262144 \(a run of 4 pages must be one "
                                            r"contiguous array\)"):
        loaded.bind_weights(short)
    odd = list(pages)
    odd[6] = pages[6].view(np.int8)
    with pytest.raises(ArtifactError, match=r"page 6 must be a 1-D uint8 array, got int8"):
        loaded.bind_weights(odd)
    raw = np.zeros(mlp_art.page_size + 64, np.uint8)
    base = raw[(-raw.ctypes.data) % 64:]
    mis = list(pages)
    mis[6] = base[1:1 + mlp_art.page_size]
    with pytest.raises(ArtifactError, match=r"page 6 starts at address 0x[0-9a-f]+, not 64-byte aligned"):
        loaded.bind_weights(mis)


def test_weight_binding_must_belong_to_the_model(mlp_art, loaded, tmp_path):
    other = compile_model(zoo.get("tiny_transformer"), tmp_path / "t", batch_sizes=(1,))
    other_loaded = other.load("cpu")
    pages = alloc_pages(other)
    copy_weights(other, pages)
    foreign = other_loaded.bind_weights(pages)
    with pytest.raises(ArtifactError, match=r"binding of \d+ tensors does not fit mlp's 6 weights"):
        loaded.run(1, [_x(1)], foreign)
    # the same model compiled again (other page size) has the same weights: its bindings fit
    same = compile_model(zoo.get("mlp"), tmp_path / "m", batch_sizes=(1,))
    pages = alloc_pages(same)
    copy_weights(same, pages)
    [y] = loaded.run(1, [_x(1)], same.load("cpu").bind_weights(pages))
    np.testing.assert_allclose(y, reference_forward("mlp", [_x(1)], zoo.get("mlp").weights()), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.slow
def test_tiny_transformer_matches_reference(tmp_path):
    src = zoo.get("tiny_transformer")
    art = compile_model(src, tmp_path / "t", batch_sizes=(1, 4), page_size=256 * 1024)
    model = art.load("cpu")
    pages = alloc_pages(art)
    copy_weights(art, pages)
    binding = model.bind_weights(pages)
    weights = src.weights()
    for b in art.batch_sizes:
        ids = np.random.default_rng(b).integers(0, 1000, (b, 32)).astype(np.int32)
        [y] = model.run(b, [ids], binding)
        np.testing.assert_allclose(y, reference_forward("tiny_transformer", [ids], weights), rtol=1e-4, atol=1e-4)


_RUNTIME_ONLY_SCRIPT = r"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.startswith("tvm.relax") or name in ("workbench.models.compiler", "workbench.models.zoo"):
            raise ImportError(f"the run path imported {name}")
sys.meta_path.insert(0, Block())
import numpy as np, tvm
assert tvm.base._RUNTIME_ONLY
from workbench.models.runtime import Artifact, alloc_pages, copy_weights
art = Artifact.open(sys.argv[1])
model = art.load("cpu")
pages = alloc_pages(art)
copy_weights(art, pages)
[y] = model.run(2, [np.load(sys.argv[2])], model.bind_weights(pages))
np.save(sys.argv[3], y)
"""


def test_runs_with_a_runtime_only_tvm(mlp_art, tmp_path):
    """The GPU machine has no TVM compiler: loading and running must not import tvm.relax (or our compiler)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    x = _x(2)
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _RUNTIME_ONLY_SCRIPT, str(mlp_art.path), str(tmp_path / "x.npy"),
                        str(tmp_path / "y.npy")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), reference_forward("mlp", [x], zoo.get("mlp").weights()),
                               rtol=1e-4, atol=1e-5)
