"""Volume input (TIFF flavours, slice folders, .npy) and label output (OME-TIFF, staged files)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import PHANTOM_SHAPE, PHANTOM_VOXEL
from xctrt.errors import XctrtError
from xctrt.io import (ArraySource, NpySource, SliceFolderSource, StagedOutputs, TiffSource, check_output_dir,
                      open_volume, write_volume_tiff)


def volume(shape=(7, 20, 30), dtype=np.uint16, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(100, 20, shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -3000), min(info.max, 60000), shape, endpoint=True).astype(dtype)


def read_all(src):
    return src.read(0, src.shape[0])


# ------------------------------------------------------------------ TIFF flavours


@pytest.mark.parametrize("kwargs", [
    {},                                   # classic TIFF, uncompressed
    {"compression": "zlib"},
    {"bigtiff": True},
    {"bigtiff": True, "compression": "zlib"},
], ids=["plain", "zlib", "bigtiff", "bigtiff-zlib"])
def test_multipage_tiff_reads_exactly(tmp_path, kwargs):
    a = volume()
    p = tmp_path / "v.tif"
    tifffile.imwrite(p, a, photometric="minisblack", **kwargs)
    with open_volume(p) as src:
        assert isinstance(src, TiffSource)
        assert src.tif.is_bigtiff == bool(kwargs.get("bigtiff"))
        assert src.shape == a.shape
        assert src.dtype == np.uint16 and src.file_dtype == np.uint16
        assert src.voxel_size is None  # no metadata: unknown, not guessed
        got = read_all(src)
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got, a)


def test_bigtiff_suffix_btf(tmp_path):
    a = volume((5, 16, 18), np.uint8)
    p = tmp_path / "scan.btf"
    tifffile.imwrite(p, a, bigtiff=True, photometric="minisblack")
    with open_volume(p) as src:
        np.testing.assert_array_equal(read_all(src), a)


def test_uncompressed_and_compressed_tiff_give_identical_slabs(tmp_path):
    a = volume((11, 33, 27))
    plain, packed, ome = tmp_path / "plain.tif", tmp_path / "packed.tif", tmp_path / "packed.ome.tif"
    tifffile.imwrite(plain, a, photometric="minisblack")
    tifffile.imwrite(packed, a, photometric="minisblack", compression="zlib")
    tifffile.imwrite(ome, a, photometric="minisblack", compression="zlib", ome=True)
    assert tifffile.TiffFile(plain).series[0].dataoffset is not None      # contiguous
    assert tifffile.TiffFile(packed).series[0].dataoffset is None         # page by page
    for depth in (1, 3, 4, 11, 50):
        slabs = [list(open_volume(p).slabs(depth)) for p in (plain, packed, ome)]
        for (za, sa), (zb, sb), (zc, sc) in zip(*slabs):
            assert za == zb == zc
            np.testing.assert_array_equal(sa, sb)
            np.testing.assert_array_equal(sa, sc)
            np.testing.assert_array_equal(sa, a[za:za + len(sa)])
        assert len(slabs[0]) == len(slabs[1]) == len(slabs[2]) == -(-11 // depth)


def test_ome_tiff_physical_size_in_um_and_mixed_units(tmp_path):
    a = volume((5, 20, 30))
    p = tmp_path / "v.ome.tif"
    tifffile.imwrite(p, a, ome=True, photometric="minisblack", metadata={
        "axes": "ZYX", "PhysicalSizeZ": 2.0, "PhysicalSizeZUnit": "µm", "PhysicalSizeY": 1.5,
        "PhysicalSizeYUnit": "µm", "PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "mm"})
    with open_volume(p) as src:
        assert src.voxel_size == pytest.approx((0.002, 0.0015, 0.5))
        np.testing.assert_array_equal(read_all(src), a)


def test_ome_tiff_physical_size_default_unit_is_um(tmp_path):
    p = tmp_path / "v.ome.tif"
    tifffile.imwrite(p, volume((5, 20, 30)), ome=True, photometric="minisblack",
                     metadata={"axes": "ZYX", "PhysicalSizeZ": 8.0, "PhysicalSizeY": 4.0, "PhysicalSizeX": 2.0})
    with open_volume(p) as src:
        assert src.voxel_size == pytest.approx((0.008, 0.004, 0.002))


def test_ome_tiff_without_physical_size_has_no_voxel_size(tmp_path):
    p = tmp_path / "v.ome.tif"
    tifffile.imwrite(p, volume((5, 20, 30)), ome=True, photometric="minisblack", metadata={"axes": "ZYX"})
    with open_volume(p) as src:
        assert src.voxel_size is None and src.voxel_size_note is None   # nothing given, nothing to explain


def test_ome_tiff_with_x_and_y_but_no_z_size_says_so(tmp_path, run_cli):
    """A 2D tool's OME stack often has PhysicalSizeX/Y only: sizes are then in voxels, and the run says why."""
    p = tmp_path / "v.ome.tif"
    tifffile.imwrite(p, volume((5, 20, 30)), ome=True, photometric="minisblack",
                     metadata={"axes": "ZYX", "PhysicalSizeY": 4.0, "PhysicalSizeX": 2.0})
    with open_volume(p) as src:
        assert src.voxel_size is None
        assert src.voxel_size_note == "the OME metadata gives PhysicalSizeY/X but not Z"
    code, out, err = run_cli("segment", p, "-o", tmp_path / "out", "--no-progress")
    assert code == 0, err
    assert "note: voxel size unknown (the OME metadata gives PhysicalSizeY/X but not Z; sizes in voxels); " \
           "give it with --voxel-size" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["input"]["voxel_size_mm"] is None
    assert "but not Z" in summary["input"]["voxel_size_from"]


