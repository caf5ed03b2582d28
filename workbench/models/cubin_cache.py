"""Compile the CUDA source a TVM .so carries to cubins with NVRTC, once per machine, through a disk cache.

A .so compiled where there is no GPU holds CUDA *source*; when TVM loads it, it calls the global function
`tvm_callback_cuda_compile(source) -> bytes`. TVM's own callback needs the compiler's Target machinery (absent
in a runtime-only TVM) and recompiles every time (5-7 s per model). `install()` registers ours instead:
- NVRTC through `cuda.bindings.nvrtc`, for the arch of the device being loaded (from the CUDA driver) or an
  explicit one; the same flags as TVM's NVRTC path (fast math, int128, half/bf16 operators);
- a disk cache keyed by sha256(source, arch, NVRTC version, flags, built-in headers): default
  `~/.cache/workbench/cubin`, or `$WORKBENCH_CUBIN_CACHE`. Entries are written atomically (temp file + rename) and carry a sha256 of the cubin,
  so a damaged entry is detected, dropped and recompiled.

Headers: TVM's source includes <cuda/std/cstdint> and <cuda/std/type_traits> under NVRTC. We first compile
hermetically, handing NVRTC two tiny in-memory headers with just what the generated code uses: no CUDA headers
needed on the GPU machine, 3x faster than parsing CCCL, and the same cubin wherever this NVRTC runs. If the
source includes anything else (fp16/bf16 models include cuda_fp16.h), we compile again with the CUDA include
directories found here ($WORKBENCH_CUDA_INCLUDE, cuda-pathfinder, $CUDA_HOME/$CUDA_PATH, /usr/local/cuda,
cupy's bundled CCCL).

In a runtime-only TVM (TVM_USE_RUNTIME_LIB=1) the CUDA backend is not loaded by `import tvm`:
`ensure_cuda_backend()` loads tvm/lib/libtvm_runtime_cuda.so (ctypes, RTLD_LOCAL) before a CUDA module loads.
Imports only tvm / tvm_ffi / numpy / cuda.bindings, never the TVM compiler.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ENV_DIR = "WORKBENCH_CUBIN_CACHE"
DEFAULT_DIR = Path("~/.cache/workbench/cubin")
_MAGIC = b"WBCUBIN1"
_FLAGS = ["-default-device", "--device-int128", "--use_fast_math",
          "-D__NV_SILENCE_DEPRECATION_BEGIN=", "-D__NV_SILENCE_DEPRECATION_END=",
          "-D__NV_SILENCE_HOST_DEPRECATION_BEGIN=", "-D__NV_SILENCE_HOST_DEPRECATION_END=",
          "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
          "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
          "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__"]

# What TVM's generated code needs from libcu++ under NVRTC, for machines without CUDA headers.
_MINI_HEADERS = {
    "cuda/std/cstdint": """#pragma once
namespace cuda { namespace std {
typedef signed char int8_t; typedef short int16_t; typedef int int32_t; typedef long long int64_t;
typedef unsigned char uint8_t; typedef unsigned short uint16_t; typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
}}
""",
    "cuda/std/type_traits": """#pragma once
