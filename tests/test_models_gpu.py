"""CUDA execution on the H200 (marker `gpu`), with a runtime-only TVM: CUDA artifacts compiled on the CPU
machine (`python -m bench.build_gpu_artifacts`, carried as .gpu/artifacts.tar.xz) load with their kernels
compiled by our NVRTC callback, weights live in cupy pages, and outputs match the CPU artifacts and the
NumPy reference for every batch size: at fp32, at fp16 (tensor cores) and at fp16 as the tuned models run
(`fp16w`: fp16 activations between kernels and weights stored in fp16, bench.build_gpu_artifacts.FP16W_VARIANT),
and at fp32 with split-K matmuls (`fp32sk`, SPLIT_K_VARIANT: partial matmuls over slices of K, then summed) and on
the SIMT matmul schedule (`fp32simt`, SIMT_VARIANT: workbench/models/simt_gemm.py, split-K partials included).

    PYTHONPATH=$PWD/.device-site:$PWD TVM_USE_RUNTIME_LIB=1 python -m pytest -m gpu tests/test_models_gpu.py
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("mlp", "tiny_transformer")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    from workbench.models.artifact import unpack_bundle
    given = os.environ.get("WORKBENCH_MODEL_ARTIFACTS")
    candidates = [Path(given)] if given else [ROOT / ".gpu" / "artifacts.tar.xz", ROOT / ".gpu" / "artifacts"]
    for c in candidates:
        if c.is_file():
            kinds = ("cuda", "cpu", "fp16_cuda", "fp16w_cuda", "sk_cuda", "simt_cuda", "fp16wqkv_cuda", "simtqkv_cuda")
            wanted = [f"{m}_{t}" for m in MODELS for t in kinds]
            dirs = unpack_bundle(c, tmp_path_factory.mktemp("artifacts"), only=wanted)
            return {d.name: d for d in dirs}
        if c.is_dir():
            return {d.name: d for d in c.iterdir() if (d / "manifest.json").is_file()}
    pytest.fail(f"no GPU artifacts at {', '.join(map(str, candidates))}: run `python -m bench.build_gpu_artifacts` "
                f"on the CPU machine and carry .gpu/artifacts.tar.xz (`bash bench/gpu_suite.sh setup` unpacks it)")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from workbench.models import cubin_cache
    return cubin_cache.install(cubin_cache.CubinCache(tmp_path_factory.mktemp("cubins")))


def _need(artifacts, name):
    if name not in artifacts:
        pytest.fail(f"artifact {name} not in the GPU artifacts ({', '.join(sorted(artifacts))}): rebuild them with "
                    f"`python -m bench.build_gpu_artifacts` and carry .gpu/artifacts.tar.xz")
    from workbench.models.artifact import Artifact
    return Artifact.open(artifacts[name])


# relative, and absolute in units of the output's scale: --use_fast_math fp32 agrees to ~1e-3; fp16 (tensor
# cores, fp32 accumulation) to ~3e-2 of the scale, as bench.kernel_quality checks it
TOLERANCE = {"fp32": 2e-3, "fp16": 3e-2}


def _check_close(y: np.ndarray, want: np.ndarray, tol: float, what: str) -> None:
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(y, want, rtol=tol, atol=tol * scale, err_msg=what)


def _inputs(art, b: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for spec in art.inputs:
        if spec.dtype.startswith("int"):
            out.append(rng.integers(0, 1000, (b, *spec.shape)).astype(spec.dtype))
        else:
            out.append(rng.standard_normal((b, *spec.shape)).astype(spec.dtype))
    return out


@pytest.mark.parametrize("model,precision", [(m, p) for m in MODELS for p in ("fp32", "fp16", "fp16w", "fp32sk",
                                                                             "fp32simt")]
                         + [("tiny_transformer", "fp16wqkv"), ("tiny_transformer", "fp32simtqkv")])
def test_cuda_matches_cpu_and_reference_for_every_batch_size(artifacts, cache, model, precision):
    """fp16: the artifact compiled at precision fp16, whose matmuls run on tensor cores (schedules.MmaMatmul:
    mma.sync, ldmatrix, cp.async), within the fp16 tolerance of the same references. fp16w: also fp16
    activations between kernels and weights stored in fp16 (float16 tensors in the pages, bound as float16):
    same tolerance, against the CPU artifact's fp32 weights and the reference with the artifact's fp16 ones.
    fp32sk: split-K partial matmuls and their summing kernels, within the fp32 tolerance. fp32simt: the fp32
    matmuls (split-K partials too) on the SIMT schedule (cp.async-pipelined register tiles), same tolerance.
    fp16w and fp32simt also carry the tuned BERT variants' row settings: softmax and layer norm on RowReduction
    (tiny_transformer's rows of 32 and 128: one warp a row, four rows a block), at b1 too, where TVM 0.27 once
    dropped a barrier between the rows of a block (bench/build_kernel_candidates.round20). fp16wqkv, fp32simtqkv:
    those two with fused projections (one matmul for Q, K and V over weights stored side by side, the attention
    einsums reading its result in place), against the unfused CPU artifact and the reference of its weights."""
    import cupy
    import tvm
    from workbench.models.cubin_cache import sources_in_so
    from workbench.models.reference import reference_forward
    from workbench.models.runtime import alloc_pages, copy_weights
    suffix = {"fp32": "", "fp16": "_fp16", "fp16w": "_fp16w", "fp32sk": "_sk", "fp32simt": "_simt",
              "fp16wqkv": "_fp16wqkv", "fp32simtqkv": "_simtqkv"}[precision]
    fused = precision.endswith("qkv")
    cuda_art, cpu_art = _need(artifacts, f"{model}{suffix}_cuda"), _need(artifacts, f"{model}_cpu")
    assert cuda_art.target == "cuda" and cuda_art.arch == "sm_90"
    assert {cuda_art.precision(b) for b in cuda_art.batch_sizes} == {precision[:4]}
    if fused:                  # one weight (and bias) per layer for the three projections
        from workbench.models.zoo import TRANSFORMER_CONFIGS
        cfg = TRANSFORMER_CONFIGS[model]
        qkv = [t for t in cuda_art.tensors if "query_key_value" in t.name]
        assert len(qkv) == 2 * cfg.layers and len(cuda_art.tensors) == len(cpu_art.tensors) - 4 * cfg.layers
        assert all(t.shape[-1] == 3 * cfg.hidden for t in qkv)
    if precision.startswith("fp16w"):   # weights in fp16 (layer norms' in fp32), activations fp16 between kernels
        halves = [t for t in cuda_art.tensors if t.dtype == "float16"]
        assert halves and all(t.dtype == "float32" and "LayerNorm" in t.name
                              for t in cuda_art.tensors if t.dtype != "float16")
        assert cuda_art.weights_bytes < 0.52 * cpu_art.weights_bytes
        assert all(cuda_art.manifest["batches"][str(b)]["variant"]["weights"] == "fp16" and
                   cuda_art.manifest["batches"][str(b)]["variant"]["schedule"]["activations"] == "fp16"
                   for b in cuda_art.batch_sizes)
    if precision != "fp32":    # the kernels this test checks are the mma / split-K ones, at the larger batches
        b = cuda_art.batch_sizes[-1]
        digests = cuda_art.manifest["batches"][str(b)]["cuda_source_sha256"]
        srcs = sources_in_so(cuda_art.so_path(b).read_bytes(), digests)
        if precision == "fp32sk":
            assert any("matmul_split_k" in src and "split_k_sum" in src for src in srcs), f"no split in {cuda_art.name}"
        elif precision.startswith("fp32simt"):     # fp32 kernels with cp.async copies: only SimtMatmul emits them
            assert any("cp.async" in src for src in srcs), f"no SIMT matmul in {cuda_art.name} b{b}"
        else:
            assert any("mma.sync" in src and "ldmatrix" in src for src in srcs), f"no mma in {cuda_art.name} b{b}"
        if model == "tiny_transformer" and precision.startswith(("fp16w", "fp32simt")):   # RowReduction, 4 rows a block
            assert any(re.search(r"__launch_bounds__\(128\) \w*softmax\w*_kernel", src) for src in srcs), cuda_art.name
    gpu = cuda_art.load(tvm.cuda(0))
    pages = alloc_pages(cuda_art, tvm.cuda(0))
    assert all(isinstance(p, cupy.ndarray) for p in pages)
    copy_weights(cuda_art, pages)
    binding = gpu.bind_weights(pages)
    assert [str(w.dtype) for w in binding.tensors] == [t.dtype for t in cuda_art.tensors]
    cpu = cpu_art.load(tvm.cpu())
    cpu_pages = alloc_pages(cpu_art)
    copy_weights(cpu_art, cpu_pages)
    cpu_binding = cpu.bind_weights(cpu_pages)
    # the reference of what was compiled (a tuned artifact may be another lowering of the model, e.g.
    # zoo:resnet18-matmul, its weights laid out for it), with the artifact's own weights
    origin = cuda_art.manifest["source"]["origin"]
    assert origin.split(":", 1)[-1].startswith(model), origin
    named = [(t.name, a) for t, a in zip(*((cpu_art.tensors, cpu_art.weight_arrays()) if fused else
                                             (cuda_art.tensors, cuda_art.weight_arrays())))]
    for b in cuda_art.batch_sizes:
        xs = _inputs(cuda_art, b, seed=b)
        [y] = gpu.run(b, [cupy.asarray(x) for x in xs], binding)
        assert isinstance(y, cupy.ndarray) and y.shape == (b, *cuda_art.outputs[0].shape)
        y = cupy.asnumpy(y)
        [y_cpu] = cpu.run(b, xs, cpu_binding)
        tol = TOLERANCE[cuda_art.precision(b)]
        _check_close(y, y_cpu, tol, f"{cuda_art.name} b{b} vs the CPU artifact")
        _check_close(y, reference_forward(origin, xs, named), tol, f"{cuda_art.name} b{b} vs {origin}'s reference")


def test_streams_zero_copy_and_numpy_inputs(artifacts, cache):
    import cupy
    import tvm
    from workbench.models.runtime import alloc_pages, copy_weights
    art = _need(artifacts, "mlp_cuda")
    model = art.load(tvm.cuda(0))
    pages = alloc_pages(art, tvm.cuda(0))
    copy_weights(art, pages)
    binding = model.bind_weights(pages)
    [x] = _inputs(art, 16, seed=0)
    [base] = model.run(16, [x], binding)                      # numpy input: copied to the device
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        xd = cupy.asarray(x)
    [on_stream] = model.run(16, [xd], binding, stream=stream)
    stream.synchronize()
    cupy.testing.assert_array_equal(base, on_stream)
    bias = next(t for t in art.tensors if t.name == "fc3.bias")
    pages[bias.page][bias.offset:bias.offset + bias.nbytes].view(cupy.float32)[:] += 1.0
    [shifted] = model.run(16, [xd], binding)
    cupy.testing.assert_allclose(shifted, base + 1.0, rtol=1e-5, atol=1e-5)
    from workbench.models.artifact import ArtifactError
    with pytest.raises(ArtifactError, match=r"input 'input' must be float32\[16, 128\]"):
        model.run(16, [xd[:, :100]], binding)


def test_cubin_cache_cold_then_warm_load(artifacts, tmp_path):
    """First load compiles every kernel with NVRTC; a second load (a new module, as in a new process) hits the
    disk cache and compiles nothing. Times go to bench/results/exec_latency; here only the counts."""
    import tvm
    from workbench.models import cubin_cache
    art = _need(artifacts, "tiny_transformer_cuda")
    sources = [d for b in art.batch_sizes for d in art.manifest["batches"][str(b)]["cuda_source_sha256"]]
    cache = cubin_cache.install(cubin_cache.CubinCache(tmp_path / "cubins"))
    art.load(tvm.cuda(0))
    cold = cache.stats.compiles
    assert cold == len(set(sources)) and cache.stats.hits == len(sources) - len(set(sources))
    warm = art.load(tvm.cuda(0))
    assert cache.stats.compiles == cold and cache.stats.hits == 2 * len(sources) - len(set(sources))
    assert set(warm.load_seconds) == set(art.batch_sizes)
    fresh = cubin_cache.install(cubin_cache.CubinCache(tmp_path / "cubins"))   # another process: same files
    art.load(tvm.cuda(0))
    assert fresh.stats.compiles == 0 and fresh.stats.hits == len(sources)