def test_phantom_fixture_is_an_ome_tiff_with_its_voxel_size(phantom_path, phantom_volume):
    with open_volume(phantom_path) as src:
        assert src.tif.is_ome
        assert src.shape == PHANTOM_SHAPE
        assert src.voxel_size == pytest.approx(PHANTOM_VOXEL)
        np.testing.assert_array_equal(read_all(src), phantom_volume)


@pytest.mark.parametrize("unit,scale", [("mm", 1.0), ("micron", 1e-3), ("\\u00B5m", 1e-3), ("um", 1e-3)])
def test_imagej_tiff_spacing_unit_resolution(tmp_path, unit, scale):
    a = volume((6, 20, 30))
    p = tmp_path / "ij.tif"
    # ImageJ stores pixels per unit in X/YResolution and the slice spacing in the description
    tifffile.imwrite(p, a, imagej=True, resolution=(1 / 4.0, 1 / 3.0),
                     metadata={"spacing": 5.0, "unit": unit, "axes": "ZYX"})
    with open_volume(p) as src:
        assert src.tif.is_imagej
        assert src.voxel_size == pytest.approx((5.0 * scale, 3.0 * scale, 4.0 * scale))
        np.testing.assert_array_equal(read_all(src), a)


def test_imagej_tiff_unknown_unit_gives_no_voxel_size(tmp_path):
    p = tmp_path / "ij.tif"
    tifffile.imwrite(p, volume((6, 20, 30)), imagej=True, resolution=(1.0, 1.0),
                     metadata={"spacing": 5.0, "unit": "pixel", "axes": "ZYX"})
    with open_volume(p) as src:
        assert src.voxel_size is None
        assert src.voxel_size_note == "the ImageJ metadata's unit 'pixel' is not a length xctrt knows"


# ------------------------------------------------------------------ slice folders


def _natural_names(n, stem="slice_", suffix=".tif"):
    return [f"{stem}{i}{suffix}" for i in range(n)]  # slice_0 .. slice_11: lexical order would be wrong


