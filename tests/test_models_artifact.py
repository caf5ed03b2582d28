"""The paged-weights artifact: best-fit-decreasing packing, oversize runs, synthetic weights, and every way an
artifact directory can be missing, damaged or incompatible (each error names the file and the fix)."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.models.artifact import (ALIGNMENT, FORMAT_VERSION, Artifact, ArtifactError, align_up, pack,
                                       pack_bundle, regenerate_weights, synthetic_tensor, unpack_bundle)

KiB = 1024


# ---------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------

def _reference_bfd(sizes: list[int], page: int, align: int) -> dict[int, tuple[int, int]]:
    """An independent best-fit-decreasing for ordinary tensors: index -> (page among ordinary pages, offset)."""
    pages: list[list[tuple[int, int]]] = []           # per page: (offset, size) items
    where = {}
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        s = sizes[i]
        fits = []
        for p, items in enumerate(pages):
            end = max((o + n for o, n in items), default=0)
            off = -(-end // align) * align
            if off + s <= page:
                fits.append((page - off - s, p, off))
        if fits:
            _, p, off = min(fits)
        else:
            pages.append([])
            p, off = len(pages) - 1, 0
        pages[p].append((off, s))
        where[i] = (p, off)
    return where


def _specs(sizes_f32: list[int]) -> list[tuple[str, tuple[int, ...], str]]:
    return [(f"t{i}", (n,), "float32") for i, n in enumerate(sizes_f32)]


def test_pack_best_fit_decreasing_example():
    # page 1024 B, 256 B alignment; float32 tensors of 600, 500, 400, 300, 200 bytes.
    layout = pack(_specs([150, 125, 100, 75, 50]), page_size=1024)
    where = {t.name: (t.page, t.offset) for t in layout.tensors}
    assert where == {"t0": (0, 0), "t1": (1, 0), "t2": (1, 512), "t3": (2, 0), "t4": (0, 768)}
    assert layout.num_pages == 3 and layout.runs == ((0, 1), (1, 1), (2, 1))
    assert [t.name for t in layout.tensors] == ["t0", "t1", "t2", "t3", "t4"]      # weight order kept
    assert layout.total_bytes == 2000 and layout.paged_bytes == 3072


def test_pack_best_fit_picks_tightest_page():
    # bytes 120, 48, 44, 44, 20 into 160-byte pages: p0 = [120] (40 free), p1 = [48, 44, 44] (24 free); the
    # last 20 bytes fit both: best fit takes p1 (4 left), where first fit would take p0 (20 left).
    layout = pack(_specs([30, 12, 11, 11, 5]), page_size=160, alignment=4)
    where = {t.name: (t.page, t.offset) for t in layout.tensors}
    assert where == {"t0": (0, 0), "t1": (1, 0), "t2": (1, 48), "t3": (1, 92), "t4": (1, 136)}
    assert layout.num_pages == 2
    ref = _reference_bfd([120, 48, 44, 44, 20], 160, 4)
    assert {f"t{i}": v for i, v in ref.items()} == where


def test_oversize_tensor_gets_a_contiguous_run_at_offset_zero():
    page = 16 * KiB * KiB
    # BERT-base's word embedding: 30522 x 768 fp32 = 93.8 MB = 5.59 pages -> a run of 6.
    specs = [("pos", (512, 768), "float32"), ("word", (30522, 768), "float32"), ("bias", (768,), "float32")]
    layout = pack(specs, page_size=page)
    word = layout.tensors[1]
    assert (word.page, word.offset) == (0, 0)
    assert layout.runs[0] == (0, math.ceil(30522 * 768 * 4 / page)) == (0, 6)
    assert layout.runs[1:] == ((6, 1),)
    assert layout.tensors[0].page == 6 and layout.tensors[2].page == 6      # small ones share one page
    assert all(t.page != 0 for t in layout.tensors if t.name != "word")      # nothing else in the run
    layout.check()


def test_pack_rejects_bad_page_size():
    with pytest.raises(ValueError, match="multiple"):
        pack(_specs([4]), page_size=1000)


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=40),
       page=st.sampled_from([1024, 2048, 4096]))
def test_pack_invariants(sizes, page):
    """No two tensors overlap; each lies within its page or run, aligned; runs partition the pages; ordinary
    tensors are placed exactly as an independent best-fit-decreasing does."""
    layout = pack(_specs(sizes), page_size=page)
    run_len = dict(layout.runs)
    assert sum(run_len.values()) == layout.num_pages
    assert [a for a, _ in layout.runs] == sorted(run_len) and layout.runs[0][0] == 0
    by_page: dict[int, list[tuple[int, int]]] = {}
    for t, n in zip(layout.tensors, sizes):
        assert t.nbytes == 4 * n and t.offset % ALIGNMENT == 0
        assert t.page in run_len and t.offset + t.nbytes <= run_len[t.page] * page
        if t.nbytes > page:
            assert t.offset == 0 and run_len[t.page] == math.ceil(t.nbytes / page)
        by_page.setdefault(t.page, []).append((t.offset, t.offset + t.nbytes))
    for spans in by_page.values():
        spans.sort()
        assert all(a1 <= b0 for (_, a1), (b0, _) in zip(spans, spans[1:]))
    for first, n in layout.runs:
        if n > 1:
            assert len(by_page[first]) == 1
    ordinary = [i for i, n in enumerate(sizes) if 4 * n <= page]
    first_ordinary = sum(n for _, n in layout.runs if n > 1)
    ref = _reference_bfd([4 * sizes[i] for i in ordinary], page, ALIGNMENT)
    for j, i in enumerate(ordinary):
        t = layout.tensors[i]
        assert (t.page - first_ordinary, t.offset) == ref[j]


# ---------------------------------------------------------------------------------------------------------
# Synthetic weights
# ---------------------------------------------------------------------------------------------------------

def test_synthetic_weights_are_fixed_and_scaled():
    a = synthetic_tensor(7, "layer1.conv.weight", (64, 32, 3, 3), "float32")
    assert np.array_equal(a, synthetic_tensor(7, "layer1.conv.weight", (64, 32, 3, 3), "float32"))
    assert not np.array_equal(a, synthetic_tensor(8, "layer1.conv.weight", (64, 32, 3, 3), "float32"))
    assert not np.array_equal(a, synthetic_tensor(7, "layer2.conv.weight", (64, 32, 3, 3), "float32"))
    assert abs(a.std() * math.sqrt(32 * 9) - 1) < 0.05 and abs(a.mean()) < 0.01
    ln = synthetic_tensor(0, "encoder.LayerNorm.weight", (768,), "float32")
    assert abs(ln.mean() - 1) < 0.02
    assert not synthetic_tensor(0, "ids", (5,), "int32").any()
    # Pinned bytes: the generator must give the same weights on every machine and numpy version, or
    # regenerated weights.bin files would not match their manifests.
    digest = hashlib.sha256(synthetic_tensor(0, "fc.weight", (16, 8), "float32").tobytes()).hexdigest()
    assert digest == PINNED_SYNTHETIC_SHA256


PINNED_SYNTHETIC_SHA256 = "7fc6162255973cd5150558a29a746d919e03d475e2a71e893ac66514a8b66935"


# ---------------------------------------------------------------------------------------------------------
# Artifact validation (a real compiled mlp)
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    from workbench.models import zoo
    from workbench.models.compiler import compile_model
    root = tmp_path_factory.mktemp("artifacts")
    src = zoo.get("mlp")
    out = {"source": root / "mlp", "synthetic": root / "mlp-synth"}
    compile_model(src, out["source"], batch_sizes=(1, 4), page_size=64 * KiB)
    compile_model(src, out["synthetic"], batch_sizes=(1,), page_size=64 * KiB, weights="synthetic", seed=3)
    return out


@pytest.fixture
def art_dir(built, tmp_path) -> Path:
    d = tmp_path / "a"
    shutil.copytree(built["source"], d)
    return d


def test_open_reads_the_manifest(art_dir):
    art = Artifact.open(art_dir)
    assert art.batch_sizes == (1, 4) and art.page_size == 64 * KiB
    assert art.runs == [(0, 4), (4, 2), (6, 1)]            # fc2.weight 256 KiB, fc1.weight 128 KiB, the rest
    assert [t.name for t in art.tensors] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight",
                                             "fc3.bias"]
    assert art.padded_batch_size(3) == 4 and art.padded_batch_size(1) == 1
    with pytest.raises(ArtifactError, match="exceeds the largest compiled batch size 4"):
        art.padded_batch_size(5)
    w = art.read_weights()
    assert w.size == art.num_pages * art.page_size
    arrays = art.weight_arrays(w)
    from workbench.models import zoo
    for (name, ref), got in zip(zoo.get("mlp").weights(), arrays):
        assert np.array_equal(ref, got), name


def test_missing_directory_and_not_a_directory(tmp_path):
    with pytest.raises(ArtifactError, match=r"does not exist: build it with `workbench compile"):
        Artifact.open(tmp_path / "nope")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ArtifactError, match="is a file, not an artifact directory"):
        Artifact.open(f)
    with pytest.raises(ArtifactError, match=r"manifest.json is missing"):
        Artifact.open(tmp_path)


def test_corrupt_manifest(art_dir):
    (art_dir / "manifest.json").write_text('{"format": "clockwork-workbench-artifact", ')
    with pytest.raises(ArtifactError, match=r"manifest.json is not valid JSON .*rebuild it"):
        Artifact.open(art_dir)


def test_other_format_version(art_dir):
    m = json.loads((art_dir / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION + 1
    (art_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=rf"format version {FORMAT_VERSION + 1}; this workbench reads version "
                                            rf"{FORMAT_VERSION}: rebuild it with `workbench compile mlp"):
        Artifact.open(art_dir)


def test_missing_manifest_field(art_dir):
    m = json.loads((art_dir / "manifest.json").read_text())
    del m["weights"]
    (art_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="lacks field.* weights"):
        Artifact.open(art_dir)


def test_missing_and_damaged_so(art_dir):
    so = art_dir / "b4.so"
    data = bytearray(so.read_bytes())
    data[len(data) // 2] ^= 0xFF
    so.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"b4.so does not match its checksum .*rebuild"):
        Artifact.open(art_dir)
    Artifact.open(art_dir, verify=False)            # checksums can be skipped
    so.unlink()
    with pytest.raises(ArtifactError, match=r"b4.so is missing \(batch size 4\)"):
        Artifact.open(art_dir)


def test_truncated_and_damaged_weights(art_dir):
    wf = art_dir / "weights.bin"
    data = bytearray(wf.read_bytes())
    wf.write_bytes(bytes(data[:-10]))
    with pytest.raises(ArtifactError, match=r"weights.bin has \d+ bytes, manifest.json says \d+"):
        Artifact.open(art_dir)
    data[100] ^= 0x01
    wf.write_bytes(bytes(data))
    art = Artifact.open(art_dir)                     # size is right; the checksum is checked on read
    with pytest.raises(ArtifactError, match=r"weights.bin does not match the weights checksum"):
        art.read_weights()
    wf.unlink()
    with pytest.raises(ArtifactError, match=r"weights.bin is missing and these weights cannot be regenerated"):
        Artifact.open(art_dir)


def test_synthetic_weights_regenerate_without_the_file(built, tmp_path):
    d = tmp_path / "s"
    shutil.copytree(built["synthetic"], d)
    original = (d / "weights.bin").read_bytes()
    (d / "weights.bin").unlink()
    art = Artifact.open(d)
    assert art.weights_regenerable and art.manifest["weights"]["generator"]["seed"] == 3
    w = art.read_weights()                           # regenerated in memory, checked against the sha256
    assert bytes(w[:len(original)]) == original and not w[len(original):].any()
    assert not (d / "weights.bin").exists()
    regenerate_weights(d)
    assert (d / "weights.bin").read_bytes() == original
    assert not [p for p in d.iterdir() if p.name.startswith(".")]       # no temp files left
    (d / "weights.bin").unlink()
    r = subprocess.run([sys.executable, "-m", "workbench.models.artifact", "regenerate", str(d)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (d / "weights.bin").read_bytes() == original


def test_regenerate_refuses_source_weights(art_dir):
    (art_dir / "weights.bin").unlink()
    with pytest.raises(ArtifactError, match="cannot be regenerated"):
        regenerate_weights(art_dir)


def test_layout_check_catches_overlap(art_dir):
    m = json.loads((art_dir / "manifest.json").read_text())
    t = m["weights"]["tensors"]
    small = [x for x in t if x["page"] == 6]
    small[1]["offset"] = small[0]["offset"]
    (art_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="overlap"):
        Artifact.open(art_dir)


def test_align_up():
    assert [align_up(n) for n in (0, 1, 256, 257)] == [0, 256, 256, 512]


def test_bundle_round_trip_regenerates_left_out_weights(built, tmp_path):
    import tarfile
    bundle = pack_bundle([built["source"], built["synthetic"]], tmp_path / "b.tar.xz", keep_weights_below=0)
    with tarfile.open(bundle) as tar:
        names = set(tar.getnames())
    assert "mlp/weights.bin" in names                       # source weights always travel
    assert "mlp-synth/weights.bin" not in names and "mlp-synth/b1.so" in names
    dirs = unpack_bundle(bundle, tmp_path / "out")
    assert [d.name for d in dirs] == ["mlp", "mlp-synth"]
    for d in dirs:
        orig = built["source"] if d.name == "mlp" else built["synthetic"]
        assert (d / "weights.bin").read_bytes() == (orig / "weights.bin").read_bytes()
        Artifact.open(d).read_weights()
    [only] = unpack_bundle(bundle, tmp_path / "one", only=["mlp-synth"])
    assert only.name == "mlp-synth" and [p.name for p in (tmp_path / "one").iterdir()] == ["mlp-synth"]
    with pytest.raises(ArtifactError, match="bundle .*nope.tar.xz does not exist"):
        unpack_bundle(tmp_path / "nope.tar.xz", tmp_path / "x")
