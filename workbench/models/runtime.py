"""Run a compiled artifact on the CPU or a CUDA GPU, with weights in memory the caller owns.

Imports only tvm.runtime / tvm_ffi / numpy (and cupy, lazily, for CUDA outputs): it works with a runtime-only
TVM (TVM_USE_RUNTIME_LIB=1) on a machine that cannot compile.

    art = Artifact.open("artifacts/resnet50")          # validates manifest, files, checksums
    model = art.load(tvm.cuda(0))                      # each b{N}.so loaded once; kernels from the cubin cache
    pages = alloc_pages(art, tvm.cuda(0))               # or pages from your own weights cache
    copy_weights(art, pages)                            # host weights -> pages
    binding = model.bind_weights(pages)                 # zero-copy DLPack views at (page, offset)
    [y] = model.run(16, [x], binding, stream=s)         # cupy in/out on CUDA, numpy on the CPU

Many bindings (model copies in different pages) share one LoadedArtifact: kernels are loaded once per device.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from workbench.models.artifact import ALIGNMENT, Artifact, ArtifactError, WeightTensor

__all__ = ["Artifact", "ArtifactError", "LoadedArtifact", "WeightBinding", "alloc_pages", "copy_weights",
           "device_of"]

_DL_CPU, _DL_CUDA, _DL_CUDA_HOST = 1, 2, 3
_TVM_ALIGNMENT = 64        # tvm.runtime.from_dlpack refuses less


def device_of(spec: Any):
    """A tvm.runtime.Device from a Device, "cpu", "cuda", "cuda:1"."""
    import tvm
    if isinstance(spec, tvm.runtime.Device):
        return spec
    if isinstance(spec, str):
        kind, _, idx = spec.partition(":")
        if kind in ("cpu", "llvm"):
            return tvm.cpu(int(idx or 0))
        if kind in ("cuda", "gpu"):
            return tvm.cuda(int(idx or 0))
    raise ArtifactError(f"unknown device {spec!r}: use tvm.cpu(0), tvm.cuda(0), 'cpu' or 'cuda:N'")


def _is_cuda(dev) -> bool:
    return dev.dlpack_device_type() == _DL_CUDA


def _data_ptr(a) -> int:
    if hasattr(a, "__cuda_array_interface__"):
        return int(a.__cuda_array_interface__["data"][0])
    if hasattr(a, "__array_interface__"):
        return int(a.__array_interface__["data"][0])
    if hasattr(a, "data_ptr"):
        return int(a.data_ptr())
    return 0


def _array_device(a) -> tuple[int, int]:
    if hasattr(a, "__dlpack_device__"):
        t, i = a.__dlpack_device__()
        return int(t), int(i)
    return (_DL_CPU, 0)


@dataclass
class WeightBinding:
    """One copy of a model's weights bound to pages: `tensors` are TVM views, in the function's weight order.
    Holds references to the pages so they outlive the binding."""
    tensors: list
    pages: list
    device: Any
    signature: tuple = ()         # ((shape, dtype), ...) of the weights: a binding fits models with the same one
    # what a device made for this binding that bakes in the weights' addresses (the CUDA worker's graphs): it
    # lives and dies with the binding
    launch_cache: dict = field(default_factory=dict, repr=False, compare=False)


class LoadedArtifact:
    """An artifact's kernels loaded on one device: one VM per batch size, shared by every weight binding."""

    def __init__(self, artifact: Artifact, device, batch_sizes: Sequence[int] | None = None):
        import tvm
        from tvm.runtime.vm import VirtualMachine
        self.artifact = artifact
        self.device = device_of(device)
        self.cuda = _is_cuda(self.device)
        if self.cuda != (artifact.target == "cuda"):
            raise ArtifactError(f"{artifact.path} is compiled for {artifact.target}, but the device is "
                                f"{self.device}: load it on {'tvm.cuda(N)' if artifact.target == 'cuda' else 'tvm.cpu()'}"
                                f" or compile it with --target {'cuda' if self.cuda else 'cpu'}")
        self.function = artifact.manifest.get("function", "main")
        self._signature = tuple((t.shape, t.dtype) for t in artifact.tensors)
        self.load_seconds: dict[int, float] = {}
        self._modules: dict[int, Any] = {}
        self._vms: dict[int, Any] = {}
        self._fns: dict[int, Any] = {}
        self.arch_note: str | None = None
        self.cubin_cache = None
        if self.cuda:
            from workbench.models import cubin_cache
            cubin_cache.ensure_cuda_backend()
            cache = cubin_cache.installed() or cubin_cache.install()
            self.cubin_cache = cache
            arch = cubin_cache.device_arch(self.device.index)
            if artifact.arch and artifact.arch != arch:
                # The .so holds source, so any arch works; note it for whoever reads the manifest.
                self.arch_note = f"compiled for {artifact.arch}, kernels built for this device's {arch}"
            ctx = cubin_cache.compiling_for(arch)
        else:
            import contextlib
            ctx = contextlib.nullcontext()
        wanted = artifact.batch_sizes if batch_sizes is None else tuple(sorted(set(batch_sizes)))
        for b in wanted:
            artifact._batch(b)                  # raises for a batch size that is not compiled
        with ctx:
            for b in wanted:
                t0 = time.perf_counter()
                try:
                    mod = tvm.runtime.load_module(str(artifact.so_path(b)))
                    vm = VirtualMachine(mod, self.device)
                    fn = vm[self.function]
                except ArtifactError:
                    raise
                except Exception as e:  # noqa: BLE001
                    raise ArtifactError(f"loading {artifact.so_path(b)} on {self.device} failed: "
                                        f"{type(e).__name__}: {str(e).strip()[:1500]}") from e
                self._modules[b], self._vms[b], self._fns[b] = mod, vm, fn
                self.load_seconds[b] = time.perf_counter() - t0

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The batch sizes loaded here (all compiled ones unless `load(..., batch_sizes=...)` chose some)."""
        return tuple(self._fns)

    @property
    def functions(self) -> dict[int, Any]:
        """batch size -> the VM function `run` calls, for a caller on a hot path that passes TVM tensors it has
        already checked (shapes and dtypes of the inputs, a binding made by this model's bind_weights) and
        reads the TVM outputs itself; `run` does the checks and conversions."""
        return self._fns

    def padded_batch_size(self, n: int) -> int:
        """Smallest loaded batch size >= n."""
        for b in self.batch_sizes:
            if b >= n:
                return b
        raise ArtifactError(f"{self.artifact.name}: batch of {n} exceeds the largest loaded batch size "
                            f"{self.batch_sizes[-1]}")

    # -- weights ----------------------------------------------------------------------------------------
    def bind_weights(self, pages: Sequence) -> WeightBinding:
        """Views of every weight at its (page, offset) inside `pages` (zero-copy).

        pages[i]: 1-D uint8 array of >= page_size bytes holding page i, on this device (numpy for the CPU,
        cupy or any CUDA DLPack array for CUDA); the first page of a run must span the whole run.
        Base addresses must be 64-byte aligned (TVM's requirement; `alloc_pages` gives 256)."""
        import tvm
        art = self.artifact
        if len(pages) != art.num_pages:
            raise ArtifactError(f"{art.name}: bind_weights got {len(pages)} pages, the artifact has "
                                f"{art.num_pages} (page size {art.page_size})")
        want = _DL_CUDA if self.cuda else _DL_CPU
        for first, n in art.runs:
            p = pages[first]
            kind = "run" if n > 1 else "page"
            dev = _array_device(p)
            if dev[0] != want and not (want == _DL_CPU and dev[0] == _DL_CUDA_HOST):
                raise ArtifactError(f"{art.name}: {kind} {first} is on DLPack device {dev}, but the model is "
                                    f"loaded on {self.device}: allocate pages on that device")
            if self.cuda and dev[1] != self.device.index:
                raise ArtifactError(f"{art.name}: {kind} {first} is on cuda:{dev[1]}, the model on {self.device}")
            if str(getattr(p, "dtype", "")) != "uint8" or len(getattr(p, "shape", ())) != 1:
                raise ArtifactError(f"{art.name}: {kind} {first} must be a 1-D uint8 array, got "
                                    f"{getattr(p, 'dtype', type(p).__name__)}{list(getattr(p, 'shape', []))}")
            if p.shape[0] < n * art.page_size:
                raise ArtifactError(f"{art.name}: {kind} {first} has {p.shape[0]} bytes, needs {n * art.page_size}"
                                    + (f" (a run of {n} pages must be one contiguous array)" if n > 1 else ""))
            ptr = _data_ptr(p)
            if ptr % _TVM_ALIGNMENT:
                raise ArtifactError(f"{art.name}: {kind} {first} starts at address {ptr:#x}, not "
                                    f"{_TVM_ALIGNMENT}-byte aligned: allocate pages with alloc_pages()")
        tensors = []
        for t in art.tensors:
            tensors.append(tvm.runtime.from_dlpack(_view(pages[t.page], t)))
        return WeightBinding(tensors, list(pages), self.device, self._signature)

    # -- running ----------------------------------------------------------------------------------------
    def _check_inputs(self, b: int, inputs: Sequence) -> None:
        art = self.artifact
        if b not in self._fns:
            loaded = self.batch_sizes
            raise ArtifactError(f"{art.name}: batch size {b} is not loaded (loaded: "
                                f"{', '.join(map(str, loaded))}); use padded_batch_size({b}) = "
                                + (str(self.padded_batch_size(b)) if b <= loaded[-1] else "n/a"))
        if len(inputs) != len(art.inputs):
            raise ArtifactError(f"{art.name} takes {len(art.inputs)} input(s) "
                                f"({', '.join(t.name for t in art.inputs)}), got {len(inputs)}")
        for spec, x in zip(art.inputs, inputs):
            shape = tuple(int(d) for d in getattr(x, "shape", ()))
            dtype = str(getattr(x, "dtype", type(x).__name__))
            if shape != (b, *spec.shape) or dtype != spec.dtype:
                raise ArtifactError(f"{art.name}: input '{spec.name}' must be {spec.dtype}{[b, *spec.shape]} for "
                                    f"batch size {b}, got {dtype}{list(shape)}")

    def _to_tvm(self, x):
        import tvm
        dev = _array_device(x)
        if self.cuda and dev[0] == _DL_CUDA:
            if dev[1] != self.device.index:
                raise ArtifactError(f"input on cuda:{dev[1]}, model on {self.device}")
            if _data_ptr(x) % _TVM_ALIGNMENT == 0 and _contiguous(x):
                return tvm.runtime.from_dlpack(x)
            import cupy
            return tvm.runtime.from_dlpack(cupy.ascontiguousarray(x).copy())
        if not self.cuda and isinstance(x, np.ndarray) and x.flags.c_contiguous and x.flags.writeable \
                and x.ctypes.data % _TVM_ALIGNMENT == 0:
            return tvm.runtime.from_dlpack(x)
        return tvm.runtime.tensor(np.ascontiguousarray(np.asarray(x)), self.device)

    def run(self, batch_size: int, inputs: Sequence, binding: WeightBinding, stream: Any = None) -> list:
        """Run one batch. inputs: arrays of shape (batch_size, *spec.shape) (numpy; on CUDA also cupy or any
        CUDA DLPack array). Returns the outputs: numpy on the CPU, cupy (else TVM tensors) on CUDA.
        stream: a CUDA stream (cupy Stream, torch Stream, or a raw cudaStream_t int) to launch on."""
        self._check_inputs(batch_size, inputs)
        if binding.device != self.device:
            raise ArtifactError(f"binding is on {binding.device}, model on {self.device}")
        if binding.signature is not self._signature and binding.signature != self._signature:
            raise ArtifactError(f"binding of {len(binding.tensors)} tensors does not fit {self.artifact.name}'s "
                                f"{len(self.artifact.tensors)} weights: bind with this model's bind_weights()")
        args = [self._to_tvm(x) for x in inputs]
        fn = self._fns[batch_size]
        if stream is not None and self.cuda:
            import tvm_ffi
            with tvm_ffi.use_raw_stream(self.device, _stream_ptr(stream)):
                out = fn(*args, *binding.tensors)
        else:
            out = fn(*args, *binding.tensors)
        outs = list(out) if not hasattr(out, "shape") else [out]
        if not self.cuda:
            return [o.numpy() for o in outs]
        try:
            import cupy
        except ImportError:
            return outs
        return [cupy.from_dlpack(o) for o in outs]


def _stream_ptr(stream: Any) -> int:
    if isinstance(stream, int):
        return stream
    for attr in ("ptr", "cuda_stream", "handle"):
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    raise ArtifactError(f"cannot use {stream!r} as a CUDA stream: pass a cupy/torch stream or a cudaStream_t int")


def _contiguous(x) -> bool:
    flags = getattr(x, "flags", None)
    return bool(flags.c_contiguous) if flags is not None else True


def _view(page, t: WeightTensor):
    return page[t.offset:t.offset + t.nbytes].view(t.dtype).reshape(t.shape)


# ---------------------------------------------------------------------------------------------------------
# Page helpers (tests, benchmarks; the worker has its own cache)
# ---------------------------------------------------------------------------------------------------------

def alloc_pages(art: Artifact, device: Any = "cpu") -> list:
    """Fresh zeroed pages for `art` on `device`, aligned to 256 bytes: each run one contiguous array, the
    later pages of a run views into it (as a weights cache would hand them out)."""
    dev = device_of(device)
    pages: list = []
    for _, n in art.runs:
        size = n * art.page_size
        if _is_cuda(dev):
            import cupy
            with cupy.cuda.Device(dev.index):
                block = cupy.zeros(size, dtype=cupy.uint8)      # cupy allocations are 256-byte aligned
        else:
            raw = np.zeros(size + ALIGNMENT, dtype=np.uint8)
            skip = (-raw.ctypes.data) % ALIGNMENT
            block = raw[skip:skip + size]
        pages.append(block)
        pages.extend(block[i * art.page_size:(i + 1) * art.page_size] for i in range(1, n))
    return pages


def copy_weights(art: Artifact, pages: Sequence, weights: np.ndarray | None = None) -> None:
    """Copy the artifact's weights (from `weights` = read_weights(), or read now) into `pages`."""
    host = art.read_weights() if weights is None else weights
    for first, n in art.runs:
        src = host[first * art.page_size:(first + n) * art.page_size]
        dst = pages[first]
        if isinstance(dst, np.ndarray):
            dst[:src.size] = src
        else:
            dst[:src.size].set(src)            # cupy