def test_tiff_slice_folder_natural_sort(tmp_path):
    a = volume((12, 20, 30))
    folder = tmp_path / "slices"
    folder.mkdir()
    for name, s in zip(_natural_names(12), a):
        tifffile.imwrite(folder / name, s)
    (folder / "notes.txt").write_text("not a slice")
    (folder / "sub.tif").mkdir()  # a folder with a slice suffix is not a slice
    with open_volume(folder) as src:
        assert isinstance(src, SliceFolderSource)
        names = [f.name for f in src.files]
        assert names.index("slice_2.tif") < names.index("slice_10.tif")
        assert names == _natural_names(12)
        assert src.shape == a.shape and src.voxel_size is None
        np.testing.assert_array_equal(read_all(src), a)
        np.testing.assert_array_equal(src.read(9, 11), a[9:11])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_slice_folder_natural_sort(tmp_path, dtype):
    a = volume((11, 20, 30), dtype)
    folder = tmp_path / "png"
    folder.mkdir()
    for name, s in zip(_natural_names(11, suffix=".png"), a):
        Image.fromarray(s).save(folder / name)
    with open_volume(folder) as src:
        assert src.shape == a.shape
        assert src.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(read_all(src), a)


def test_slice_folder_with_a_wrong_size_slice_names_it(tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    for name, s in zip(_natural_names(5), volume((5, 20, 30))):
        tifffile.imwrite(folder / name, s)
    tifffile.imwrite(folder / "slice_3.tif", volume((1, 21, 30))[0])
    with open_volume(folder) as src:
        np.testing.assert_array_equal(src.read(0, 3).shape, (3, 20, 30))
        with pytest.raises(XctrtError, match="slice_3.tif"):
            src.read(0, 5)


def test_empty_slice_folder_is_an_error(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "readme.txt").write_text("x")
    with pytest.raises(XctrtError, match="no .tif/.tiff/.png slices") as e:
        open_volume(folder)
    assert str(folder) in str(e.value)


# ------------------------------------------------------------------ .npy


def test_npy_is_read_slab_by_slab(tmp_path):
    a = volume((9, 17, 23))
    p = tmp_path / "v.npy"
    np.save(p, a)
    with open_volume(p) as src:
        assert isinstance(src, NpySource)
        assert src.shape == a.shape and src.dtype == np.uint16 and src.voxel_size is None
        for z0, slab in src.slabs(4):
            np.testing.assert_array_equal(slab, a[z0:z0 + 4])
        np.testing.assert_array_equal(src.read(8, 9), a[8:9])


def test_npy_errors(tmp_path):
    p = tmp_path / "v.npy"
    np.save(p, volume((9, 17, 23)))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])
    with pytest.raises(XctrtError, match="truncated|not a readable") as e:
        open_volume(p)
    assert str(p) in str(e.value)
    f = tmp_path / "fortran.npy"
    np.save(f, np.asfortranarray(volume((4, 5, 6))))
    with pytest.raises(XctrtError, match="Fortran"):
        open_volume(f)
    flat = tmp_path / "flat.npy"
    np.save(flat, volume((5, 6)))
    with pytest.raises(XctrtError, match="3D"):
        open_volume(flat)


# ------------------------------------------------------------------ dtypes, slabs, samples


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float64, np.uint32])
def test_other_dtypes_become_float32(tmp_path, dtype):
    a = volume((6, 10, 12), dtype)
    if np.dtype(dtype).kind == "i":
        a[0, 0, 0] = -1234  # negative grey values survive
    p = tmp_path / "v.tif"
    tifffile.imwrite(p, a, photometric="minisblack")
    with open_volume(p) as src:
        assert src.file_dtype == np.dtype(dtype)
        assert src.dtype == np.float32
        got = read_all(src)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, a.astype(np.float32))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_kernel_dtypes_are_kept(dtype):
    src = ArraySource(volume((4, 5, 6), dtype))
    assert src.dtype == np.dtype(dtype) and read_all(src).dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype", [np.complex64, np.bool_])
def test_unsupported_dtypes_are_rejected(dtype):
    with pytest.raises(XctrtError, match="unsupported voxel type"):
        ArraySource(np.zeros((2, 3, 4), dtype))


@pytest.mark.parametrize("depth", [1, 2, 5, 7, 100])
def test_slabs_cover_the_volume_exactly(depth):
    a = volume((7, 5, 6))
    src = ArraySource(a)
    slabs = list(src.slabs(depth))
    assert [z for z, _ in slabs] == list(range(0, 7, depth))
    assert all(len(s) == min(depth, 7 - z) for z, s in slabs)
    np.testing.assert_array_equal(np.concatenate([s for _, s in slabs]), a)