namespace cuda { namespace std {
template <class T, T v> struct integral_constant { static constexpr T value = v; };
typedef integral_constant<bool, true> true_type; typedef integral_constant<bool, false> false_type;
template <class A, class B> struct is_same : false_type {};
template <class A> struct is_same<A, A> : true_type {};
template <class A, class B> constexpr bool is_same_v = is_same<A, B>::value;
template <bool B, class T = void> struct enable_if {};
template <class T> struct enable_if<true, T> { typedef T type; };
template <bool B, class T, class F> struct conditional { typedef T type; };
template <class T, class F> struct conditional<false, T, F> { typedef F type; };
template <class T> struct remove_cv { typedef T type; };
template <class T> struct remove_cv<const T> { typedef T type; };
template <class T> struct remove_cv<volatile T> { typedef T type; };
template <class T> struct remove_cv<const volatile T> { typedef T type; };
template <class T> struct is_integral_ : false_type {};
template <> struct is_integral_<bool> : true_type {}; template <> struct is_integral_<char> : true_type {};
template <> struct is_integral_<signed char> : true_type {};
template <> struct is_integral_<unsigned char> : true_type {};
template <> struct is_integral_<short> : true_type {}; template <> struct is_integral_<unsigned short> : true_type {};
template <> struct is_integral_<int> : true_type {}; template <> struct is_integral_<unsigned int> : true_type {};
template <> struct is_integral_<long> : true_type {}; template <> struct is_integral_<unsigned long> : true_type {};
template <> struct is_integral_<long long> : true_type {};
template <> struct is_integral_<unsigned long long> : true_type {};
template <class T> struct is_integral : is_integral_<typename remove_cv<T>::type> {};
template <class T> struct is_floating_point_ : false_type {};
template <> struct is_floating_point_<float> : true_type {}; template <> struct is_floating_point_<double> : true_type {};
template <class T> struct is_floating_point : is_floating_point_<typename remove_cv<T>::type> {};
template <class T, bool = is_integral<T>::value || is_floating_point<T>::value> struct is_signed_ : false_type {};
template <class T> struct is_signed_<T, true> : integral_constant<bool, T(-1) < T(0)> {};
template <class T> struct is_signed : is_signed_<typename remove_cv<T>::type> {};
template <class T, bool = is_integral<T>::value> struct is_unsigned_ : false_type {};
template <class T> struct is_unsigned_<T, true> : integral_constant<bool, T(0) < T(-1)> {};
template <class T> struct is_unsigned : is_unsigned_<typename remove_cv<T>::type> {};
}}
""",
}
_PREAMBLE = """#ifndef __asm__
#define __asm__ asm
#endif
#ifndef __volatile__
#define __volatile__ volatile
#endif
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
"""


class NvrtcError(RuntimeError):
    """NVRTC rejected the source; the message quotes NVRTC's log."""


# ---------------------------------------------------------------------------------------------------------
# NVRTC
# ---------------------------------------------------------------------------------------------------------

def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise NvrtcError(f"cuda-bindings is not installed ({e}): pip install cuda-bindings nvidia-cuda-nvrtc") from e
    return nvrtc


def nvrtc_version() -> str:
    nvrtc = _nvrtc()
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except RuntimeError as e:   # libnvrtc missing
        raise NvrtcError(f"NVRTC library not found ({e}): pip install nvidia-cuda-nvrtc") from e
    return f"{major}.{minor}"


def _has(d: Path, rel: str) -> bool:
    return (d / rel).is_file()


def _cupy_cccl() -> list[Path]:
    try:
        import importlib.util
        spec = importlib.util.find_spec("cupy")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    base = Path(list(spec.submodule_search_locations)[0]) / "_core" / "include" / "cupy"
    return [p for p in (base / "_cccl" / "libcudacxx", base / "_cccl" / "libcudacxx" / "include") if p.is_dir()]


@dataclass(frozen=True)
class HeaderSetup:
    include_dirs: tuple[str, ...]
    mini_headers: bool            # True: the in-memory cuda/std headers stand in for CCCL

    @property
    def signature(self) -> str:
        return "mini-headers" if self.mini_headers else "cccl"


_HEADERS: HeaderSetup | None = None


