"""The artifact cache behind `Session.load`: a zoo model is compiled once per (model, target, arch, batch sizes,
page size, TVM version) into ~/.cache/workbench/artifacts/<key>/ and reused afterwards.

A name can also be an artifact directory (used as is) or an ONNX file (imported, then cached like a zoo model,
keyed by the file's content hash). Compiling needs the full TVM (`tvm.relax`), so on a machine with only the
TVM runtime the cache must already hold the artifact (compile it elsewhere and copy the directory).
"""
from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from workbench.ui.paths import cache_dir

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)
Progress = Callable[[str, int, int, str], None]   # (stage, done, total, message)
_compile_lock = threading.Lock()                   # one compile at a time per kernel (2-core laptops)


class ModelNotFound(ValueError):
    """A model name that is neither in the zoo, nor an artifact directory, nor an ONNX file."""


@dataclass(frozen=True)
class CachedArtifact:
    name: str
    path: Path
    target: str
    batch_sizes: tuple[int, ...]
    compiled: bool          # compiled by this call (False: reused)


def zoo_names() -> list[str]:
    from workbench.models import zoo
    return zoo.names()


def artifact_root() -> Path:
    return cache_dir("artifacts")


def cache_key(name: str, target: str, batch_sizes: Sequence[int], arch: str | None, page_size: int,
              extra: str = "") -> str:
    """The cache directory name. The TVM version is not part of it, so artifacts compiled on a machine with the
    full TVM can be carried to one with only the runtime (same 0.27 release); the manifest records it."""
    bs = "-".join(str(b) for b in batch_sizes)
    digest = hashlib.sha256(f"{name}|{target}|{arch}|{bs}|{page_size}|{extra}".encode()).hexdigest()
    return f"{_safe(name)}-{target}{'-' + arch if target == 'cuda' and arch else ''}-b{bs}-{digest[:10]}"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:48]


def list_cached(root: Path | None = None) -> list[Path]:
    """Artifact directories in the cache (those with a manifest), newest first."""
    root = root or artifact_root()
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and (d / "manifest.json").is_file()]
    return sorted(dirs, key=lambda d: d.stat().st_mtime, reverse=True)


def is_artifact_dir(name: str | os.PathLike) -> bool:
    p = Path(name).expanduser()
    return p.is_dir() and (p / "manifest.json").is_file()


def resolve(name: str | os.PathLike, target: str = "cpu", batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
            arch: str | None = None, page_size: int | None = None, root: Path | None = None,
            progress: Progress | None = None) -> CachedArtifact:
    """The artifact for `name` on `target`: an artifact directory as is, else a cached compile, else compile now.

    progress(stage="compile", done, total, message) is called per batch size while compiling.
    """
    from workbench.models.artifact import DEFAULT_PAGE_SIZE, Artifact

    page_size = page_size or DEFAULT_PAGE_SIZE
    say = progress or (lambda *a: None)
    if is_artifact_dir(name):
        art = Artifact.open(Path(name).expanduser(), verify=False)
        _check_target(art, target, Path(name))
        say("compile", 1, 1, f"using artifact {name}")
        return CachedArtifact(art.manifest.get("name", Path(name).name), Path(name).expanduser().resolve(),
                              art.manifest.get("target", target), tuple(art.batch_sizes), False)
    source_factory, label, extra = _source(str(name))
    bs = tuple(sorted({int(b) for b in batch_sizes}))
    key = cache_key(label, target, bs, arch or ("sm_90" if target == "cuda" else None), page_size, extra)
    out = (root or artifact_root()) / key
    if is_artifact_dir(out):
        say("compile", len(bs), len(bs), f"reusing cached artifact {out.name}")
        return CachedArtifact(label, out, target, bs, False)
    if os.environ.get("TVM_USE_RUNTIME_LIB"):       # a runtime-only TVM cannot compile: take a carried artifact
        pre = find_prebuilt(label, target, bs)
        if pre is not None:
            say("compile", len(bs), len(bs), f"using prebuilt artifact {pre}")
            return CachedArtifact(label, pre, target, bs, False)
    with _compile_lock:
        if is_artifact_dir(out):      # another thread compiled it meanwhile
            say("compile", len(bs), len(bs), f"reusing cached artifact {out.name}")
            return CachedArtifact(label, out, target, bs, False)
        try:
            from workbench.models.compiler import compile_model
            import tvm.relax  # noqa: F401  (absent from a runtime-only TVM)
        except Exception as e:  # noqa: BLE001 - runtime-only TVM (the GPU machine): use a prebuilt one if carried
            pre = find_prebuilt(label, target, bs)
            if pre is not None:
                say("compile", len(bs), len(bs), f"using prebuilt artifact {pre}")
                return CachedArtifact(label, pre, target, bs, False)
            raise RuntimeError(
                f"cannot compile {label!r} here ({e}): this TVM has no compiler. Compile it on a machine with the "
                f"full TVM (`python -m workbench.ui.artifacts {label} --target {target}`) and pass the artifact "
                f"directory, or copy it to {out} (or to <dir>/{_safe(label)}_{target}, <dir> on "
                f"$WORKBENCH_ARTIFACT_PATH)") from None
        done = [0]

        def on_msg(msg: str) -> None:
            if msg.startswith("compiling "):
                say("compile", done[0], len(bs), msg)
                done[0] += 1
            elif msg.strip().endswith(" s"):
                say("compile", done[0], len(bs), msg.strip())

        say("compile", 0, len(bs), f"compiling {label} for {target} (batch sizes {list(bs)})")
        compile_model(source_factory(), out, batch_sizes=bs, target=target, arch=arch or "sm_90",
                      page_size=page_size, progress=on_msg)
        say("compile", len(bs), len(bs), f"compiled {label} into {out}")
    return CachedArtifact(label, out, target, bs, True)