@pytest.mark.parametrize("z,count,expected", [
    (40, 16, 16), (5, 16, 5), (1, 16, 1), (40, 3, 3)])
def test_sample_slices_are_evenly_spaced_and_include_both_ends(z, count, expected):
    a = np.arange(z, dtype=np.float32)[:, None, None] * np.ones((1, 4, 5), np.float32)
    sample = ArraySource(a).sample_slices(count)
    assert sample.shape == (expected, 4, 5)
    zs = sample[:, 0, 0]
    assert zs[0] == 0 and zs[-1] == z - 1
    assert np.all(np.diff(zs) > 0)
    if expected > 2:  # evenly spaced: no gap more than one slice longer than another
        gaps = np.diff(zs)
        assert gaps.max() - gaps.min() <= 1


def test_non_finite_values_are_reported_with_their_slice():
    a = np.ones((6, 4, 5), np.float32)
    a[4, 2, 1] = np.inf
    src = ArraySource(a)
    np.testing.assert_array_equal(src.read(0, 4), a[:4])
    with pytest.raises(XctrtError, match="slice 4 contains NaN or infinite"):
        src.read(2, 6)


@pytest.mark.parametrize("shape", [(0, 4, 4), (3, 0, 4), (4, 4)])
def test_empty_or_flat_arrays_are_rejected(shape):
    with pytest.raises(XctrtError):
        ArraySource(np.zeros(shape, np.uint8))


# ------------------------------------------------------------------ output


@pytest.mark.parametrize("voxel_size", [(0.02, 0.01, 0.005), None])
def test_labels_round_trip_through_write_volume_tiff(tmp_path, voxel_size):
    labels = np.random.default_rng(3).integers(0, 4, (9, 31, 17)).astype(np.uint8)
    p = tmp_path / "labels.tif"
    write_volume_tiff(p, iter(labels), labels.shape, np.uint8, voxel_size)
    with open_volume(p) as src:
        assert src.tif.is_ome and src.tif.is_bigtiff
        assert src.tif.pages[0].compression != 1  # compressed
        assert src.shape == labels.shape
        assert src.file_dtype == np.uint8 and src.dtype == np.uint8
        if voxel_size is None:
            assert src.voxel_size is None
        else:
            assert src.voxel_size == pytest.approx(voxel_size)
        np.testing.assert_array_equal(read_all(src), labels)