def header_setup() -> HeaderSetup:
    """Where NVRTC finds CUDA headers on this machine (cached). $WORKBENCH_CUDA_INCLUDE (os.pathsep list) first."""
    global _HEADERS
    if _HEADERS is not None:
        return _HEADERS
    cands: list[Path] = [Path(p) for p in os.environ.get("WORKBENCH_CUDA_INCLUDE", "").split(os.pathsep) if p]
    try:
        import cuda.pathfinder as pf
        for lib in ("cccl", "cudart"):
            try:
                d = pf.find_nvidia_header_directory(lib)
                if d:
                    cands.append(Path(d))
            except Exception:  # noqa: BLE001 - pathfinder raises several types for "not found"
                pass
    except ImportError:
        pass
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands += [Path(os.environ[env]) / "include", Path(os.environ[env]) / "include" / "cccl"]
    cands += [Path("/usr/local/cuda/include"), Path("/usr/local/cuda/include/cccl")]
    cands += _cupy_cccl()
    dirs: list[str] = []
    for d in cands:
        if d.is_dir() and str(d) not in dirs:
            dirs.append(str(d))
    has_cccl = any(_has(Path(d), "cuda/std/cstdint") and _has(Path(d), "cuda/std/type_traits") for d in dirs)
    _HEADERS = HeaderSetup(tuple(dirs), mini_headers=not has_cccl)
    return _HEADERS