def search_path() -> list[Path]:
    """Directories holding prebuilt artifacts named <model>_<target> (e.g. carried to a GPU machine that has
    only the TVM runtime): $WORKBENCH_ARTIFACT_PATH (os.pathsep-separated), then <repo>/.gpu/artifacts."""
    dirs = [Path(p).expanduser() for p in os.environ.get("WORKBENCH_ARTIFACT_PATH", "").split(os.pathsep) if p]
    dirs.append(Path(__file__).resolve().parents[2] / ".gpu" / "artifacts")
    return [d for d in dirs if d.is_dir()]


def find_prebuilt(name: str, target: str, batch_sizes: Sequence[int]) -> Path | None:
    """A prebuilt artifact of `name` for `target` with exactly these batch sizes, if one is on the search path."""
    import json
    for d in search_path():
        cand = d / f"{_safe(name)}_{target}"
        try:
            m = json.loads((cand / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        if m.get("name") == name and m.get("target") == target and \
                sorted(m.get("batch_sizes", [])) == sorted(batch_sizes):
            return cand.resolve()
    return None


def _source(name: str):
    """(factory of the ModelSource, label, extra cache-key material) for a zoo name or an ONNX file."""
    p = Path(name).expanduser()
    if p.suffix.lower() == ".onnx":
        if not p.is_file():
            raise ModelNotFound(f"ONNX file {p} does not exist")
        from workbench.models import onnx_import
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        return (lambda: onnx_import.load(p)), p.stem, digest
    names = zoo_names()
    if name not in names:
        raise ModelNotFound(f"unknown model {name!r}: use a zoo name ({', '.join(names)}), an artifact "
                            f"directory (with manifest.json) or an .onnx file")
    from workbench.models import zoo
    return (lambda: zoo.get(name)), name, ""


def _check_target(art, target: str, path: Path) -> None:
    have = art.manifest.get("target")
    if have and have != target:
        raise ValueError(f"artifact {path} was compiled for {have!r}, but this session runs on {target!r}: "
                         f"compile it with --target {target}")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m workbench.ui.artifacts MODEL... [--target cuda] [--batch-sizes 1,2,4]`: fill the artifact
    cache ($WORKBENCH_CACHE/artifacts) ahead of time, e.g. CUDA artifacts here for a runtime-only GPU machine."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m workbench.ui.artifacts", description=main.__doc__)
    p.add_argument("models", nargs="+")
    p.add_argument("--target", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--arch", default=None)
    p.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)))
    a = p.parse_args(argv)
    bs = tuple(int(x) for x in a.batch_sizes.split(","))
    for m in a.models:
        art = resolve(m, a.target, bs, arch=a.arch, progress=lambda st, d, t, msg: print(f"  {msg}"))
        print(f"{m}: {art.path} ({'compiled' if art.compiled else 'cached'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
