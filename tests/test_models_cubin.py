"""The cubin cache, for real without a GPU: NVRTC compiles the CUDA source TVM generated for the zoo's mlp to a
sm_90 cubin through the callback TVM calls at module load; the cache hits, detects damage and quotes NVRTC."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from workbench.models import cubin_cache
from workbench.models.cubin_cache import CubinCache, NvrtcError

from no_gpu import run_without_gpu

EM_CUDA = 190


@pytest.fixture(scope="module")
def mlp_cuda_source() -> str:
    from tvm import relax
    from workbench.models import zoo
    from workbench.models.compiler import cuda_sources, lower, make_target
    tgt = make_target("cuda", "sm_90")
    ex = relax.build(lower(zoo.get("mlp").make_module(2), tgt), tgt, relax_pipeline=None)
    [src] = cuda_sources(ex)
    return src


@pytest.fixture
def counted(monkeypatch):
    """Count real NVRTC compiles (the cache calls the module's compile_cubin)."""
    calls = []
    real = cubin_cache.compile_cubin

    def spy(source, arch):
        calls.append(arch)
        return real(source, arch)
    monkeypatch.setattr(cubin_cache, "compile_cubin", spy)
    return calls


def _elf_machine(cubin: bytes) -> int:
    assert cubin[:4] == b"\x7fELF" and cubin[4] == 2          # 64-bit ELF
    return struct.unpack_from("<H", cubin, 18)[0]


def test_cold_compile_then_hit(mlp_cuda_source, tmp_path, counted):
    cache = CubinCache(tmp_path)
    cubin = cache.get_or_compile(mlp_cuda_source, "sm_90")
    assert _elf_machine(cubin) == EM_CUDA
    assert counted == ["sm_90"] and cache.stats.compiles == 1 and cache.stats.hits == 0
    again = CubinCache(tmp_path).get_or_compile(mlp_cuda_source, "sm_90")       # a new process would do this
    assert again == cubin and counted == ["sm_90"]
    entries = list(tmp_path.rglob("*.cubin"))
    assert len(entries) == 1 and entries[0].parent.name == "sm_90"
    assert not [p for p in tmp_path.rglob(".tmp-*")]                            # written atomically
    # another arch is another entry
    other = cache.get_or_compile(mlp_cuda_source, "sm_80")
    assert counted == ["sm_90", "sm_80"] and other != cubin and _elf_machine(other) == EM_CUDA


def test_damaged_entry_is_recompiled(mlp_cuda_source, tmp_path, counted):
    cache = CubinCache(tmp_path)
    cubin = cache.get_or_compile(mlp_cuda_source, "sm_90")
    [entry] = tmp_path.rglob("*.cubin")
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0x40
    entry.write_bytes(bytes(data))
    assert cache.get(mlp_cuda_source, "sm_90") is None and cache.stats.corrupt == 1 and not entry.exists()
    entry.write_bytes(b"WBCUBIN1" + b"\0" * 10)                                  # truncated
    assert cache.get_or_compile(mlp_cuda_source, "sm_90") == cubin
    assert cache.stats.corrupt == 2 and len(counted) == 2
    assert cache.get(mlp_cuda_source, "sm_90") == cubin


def test_nvrtc_errors_quote_the_log(tmp_path):
    bad = 'extern "C" __global__ void k(float* x) { x[0] = not_declared_anywhere; }'
    with pytest.raises(NvrtcError, match=r"(?s)could not compile the CUDA source for sm_90.*"
                                         r"identifier \"not_declared_anywhere\" is undefined"):
        CubinCache(tmp_path).get_or_compile(bad, "sm_90")
    assert not list(tmp_path.rglob("*.cubin"))


def test_tvm_calls_our_callback(mlp_cuda_source, tmp_path, counted):
    """What happens at module load: TVM looks up `tvm_callback_cuda_compile` and passes the source."""
    import tvm_ffi
    previous = cubin_cache.installed()
    cache = cubin_cache.install(CubinCache(tmp_path), arch="sm_90")
    try:
        fn = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
        first = bytes(fn(mlp_cuda_source))
        with cubin_cache.compiling_for("sm_80"):
            assert _elf_machine(bytes(fn(mlp_cuda_source))) == EM_CUDA
        second = bytes(fn(mlp_cuda_source))
        assert first == second and _elf_machine(first) == EM_CUDA
        assert counted == ["sm_90", "sm_80"] and cache.stats.hits == 1
    finally:
        cubin_cache.install(previous or CubinCache(tmp_path / "default"))


def test_installing_before_tvm_is_imported_keeps_tvm_importable(tmp_path):
    """TVM registers its own callback when imported, without overriding: installed first, ours made `import tvm`
    fail ("already registered"; the GPU suite's model tests failed so when run alone). A fresh process, so that
    nothing has imported TVM yet; ours must be the one registered afterwards."""
    import subprocess
    import sys
    code = ("from workbench.models import cubin_cache as c; import sys; c.install(c.CubinCache(sys.argv[1]))\n"
            "import tvm, tvm_ffi\n"
            "assert tvm_ffi.get_global_func('tvm_callback_cuda_compile') is not None\n"
            "assert c.installed() is not None; print('ok')")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


FP16_SOURCE = '#include <cuda_fp16.h>\nextern "C" __global__ void k(__half* x) { x[0] = __float2half(1.5f); }'


def test_sources_needing_other_headers_fall_back_to_include_dirs(tmp_path, monkeypatch):
    """TVM's fp32 source compiles with the built-in headers alone (hermetic); a source including anything else
    is compiled again with the include directories, $WORKBENCH_CUDA_INCLUDE first: here a directory made for the
    test, so this runs the same on every machine (the built-in cuda/std headers still serve what it lacks)."""
    inc = tmp_path / "include"
    (inc / "wb").mkdir(parents=True)
    (inc / "wb" / "scale.h").write_text("#pragma once\n"
                                        "__device__ inline float wb_scale(float x) { return 2.5f * x; }\n")
    monkeypatch.setenv("WORKBENCH_CUDA_INCLUDE", str(inc))
    monkeypatch.setattr(cubin_cache, "_HEADERS", None)          # found again, with our directory
    src = ('#include <cuda/std/cstdint>\n#include <wb/scale.h>\n'
           'extern "C" __global__ void wb_scaled(float* x, cuda::std::int32_t n) '
           '{ if (threadIdx.x < n) x[threadIdx.x] = wb_scale(x[threadIdx.x]); }')
    hs = cubin_cache.header_setup()
    assert hs.include_dirs[0] == str(inc)
    cubin = cubin_cache.compile_cubin(src, "sm_90")
    assert _elf_machine(cubin) == EM_CUDA and b"wb_scaled" in cubin
    monkeypatch.setattr(cubin_cache, "_HEADERS", cubin_cache.HeaderSetup((), mini_headers=True))
    with pytest.raises(NvrtcError, match=r"could not open source file \"wb/scale.h\""):
        cubin_cache.compile_cubin(src, "sm_90")                   # the header really came from that directory


def test_fp16_sources_compile_with_the_cuda_headers():
    """fp16 models include cuda_fp16.h: the real CUDA include directory must be found (CUDA toolkit, the
    nvidia-cuda-runtime wheel through cuda-pathfinder, or $WORKBENCH_CUDA_INCLUDE)."""
    hs = cubin_cache.header_setup()
    found = [d for d in hs.include_dirs if Path(d, "cuda_fp16.h").is_file()]
    if not found:
        pytest.fail(f"no CUDA include directory with cuda_fp16.h among {list(hs.include_dirs)}: "
                    f"pip install nvidia-cuda-runtime (its include/ is found by cuda-pathfinder), install the CUDA "
                    f"toolkit, or set WORKBENCH_CUDA_INCLUDE")
    assert _elf_machine(cubin_cache.compile_cubin(FP16_SOURCE, "sm_90")) == EM_CUDA


def test_missing_headers_are_reported(monkeypatch):
    monkeypatch.setattr(cubin_cache, "_HEADERS", cubin_cache.HeaderSetup((), mini_headers=True))
    with pytest.raises(NvrtcError, match=r"(?s)no CUDA include directory found: set WORKBENCH_CUDA_INCLUDE.*"
                                         r"could not open source file \"cuda_fp16.h\""):
        cubin_cache.compile_cubin(FP16_SOURCE, "sm_90")


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(cubin_cache.ENV_DIR, str(tmp_path / "c"))
    assert CubinCache().dir == tmp_path / "c"
    monkeypatch.delenv(cubin_cache.ENV_DIR)
    assert CubinCache().dir == cubin_cache.DEFAULT_DIR.expanduser()


def test_precompile_at_compile_time(tmp_path, counted):
    """`compile_model(..., precompile_cubins=True)` fills the cache with exactly the keys a GPU load looks up:
    those of the source stored in each .so."""
    from workbench.models import zoo
    from workbench.models.compiler import compile_model
    art = compile_model(zoo.get("mlp"), tmp_path / "a", batch_sizes=(1, 2), target="cuda", arch="sm_90",
                        precompile_cubins=True, cubin_cache_dir=tmp_path / "cache")
    assert counted == ["sm_90", "sm_90"]
    assert len(list((tmp_path / "cache" / "sm_90").iterdir())) == 2
    cache = CubinCache(tmp_path / "cache")
    for b in (1, 2):
        [digest] = art.manifest["batches"][str(b)]["cuda_source_sha256"]
        [src] = cubin_cache.sources_in_so((art.path / f"b{b}.so").read_bytes(), [digest])
        assert _elf_machine(cache.get_or_compile(src, "sm_90")) == EM_CUDA
    assert len(counted) == 2 and cache.stats.hits == 2


def test_precompile_artifact_in_worker_processes(tmp_path, counted):
    """What a GPU machine does before any timed load: compile every kernel of an artifact, in parallel."""
    from workbench.models import zoo
    from workbench.models.compiler import compile_model
    art = compile_model(zoo.get("mlp"), tmp_path / "a", batch_sizes=(1, 2), target="cuda")
    cache = CubinCache(tmp_path / "cache")
    assert cubin_cache.precompile_artifact(art, "sm_90", cache, workers=2) == 2
    assert cache.stats.compiles == 2 and counted == []              # compiled in the worker processes
    assert cubin_cache.precompile_artifact(art, "sm_90", cache) == 0
    for b in (1, 2):
        digests = art.manifest["batches"][str(b)]["cuda_source_sha256"]
        [src] = cubin_cache.sources_in_so(art.so_path(b).read_bytes(), digests)
        assert _elf_machine(cache.get(src, "sm_90")) == EM_CUDA
    assert cubin_cache.sources_in_so(b"no source here", digests) == []


def test_no_device_gives_a_clear_error():
    """In a child that sees no CUDA device (so this runs on the H200 too): asking for the device's arch fails
    clearly; loading TVM's CUDA backend fails naming the driver where there is no libcuda, and works (devices
    hidden or not) where there is one."""
    out = run_without_gpu("""
        import ctypes, pytest
        from workbench.models import cubin_cache
        with pytest.raises(RuntimeError, match="cuInit failed.*no CUDA driver or device"):
            cubin_cache.device_arch(0)
        try:
            ctypes.CDLL("libcuda.so.1")
            driver = True
        except OSError:
            driver = False
        if driver:
            cubin_cache.ensure_cuda_backend()
            import tvm_ffi
            assert tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is not None
        else:
            with pytest.raises(RuntimeError, match=r"libtvm_runtime_cuda.so.*NVIDIA driver"):
                cubin_cache.ensure_cuda_backend()
        print("driver" if driver else "no driver")
    """)
    assert out.strip() in ("driver", "no driver")