@pytest.mark.parametrize("batch_pages", [2, 3, None])
def test_labels_are_compressed_and_written_as_their_pages_come(tmp_path, monkeypatch, batch_pages):
    """write_volume_tiff compresses each batch of pages once it has them and writes it before asking for
    more: the file holds the first batches before the last page is asked for, and reads back whole. By
    default (64 MiB of pages) a small volume is one batch, written only once its last page has come:
    tifffile's way with every batch, and the check that the file's size tells the two apart. Random pages
    (incompressible) outgrow the file object's buffer; two compression threads, as on a 2-core machine."""
    import xctrt.io
    monkeypatch.setattr(xctrt.io, "usable_cpus", lambda: 2)
    labels = np.random.default_rng(5).integers(0, 256, (8, 96, 128)).astype(np.uint8)   # 12 KiB pages
    p = tmp_path / "labels.tif"
    size_before = []   # the file's size when page i was asked for

    def pages():
        for page in labels:
            size_before.append(p.stat().st_size if p.exists() else 0)
            yield page

    write_volume_tiff(p, pages(), labels.shape, np.uint8, None, batch_pages=batch_pages)
    with open_volume(p) as src:
        np.testing.assert_array_equal(read_all(src), labels)
    page_bytes = labels[0].nbytes
    if batch_pages is None:
        assert size_before[-1] < page_bytes, size_before
        return
    for i, size in enumerate(size_before):   # every whole batch before page i: on disk (past its buffer)
        done = (i // batch_pages) * batch_pages
        assert size >= done * page_bytes - 8192, (i, size_before)
    assert size_before[batch_pages] >= batch_pages * page_bytes - 8192


def test_label_writer_benchmark_runs(tmp_path):
    """benchmarks/label_writer.py at a small size: both ways write the same bytes; with tifffile's batch
    (24 pages here) the 16 pages handed over before the third slab are not on disk when it comes."""
    from conftest import load_benchmark

    out = load_benchmark("label_writer").main(["--shape", "64", "256", "256", "--slab", "8", "--rate", "400",
                                               "--tifffile-batch", "24", "--repeat", "1",
                                               "--json", str(tmp_path / "writer.json")])
    assert json.loads((tmp_path / "writer.json").read_text()) == out
    (per,), (batched,) = out["runs"]["per slab"], out["runs"]["tifffile default"]
    assert per["batch_pages"] == 8 and batched["batch_pages"] == 24
    assert per["compressed_ratio"] == batched["compressed_ratio"] > 1
    assert batched["most_pages_not_on_disk"] >= 16
    assert per["after_last_slab_s"] >= 0 and per["seconds"] >= 64 / 400 - 8 / 400
    assert list(tmp_path.iterdir()) == [tmp_path / "writer.json"]


def test_one_slice_ome_and_imagej_files_are_volumes_of_one_slice(tmp_path):
    """tifffile squeezes Z = 1 away, but OME and ImageJ state the Z size: xctrt reads back its own one-slice
    label files (a plain one-page TIFF stays a 2D image, refused: test_errors)."""
    labels = np.random.default_rng(4).integers(0, 4, (1, 31, 17)).astype(np.uint8)
    ome, ij = tmp_path / "labels.tif", tmp_path / "ij.tif"
    write_volume_tiff(ome, iter(labels), labels.shape, np.uint8, (0.02, 0.01, 0.005))
    tifffile.imwrite(ij, labels, imagej=True, metadata={"axes": "ZYX", "spacing": 0.02, "unit": "mm"},
                     resolution=(100.0, 100.0))
    for p in (ome, ij):
        with open_volume(p) as src:
            assert src.shape == labels.shape
            np.testing.assert_array_equal(read_all(src), labels)
    with open_volume(ome) as src:
        assert src.voxel_size == pytest.approx((0.02, 0.01, 0.005))


def test_a_folder_holding_one_2d_image_is_a_one_slice_volume(tmp_path):
    """What the refusal of a plain 2D TIFF suggests (test_errors.test_2d_image_tiff)."""
    img = volume((1, 20, 30))[0]
    (tmp_path / "one").mkdir()
    tifffile.imwrite(tmp_path / "one" / "slice.tif", img)
    tifffile.imwrite(tmp_path / "plain.tif", img)
    with pytest.raises(XctrtError, match="a folder holding just this image is a volume of one slice"):
        open_volume(tmp_path / "plain.tif")
    with open_volume(tmp_path / "one") as src:
        assert src.shape == (1, 20, 30)
        np.testing.assert_array_equal(read_all(src)[0], img)


def test_staged_outputs_commit_in_order_and_discard(tmp_path):
    with StagedOutputs(tmp_path, ["a.txt", "b.txt"]) as st:
        st.path("b.txt").write_text("b")
        st.path("a.txt").write_text("a")
        st.path("c.txt").write_text("c")
        # nothing under its final name until the block ends
        assert sorted(p.name for p in tmp_path.iterdir()) == [f".{n}.txt.{st.token}.partial" for n in "abc"]
        assert st.token.startswith(f"{os.getpid()}.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "c.txt"]
    assert (tmp_path / "a.txt").read_text() == "a"

    out = tmp_path / "fail"
    out.mkdir()
    with pytest.raises(RuntimeError):
        with StagedOutputs(out, ["x.txt"]) as st:
            st.path("x.txt").write_text("half")
            raise RuntimeError("boom")
    assert list(out.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
def test_check_output_dir_below_a_folder_it_cannot_enter(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o600)   # no search permission: even asking whether a path below exists fails
    try:
        with pytest.raises(XctrtError, match="not writable"):
            check_output_dir(locked / "a" / "b")
    finally:
        locked.chmod(0o700)


def test_check_output_dir_creates_folders_and_rejects_files(tmp_path):
    out = tmp_path / "a" / "b"
    made = check_output_dir(out)
    assert made == [out.absolute(), (tmp_path / "a").absolute()]
    assert out.is_dir() and list(out.iterdir()) == []
    assert check_output_dir(out) == []   # already there: made nothing
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(XctrtError, match="not writable") as e:
        check_output_dir(afile / "sub")
    assert str(afile / "sub") in str(e.value)


def test_staged_outputs_remove_the_folders_they_made_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "new" / "run"
    with pytest.raises(RuntimeError):
        with StagedOutputs(out, ["x.txt"], create=True) as st:
            assert out.is_dir()
            st.path("x.txt").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []            # neither run/ nor new/ is left

    # a folder that was there before stays, and so does one someone else wrote into meanwhile
    (tmp_path / "kept").mkdir()
    st = StagedOutputs(tmp_path / "kept" / "a" / "b", create=True)
    (tmp_path / "kept" / "a" / "theirs.txt").write_text("x")
    st.discard()
    assert sorted(p.name for p in (tmp_path / "kept").rglob("*")) == ["a", "theirs.txt"]

    # a path through ".." is made as `mkdir -p` makes it, and all of what it made goes again
    st = StagedOutputs(tmp_path / "x" / ".." / "y" / "z", create=True)
    assert (tmp_path / "x").is_dir() and (tmp_path / "y" / "z").is_dir()
    st.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]

    # a partial file that cannot be removed does not replace the error on its way
    def stuck(self, missing_ok=False):
        raise PermissionError(13, "Permission denied")

    with pytest.raises(RuntimeError, match="the real error"):
        with StagedOutputs(tmp_path / "stuck", ["s.txt"], create=True) as st:
            st.path("s.txt").write_text("half")
            monkeypatch.setattr(Path, "unlink", stuck)
            raise RuntimeError("the real error")
    monkeypatch.undo()

    # committed outputs keep their folder, even if a later discard() is called
    with StagedOutputs(tmp_path / "ok", ["y.txt"], create=True) as st:
        st.path("y.txt").write_text("done")
    st.discard()
    assert (tmp_path / "ok" / "y.txt").read_text() == "done"


def test_palette_tiffs_are_refused(tmp_path):
    """Indices into a colour table are not grey values: a palette TIFF, as a stack or as a folder slice."""
    cmap = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (3, 1))
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, volume((3, 16, 16)).astype(np.uint8), photometric="palette", colormap=cmap)
    with pytest.raises(XctrtError, match=r"stack.tif: is a palette \(indexed colour\) TIFF"):
        open_volume(stack)
    folder = tmp_path / "slices"
    folder.mkdir()
    for i in range(3):
        tifffile.imwrite(folder / f"s{i}.tif", volume((16, 16)).astype(np.uint8),
                         photometric="palette" if i == 1 else "minisblack", colormap=cmap if i == 1 else None)
    with open_volume(folder) as src, pytest.raises(XctrtError, match=r"s1.tif: is a palette \(indexed colour\) TIFF"):
        src.read(0, 3)


def test_two_runs_into_one_folder_from_two_threads(tmp_path):
    """Each run's temporary files are its own, and commits take turns: the folder ends with one run's
    complete set, never labels from one run beside the summary of the other."""
    import threading
    names = ["labels.tif", "defects.csv", "summary.json"]
    barrier = threading.Barrier(2)
    errors = []

    def run(tag):
        try:
            with StagedOutputs(tmp_path, names) as st:
                for n in names:
                    st.path(n).write_text(tag)
                barrier.wait()   # both runs hold their staged files before either commits
        except BaseException as exc:   # noqa: BLE001 - reported below
            errors.append(exc)
    for _ in range(20):
        threads = [threading.Thread(target=run, args=(t,)) for t in "AB"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)   # no .partial left
        assert len({(tmp_path / n).read_text() for n in names}) == 1