def _nvrtc_compile(source: str, arch: str, include_dirs: tuple[str, ...], mini: bool) -> tuple[bytes | None, str]:
    """One NVRTC run: (cubin, "") on success, (None, log) on a compile error."""
    nvrtc = _nvrtc()
    names = list(_MINI_HEADERS) if mini else []
    bodies = [_MINI_HEADERS[n].encode() for n in names]
    err, prog = nvrtc.nvrtcCreateProgram((_PREAMBLE + source).encode(), b"tvm_kernels.cu", len(names),
                                         bodies or None, [n.encode() for n in names] or None)
    if int(err) != 0:
        raise NvrtcError(f"nvrtcCreateProgram failed: {err}")
    try:
        opts = [f"--gpu-architecture={arch}".encode()] + [f.encode() for f in _FLAGS]
        opts += [f"-I{d}".encode() for d in include_dirs]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if int(err) != 0:
            _, n = nvrtc.nvrtcGetProgramLogSize(prog)
            log = bytearray(n)
            nvrtc.nvrtcGetProgramLog(prog, log)
            return None, f"{err.name if hasattr(err, 'name') else err}:\n" + \
                log.decode(errors="replace").rstrip("\x00").strip()
        err, n = nvrtc.nvrtcGetCUBINSize(prog)
        cubin = bytearray(n)
        (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
        if int(err) != 0:
            raise NvrtcError(f"nvrtcGetCUBIN failed: {err}")
        return bytes(cubin), ""
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_cubin(source: str, arch: str) -> bytes:
    """Compile CUDA source to a cubin for `arch` (e.g. sm_90) with NVRTC. Raises NvrtcError with NVRTC's log.

    First hermetically, with only the in-memory cuda/std headers (fast, and the same cubin on every machine
    with this NVRTC); if the source includes a header those do not provide (cuda_fp16.h, ...), again with
    the CUDA include directories found here."""
    cubin, log = _nvrtc_compile(source, arch, (), mini=True)
    if cubin is not None:
        return cubin
    hs = header_setup()
    if "open source file" in log and hs.include_dirs:
        cubin, log = _nvrtc_compile(source, arch, hs.include_dirs, mini=hs.mini_headers)
        if cubin is not None:
            return cubin
        where = f"with include dirs {', '.join(hs.include_dirs)}"
    else:
        where = "with the built-in headers" + ("" if hs.include_dirs else " (no CUDA include directory found: "
                                               "set WORKBENCH_CUDA_INCLUDE)")
    raise NvrtcError(f"NVRTC {nvrtc_version()} could not compile the CUDA source for {arch} {where}: {log}")


def device_arch(device_id: int = 0) -> str:
    """sm_XY of a CUDA device, from the driver (cuda.bindings)."""
    from cuda.bindings import driver as cu
    try:
        (err,) = cu.cuInit(0)
    except Exception as e:  # noqa: BLE001 - cuda-bindings raises when libcuda itself is missing
        raise RuntimeError(f"cuInit failed ({e}): no CUDA driver or device here") from e
    if int(err) != 0:
        raise RuntimeError(f"cuInit failed ({err}): no CUDA driver or device here")
    err, dev = cu.cuDeviceGet(device_id)
    if int(err) != 0:
        raise RuntimeError(f"cuDeviceGet({device_id}) failed ({err})")
    a = cu.CUdevice_attribute
    _, major = cu.cuDeviceGetAttribute(a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
    _, minor = cu.cuDeviceGetAttribute(a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
    return f"sm_{major}{minor}"


# ---------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------

@dataclass
class CacheStats:
    hits: int = 0
    compiles: int = 0
    corrupt: int = 0
    compile_seconds: float = 0.0
    events: list[tuple[str, str, float]] = field(default_factory=list)   # (key, "hit"|"compile", seconds)


class CubinCache:
    """Disk cache of cubins keyed by sha256(source, arch, NVRTC version, flags, built-in headers)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        d = directory or os.environ.get(ENV_DIR) or DEFAULT_DIR
        self.dir = Path(d).expanduser()
        self.stats = CacheStats()
        self._lock = threading.Lock()

    def key(self, source: str, arch: str) -> str:
        h = hashlib.sha256()
        for part in (source, arch, nvrtc_version(), " ".join(_FLAGS), _PREAMBLE, *_MINI_HEADERS.values()):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()

    def path(self, key: str, arch: str) -> Path:
        return self.dir / arch / f"{key}.cubin"

    def get(self, source: str, arch: str) -> bytes | None:
        """The cached cubin, or None (a damaged entry is removed and counted in stats.corrupt)."""
        p = self.path(self.key(source, arch), arch)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return None
        head, digest, cubin = data[:8], data[8:40], data[40:]
        if head != _MAGIC or hashlib.sha256(cubin).digest() != digest or not cubin.startswith(b"\x7fELF"):
            self.stats.corrupt += 1
            p.unlink(missing_ok=True)
            return None
        return cubin

    def put(self, source: str, arch: str, cubin: bytes) -> Path:
        p = self.path(self.key(source, arch), arch)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=p.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_MAGIC + hashlib.sha256(cubin).digest() + cubin)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return p

    def get_or_compile(self, source: str, arch: str) -> bytes:
        t0 = time.perf_counter()
        key = self.key(source, arch)
        cubin = self.get(source, arch)
        if cubin is not None:
            with self._lock:
                self.stats.hits += 1
                self.stats.events.append((key, "hit", time.perf_counter() - t0))
            return cubin
        cubin = compile_cubin(source, arch)
        self.put(source, arch, cubin)
        dt = time.perf_counter() - t0
        with self._lock:
            self.stats.compiles += 1
            self.stats.compile_seconds += dt
            self.stats.events.append((key, "compile", dt))
        return cubin


# ---------------------------------------------------------------------------------------------------------
# Hooking into TVM
# ---------------------------------------------------------------------------------------------------------

_installed: CubinCache | None = None
_arch = threading.local()
_default_arch: str | None = None


@contextlib.contextmanager
def compiling_for(arch: str):
    """Within this block, CUDA modules loaded by this thread are compiled for `arch`."""
    prev = getattr(_arch, "value", None)
    _arch.value = arch
    try:
        yield
    finally:
        _arch.value = prev


def _current_arch() -> str:
    arch = getattr(_arch, "value", None) or _default_arch
    return arch or device_arch(0)


def _callback(source) -> bytes:
    assert _installed is not None
    return _installed.get_or_compile(str(source), _current_arch())


def install(cache: CubinCache | None = None, arch: str | None = None) -> CubinCache:
    """Register our `tvm_callback_cuda_compile` (override=True). `arch`: default for loads outside
    `compiling_for` (else device 0's). Returns the cache in use; calling again swaps the cache/arch."""
    global _installed, _default_arch
    import tvm  # noqa: F401 - its import registers TVM's own callback (not overriding): ours must come after it
    import tvm_ffi
    _installed = cache or _installed or CubinCache()
    if arch is not None:
        _default_arch = arch
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", _callback, override=True)
    return _installed


def installed() -> CubinCache | None:
    return _installed


def ensure_cuda_backend() -> None:
    """Make TVM able to load CUDA modules: in a runtime-only TVM, load libtvm_runtime_cuda.so ourselves."""
    import tvm  # noqa: F401  (loads libtvm_runtime)
    import tvm_ffi
    if tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is not None:
        return
    from tvm.base import _LOADED_LIBS
    lib = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent / "libtvm_runtime_cuda.so"
    if not lib.is_file():
        raise RuntimeError(f"{lib} not found: this TVM was built without CUDA; install apache-tvm with CUDA "
                           f"(the PyPI wheel has it) or the device-site runtime")
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = ctypes.CDLL(str(lib), mode=os.RTLD_LOCAL)
    except OSError as e:
        raise RuntimeError(f"could not load {lib} ({e}): is an NVIDIA driver (libcuda.so.1) installed?") from e
    if tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
        raise RuntimeError(f"loaded {lib} but TVM still has no CUDA module loader")


# ---------------------------------------------------------------------------------------------------------
# Filling the cache ahead of a timed path
# ---------------------------------------------------------------------------------------------------------

def sources_in_so(data: bytes, digests: list[str]) -> list[str]:
    """The CUDA sources with these sha256 digests, as a .so built without a GPU stores them (verbatim, after
    a little-endian u64 length, shortly before the first line TVM emits). Missing ones are left out."""
    import struct
    found: dict[str, str] = {}
    want = set(digests)
    for marker in (b"#ifdef __CUDACC_RTC__", b'extern "C" __global__'):
        idx = data.find(marker)
        while idx >= 0 and want - set(found):
            for back in range(0, 64):
                start = idx - back
                if start < 8:
                    break
                n = struct.unpack_from("<Q", data, start - 8)[0]
                if n <= idx - start or n > len(data) - start:
                    continue
                d = hashlib.sha256(data[start:start + n]).hexdigest()
                if d in want:
                    found[d] = data[start:start + n].decode()
                    break
            idx = data.find(marker, idx + 1)
    return [found[d] for d in digests if d in found]


def _compile_worker(args: tuple[str, str]) -> bytes:
    return compile_cubin(*args)


def precompile(sources: list[str], arch: str, cache: CubinCache | None = None, workers: int | None = None) -> int:
    """Compile every source not yet cached, in parallel processes (NVRTC holds the GIL). Returns how many were
    compiled."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    cache = cache or installed() or CubinCache()
    todo = list({s: None for s in sources if cache.get(s, arch) is None})
    if not todo:
        return 0
    n = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    t0 = time.perf_counter()
    if n == 1:
        cubins = [compile_cubin(s, arch) for s in todo]
    else:
        with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn")) as ex:
            cubins = list(ex.map(_compile_worker, [(s, arch) for s in todo]))
    for s, c in zip(todo, cubins):
        cache.put(s, arch, c)
    with cache._lock:
        cache.stats.compiles += len(todo)
        cache.stats.compile_seconds += time.perf_counter() - t0
    return len(todo)


def precompile_artifact(art, arch: str | None = None, cache: CubinCache | None = None,
                        workers: int | None = None, batch_sizes: list[int] | None = None) -> int:
    """Fill the cache with the kernels of an artifact's b{N}.so files (source located by the manifest's
    cuda_source_sha256), so that loading it never compiles."""
    sources: list[str] = []
    for b in batch_sizes or art.batch_sizes:
        digests = art.manifest["batches"][str(b)].get("cuda_source_sha256") or []
        sources += sources_in_so(art.so_path(b).read_bytes(), digests)
    return precompile(sources, arch or art.arch or device_arch(0), cache, workers)
