"""Outputs: what the commands write is checked before the work starts (folder there and writable, the
name free or a regular file), written under a hidden temporary name and renamed into place only when
complete; a failure of any kind ends with one error line naming the file and leaves no temporary file
and no half-replaced set of results. Also the input checks that guard outputs (slice folders, dtypes)."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from test_errors import assert_one_error_line
from xctrt.errors import XctrtError
from xctrt.io import StagedOutputs
from xctrt.phantom import write_phantom


def partials(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".partial"))


def null_link(folder: Path, name: str) -> Path:
    """A symlink to /dev/null: a name held by a character device once links are followed."""
    link = folder / name
    link.symlink_to(os.devnull)
    return link


def assert_still_null_link(link: Path):
    assert link.is_symlink() and os.readlink(link) == os.devnull


# ------------------------------------------------------------------ StagedOutputs


@pytest.mark.parametrize("kind", ["folder", "fifo", "device"])
def test_commit_refuses_a_target_that_is_not_a_regular_file(tmp_path, kind):
    target = tmp_path / "x.txt"
    if kind == "folder":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        null_link(tmp_path, "x.txt")
    with pytest.raises(XctrtError, match="is a folder" if kind == "folder" else "not a regular file") as e:
        with StagedOutputs(tmp_path) as st:   # no order: only commit() sees the name
            st.path("x.txt").write_text("x")
    assert str(target) in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]   # no temporary file left
    assert {"folder": target.is_dir, "fifo": target.is_fifo, "device": target.is_char_device}[kind]()
    if kind == "device":
        assert_still_null_link(target)


def test_named_outputs_are_checked_before_any_work(tmp_path):
    null_link(tmp_path, "b.txt")
    with pytest.raises(XctrtError, match="b.txt: exists and is not a regular file"):
        StagedOutputs(tmp_path, ["a.txt", "b.txt"])
    (tmp_path / "run" / "a.txt").mkdir(parents=True)
    with pytest.raises(XctrtError, match="a.txt: is a folder"):
        StagedOutputs(tmp_path / "run" / "new" / "..", ["a.txt"], create=True)
    assert not (tmp_path / "run" / "new").exists()   # the folder it made for the run is gone again


def test_a_link_to_a_regular_file_is_replaced_as_before(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("old")
    (tmp_path / "link.txt").symlink_to(real)
    with StagedOutputs(tmp_path, ["link.txt"]) as st:
        st.path("link.txt").write_text("new")
    assert (tmp_path / "link.txt").read_text() == "new" and not (tmp_path / "link.txt").is_symlink()
    assert real.read_text() == "old"


def test_commit_checks_every_target_before_renaming_any(tmp_path):
    for n in "abc":
        (tmp_path / f"{n}.txt").write_text(f"old {n}")
    st = StagedOutputs(tmp_path, ["a.txt", "b.txt", "c.txt"])
    for n in "abc":
        st.path(f"{n}.txt").write_text(f"new {n}")
    (tmp_path / "c.txt").unlink()
    (tmp_path / "c.txt").mkdir()    # appears after the early check: commit must see it before renaming a and b
    with pytest.raises(XctrtError, match="c.txt: is a folder"):
        with st:
            pass
    assert [(tmp_path / f"{n}.txt").read_text() for n in "ab"] == ["old a", "old b"]
    assert partials(tmp_path) == []


def test_a_failed_rename_leaves_no_temporary_file(tmp_path, monkeypatch):
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "b.txt":
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(XctrtError, match="b.txt: cannot write") as e:
        with StagedOutputs(tmp_path, ["a.txt", "b.txt", "c.txt"]) as st:
            for n in "abc":
                st.path(f"{n}.txt").write_text(n)
    assert os.strerror(errno.EXDEV) in str(e.value)
    assert partials(tmp_path) == []
    assert not (tmp_path / "c.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []   # a.txt, renamed first, is taken back too


@pytest.mark.parametrize("stop", [OSError(errno.EIO, os.strerror(errno.EIO)), KeyboardInterrupt()])
def test_a_commit_that_stops_halfway_puts_the_earlier_set_back(tmp_path, monkeypatch, stop):
    """A rename failing, or Ctrl-C/SIGTERM, between two renames: the folder keeps the earlier run's
    complete set, not this run's first files beside the earlier run's last."""
    for n in "abc":
        (tmp_path / f"{n}.txt").write_text(f"old {n}")
    os.symlink(tmp_path / "a.txt", tmp_path / "link.txt")
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "c.txt" and str(src).endswith(".partial"):
            raise stop
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises((XctrtError, KeyboardInterrupt)):
        with StagedOutputs(tmp_path, ["a.txt", "b.txt", "new.txt", "link.txt", "c.txt"]) as st:
            for n in ("a", "b", "new", "link", "c"):
                st.path(f"{n}.txt").write_text(f"new {n}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "c.txt", "link.txt"]
    assert [(tmp_path / f"{n}.txt").read_text() for n in "abc"] == ["old a", "old b", "old c"]
    assert (tmp_path / "link.txt").is_symlink()   # the link itself is back, not a copy


def test_commit_does_not_wait_forever_for_a_lock_it_does_not_own(tmp_path):
    """`flock OUT xctrt ...` holds a lock on the folder for the whole run: the commit waits a little,
    then goes ahead (our own commits hold it for milliseconds)."""
    import fcntl
    import time
    from xctrt import io as xio
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        t0 = time.monotonic()
        with xio._folder_lock(tmp_path, wait_s=0.2):
            pass
        assert 0.2 <= time.monotonic() - t0 < 5
    finally:
        os.close(fd)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EFBIG, errno.EACCES])
def test_write_errors_name_the_output_file(tmp_path, err):
    with pytest.raises(XctrtError) as e:
        with StagedOutputs(tmp_path, ["x.json"]) as st:
            with st.write("x.json") as tmp:
                tmp.write_text("half")
                raise OSError(err, os.strerror(err))
    assert str(e.value) == f"{tmp_path / 'x.json'}: cannot write ({os.strerror(err)})"
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ segment


def test_segment_refuses_an_output_name_held_by_a_folder_before_the_work(run_cli, phantom_path, tmp_path,
                                                                         slab_calls):
    out = tmp_path / "out"
    (out / "labels.tif").mkdir(parents=True)
    code, _, err = run_cli("segment", phantom_path, "-o", out)
    assert_one_error_line(code, err, out / "labels.tif", "is a folder")
    assert slab_calls == []
    assert sorted(p.name for p in out.iterdir()) == ["labels.tif"]


def test_segment_leaves_earlier_results_whole_when_summary_json_is_a_folder(run_cli, phantom_path, tmp_path):
    out = tmp_path / "out"
    assert run_cli("segment", phantom_path, "-o", out)[0] == 0
    (out / "summary.json").unlink()
    (out / "summary.json").mkdir()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, _, err = run_cli("segment", phantom_path, "-o", out, "--min-voxels", "5")
    assert_one_error_line(code, err, out / "summary.json", "is a folder")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert partials(out) == []


def test_segment_to_a_link_to_dev_null_refused(run_cli, phantom_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    link = null_link(out, "preview.png")
    code, _, err = run_cli("segment", phantom_path, "-o", out)
    assert_one_error_line(code, err, link, "not a regular file")
    assert_still_null_link(link)
    assert sorted(p.name for p in out.iterdir()) == ["preview.png"]


# ------------------------------------------------------------------ phantom, evaluate


def test_phantom_onto_a_device_refused_and_nothing_left(run_cli, tmp_path):
    link = null_link(tmp_path, "dev.tif")
    code, _, err = run_cli("phantom", link, "--shape", 4, 32, 32)
    assert_one_error_line(code, err, link, "not a regular file")
    assert_still_null_link(link)
    assert partials(tmp_path) == []


def test_phantom_onto_a_folder_leaves_no_temporary_file(run_cli, tmp_path):
    (tmp_path / "ph.tif").mkdir()
    code, _, err = run_cli("phantom", tmp_path / "ph.tif", "--shape", 4, 32, 32)
    assert_one_error_line(code, err, tmp_path / "ph.tif", "is a folder")
    assert partials(tmp_path) == [] and list((tmp_path / "ph.tif").iterdir()) == []


@pytest.fixture
def label_volume(tmp_path) -> Path:
    p = tmp_path / "in" / "truth.tif"
    p.parent.mkdir()
    write_phantom(tmp_path / "in" / "image.tif", (4, 32, 32), labels_path=p)
    return p


def test_evaluate_json_onto_a_folder_or_device_refused(run_cli, tmp_path, label_volume, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "o").mkdir()
    code, _, err = run_cli("evaluate", label_volume, label_volume, "--json", "o/")
    assert_one_error_line(code, err, "o", "is a folder")
    link = null_link(tmp_path, "null.json")
    code, _, err = run_cli("evaluate", label_volume, label_volume, "--json", link)
    assert_one_error_line(code, err, link, "not a regular file")
    assert_still_null_link(link)
    assert partials(tmp_path) == [] and list((tmp_path / "o").iterdir()) == []


# ------------------------------------------------------------------ single output files, checked first


def never(what):
    def fail(*a, **k):
        raise AssertionError(f"{what} ran although the output was bad")
    return fail


@pytest.mark.parametrize("bad", ["missing/x.tif", "afile/x.tif", "folder.tif"])
def test_phantom_checks_its_outputs_before_rendering(run_cli, tmp_path, monkeypatch, bad):
    import xctrt.phantom
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder.tif").mkdir()
    monkeypatch.setattr(xctrt.phantom, "make_phantom", never("the phantom"))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for args in ([tmp_path / bad], [tmp_path / "ok.tif", "--labels", tmp_path / bad]):
        code, _, err = run_cli("phantom", *args, "--shape", 4, 32, 32)
        line = assert_one_error_line(code, err, tmp_path / bad)
        assert ("is a folder" if bad == "folder.tif" else "not a folder" if "afile" in bad
                else "does not exist") in line
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_phantom_leaves_neither_volume_when_the_labels_cannot_be_written(run_cli, tmp_path, monkeypatch):
    import xctrt.io
    real = xctrt.io.write_volume_tiff

    def full_on_labels(target, pages, shape, dtype, *a, **k):
        if np.dtype(dtype) == np.uint8:
            Path(target).write_bytes(b"II*\0half")
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        return real(target, pages, shape, dtype, *a, **k)
    monkeypatch.setattr(xctrt.io, "write_volume_tiff", full_on_labels)
    code, _, err = run_cli("phantom", tmp_path / "img.tif", "--labels", tmp_path / "lab.tif", "--shape", 4, 32, 32)
    assert_one_error_line(code, err, tmp_path / "lab.tif", "cannot write", os.strerror(errno.EFBIG))
    assert list(tmp_path.iterdir()) == []


def test_evaluate_checks_json_before_evaluating(run_cli, tmp_path, label_volume, monkeypatch):
    import xctrt.evaluate
    monkeypatch.setattr(xctrt.evaluate, "evaluate_volumes", never("the evaluation"))
    (tmp_path / "folder").mkdir()
    for bad, why in [(tmp_path / "missing" / "r.json", "does not exist"), (tmp_path / "folder", "is a folder")]:
        code, _, err = run_cli("evaluate", label_volume, label_volume, "--json", bad)
        assert_one_error_line(code, err, bad, why)
    assert not (tmp_path / "missing").exists() and list((tmp_path / "folder").iterdir()) == []


def test_evaluate_json_over_the_file_size_limit(tmp_path, label_volume):
    """`ulimit -f`: the write fails with EFBIG (Python ignores SIGXFSZ), which must be a clear error."""
    import resource
    import subprocess
    import sys

    from conftest import xctrt_env

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "xctrt", "evaluate", str(label_volume), str(label_volume),
                        "--json", str(out)], capture_output=True, text=True, env=xctrt_env(), preexec_fn=limit,
                       timeout=120)
    assert_one_error_line(p.returncode, p.stderr, out, "cannot write", os.strerror(errno.EFBIG))
    assert partials(tmp_path) == [] and not out.exists()


@pytest.mark.parametrize("bad", ["missing/b.json", "folder"])
def test_bench_checks_json_before_the_benchmark(run_cli, tmp_path, slab_calls, bad):
    (tmp_path / "folder").mkdir()
    code, _, err = run_cli("bench", "--shape", 4, 32, 32, "--repeat", 1, "--json", tmp_path / bad)
    assert_one_error_line(code, err, tmp_path / bad)
    assert slab_calls == []


def test_bench_gpu_checks_json_before_the_benchmark(run_cli, tmp_path, monkeypatch):
    import xctrt.gpu.bench
    monkeypatch.setattr(xctrt.gpu.bench, "run", never("the GPU benchmark"))
    code, _, err = run_cli("bench", "--gpu", "--host-arrays", "--json", tmp_path / "missing" / "b.json")
    assert_one_error_line(code, err, tmp_path / "missing" / "b.json", "does not exist")


def test_bench_json_written(run_cli, tmp_path):
    import json
    code, _, err = run_cli("bench", "--shape", 4, 32, 32, "--repeat", 1, "--no-progress", "--json",
                           tmp_path / "b.json")
    assert code == 0, err
    res = json.loads((tmp_path / "b.json").read_text())
    assert len(res["runs"]) == 1 and res["best"]["input"]["shape"] == [4, 32, 32]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]


# ------------------------------------------------------------------ phantom names


@pytest.mark.parametrize("name,labels", [("out.npy", None), ("out.png", None), ("out.tif", "truth.npy"),
                                         ("out", None)])
def test_phantom_refuses_a_name_that_is_not_tiff(run_cli, tmp_path, name, labels):
    args = [tmp_path / name] + (["--labels", tmp_path / labels] if labels else [])
    code, _, err = run_cli("phantom", *args, "--shape", 4, 32, 32)
    assert_one_error_line(code, err, tmp_path / (labels or name), ".tif")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["A.TIFF", "big.btf", "big.tf8"])
def test_phantom_takes_every_tiff_name_segment_reads(run_cli, tmp_path, name):
    code, _, err = run_cli("phantom", tmp_path / name, "--shape", 4, 32, 32)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    code, _, err = run_cli("segment", tmp_path / name, "-o", tmp_path / "out", "--no-progress")
    assert code == 0, err


def test_phantom_refuses_labels_onto_the_image(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for image, labels in [("x.tif", "x.tif"), ("x.tif", "sub/../x.tif")]:
        code, _, err = run_cli("phantom", image, "--labels", labels, "--shape", 4, 32, 32)
        assert_one_error_line(code, err, labels, "replace the image")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ slice folders


def png(path: Path, a: np.ndarray) -> Path:
    from PIL import Image
    Image.fromarray(a).save(path)
    return path


def grey_ramp(dtype, shape=(24, 20)) -> np.ndarray:
    top = np.iinfo(dtype).max
    return (np.linspace(0, 1, shape[0] * shape[1]).reshape(shape) * top).astype(dtype)


@pytest.mark.parametrize("first,odd", [(np.uint16, np.uint8), (np.uint8, np.uint16)])
def test_slice_folder_refuses_a_slice_of_another_type(run_cli, tmp_path, first, odd):
    folder = tmp_path / "slices"
    folder.mkdir()
    for i, dt in enumerate([first, odd, first]):
        png(folder / f"s{i}.png", grey_ramp(dt))
    out = tmp_path / "out"
    code, _, err = run_cli("segment", folder, "-o", out, "--no-progress")
    assert_one_error_line(code, err, folder / "s1.png", np.dtype(odd).name, np.dtype(first).name, "s0.png")
    assert not out.exists()


def test_slice_folder_refuses_a_slice_of_another_size(tmp_path):
    from xctrt.io import open_volume
    folder = tmp_path / "slices"
    folder.mkdir()
    png(folder / "s0.png", grey_ramp(np.uint8))
    png(folder / "s1.png", grey_ramp(np.uint8, (20, 24)))
    with open_volume(folder) as src, pytest.raises(XctrtError, match=r"s1.png: slice is uint8 \(20, 24\).*"
                                                                    r"s0.png is uint8 \(24, 20\)"):
        src.read(0, 2)


def test_grey_palette_png_slices_read_as_their_grey_values(tmp_path):
    from PIL import Image

    from xctrt.io import open_volume
    folder = tmp_path / "slices"
    folder.mkdir()
    grey = grey_ramp(np.uint8)
    order = np.random.default_rng(0).permutation(256).astype(np.uint8)   # palette index i shows grey order[i]
    for i in range(2):
        im = Image.fromarray(np.argsort(order)[grey].astype(np.uint8), mode="P")
        im.putpalette(np.repeat(order, 3).tolist())
        im.save(folder / f"s{i}.png")
    with Image.open(folder / "s0.png") as im:
        assert im.mode == "P"
    with open_volume(folder) as src:
        assert src.file_dtype == np.uint8
        np.testing.assert_array_equal(src.read(0, 2), np.stack([grey, grey]))


def test_colour_palette_png_slice_refused(run_cli, tmp_path):
    from PIL import Image
    folder = tmp_path / "slices"
    folder.mkdir()
    png(folder / "s0.png", grey_ramp(np.uint8))
    im = Image.fromarray(grey_ramp(np.uint8), mode="P")
    im.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    im.save(folder / "s1.png")
    code, _, err = run_cli("segment", folder, "-o", tmp_path / "out", "--no-progress")
    assert_one_error_line(code, err, folder / "s1.png", "colour palette")


def test_unreadable_first_slice_is_one_error_line(run_cli, tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    (folder / "s0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code, _, err = run_cli("segment", folder, "-o", tmp_path / "out")
    assert_one_error_line(code, err, folder / "s0.png", "cannot read slice")


# ------------------------------------------------------------------ voxel types


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_64_bit_integer_volumes_are_converted_like_int32(tmp_path, run_cli, dtype):
    from xctrt.io import ArraySource
    a = np.arange(4 * 24 * 20, dtype=dtype).reshape(4, 24, 20) * 7
    src = ArraySource(a)
    assert src.dtype == np.float32 and src.file_dtype == dtype
    np.testing.assert_array_equal(src.read(1, 3), a[1:3].astype(np.float32))
    np.save(tmp_path / "v.npy", a)
    code, _, err = run_cli("segment", tmp_path / "v.npy", "-o", tmp_path / "out", "--no-progress")
    assert code == 0, err
    assert (tmp_path / "out" / "summary.json").is_file()



# ------------------------------------------------------------------ messages


@pytest.mark.parametrize("content,why", [("random", "not a NumPy array file"), ("pickle", "not a NumPy array file"),
                                         ("objects", "holds Python objects")])
def test_npy_that_is_not_numbers_is_named_plainly(run_cli, tmp_path, content, why):
    import pickle
    bad = tmp_path / "v.npy"
    if content == "random":
        bad.write_bytes(np.random.default_rng(0).bytes(1000))
    elif content == "pickle":
        bad.write_bytes(pickle.dumps(np.zeros((2, 3, 4))))
    else:
        np.save(bad, np.full((2, 3, 4), None, dtype=object))
    code, _, err = run_cli("segment", bad, "-o", tmp_path / "out")
    line = assert_one_error_line(code, err, bad, why)
    assert "allow_pickle" not in line and "pickle.load" not in line
    assert not (tmp_path / "out").exists()


def test_a_bad_voxel_size_from_file_metadata_names_the_file(run_cli, tmp_path):
    import tifffile
    bad = tmp_path / "aniso.ome.tif"
    img = np.random.default_rng(0).integers(0, 60000, (4, 32, 32)).astype(np.uint16)
    tifffile.imwrite(bad, img, ome=True, photometric="minisblack",
                     metadata={"axes": "ZYX", "PhysicalSizeZ": 50.0, "PhysicalSizeZUnit": "mm",
                               "PhysicalSizeY": 0.01, "PhysicalSizeYUnit": "mm",
                               "PhysicalSizeX": 0.01, "PhysicalSizeXUnit": "mm"})
    code, _, err = run_cli("segment", bad, "-o", tmp_path / "out")
    line = assert_one_error_line(code, err, "file metadata", "--voxel-size")
    assert line.startswith(f"xctrt: error: {bad}: voxel size ")
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli("segment", bad, "-o", tmp_path / "out", "--voxel-size", "0.01", "--no-progress")
    assert code == 0, err   # the right size given on the command line wins


def test_output_folder_that_is_a_file_or_below_one_says_so(run_cli, phantom_path, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("I am a file")
    code, _, err = run_cli("segment", phantom_path, "-o", afile)
    line = assert_one_error_line(code, err, afile, "exists and is not a folder")
    assert "File exists" not in line
    out = tmp_path / "new" / ".." / "afile" / "sub"
    code, _, err = run_cli("segment", phantom_path, "-o", out)
    line = assert_one_error_line(code, err, out, f"{out.parent} exists and is not a folder", "Not a directory")
    assert "File exists" not in line
    assert afile.read_text() == "I am a file" and not (tmp_path / "new").exists()


def test_output_into_the_input_slice_folder_refused(run_cli, tmp_path, monkeypatch, slab_calls):
    import tifffile
    folder = tmp_path / "slices"
    folder.mkdir()
    for i, page in enumerate(np.random.default_rng(0).integers(0, 60000, (4, 32, 32)).astype(np.uint16)):
        tifffile.imwrite(folder / f"s{i}.tif", page)
    monkeypatch.chdir(tmp_path)
    for out in [folder, "slices/", tmp_path / "slices" / ".." / "slices"]:
        code, _, err = run_cli("segment", folder, "-o", out)
        assert_one_error_line(code, err, Path(out), "input slice folder")
    assert slab_calls == []
    assert sorted(p.name for p in folder.iterdir()) == [f"s{i}.tif" for i in range(4)]
    code, _, err = run_cli("segment", folder, "-o", folder / "out", "--no-progress")   # below it is fine
    assert code == 0, err
    assert sorted(p.name for p in folder.iterdir()) == ["out"] + [f"s{i}.tif" for i in range(4)]


def test_simulate_disk_full_is_one_error_naming_the_file(run_cli, tmp_path, monkeypatch):
    pytest.importorskip("skimage")
    pytest.importorskip("xraydb")
    import xctrt.io
    real = xctrt.io.write_volume_tiff

    def full_on_image(target, pages, shape, dtype, *a, **k):
        if np.dtype(dtype) != np.uint8:
            Path(target).write_bytes(b"II*\0half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(target, pages, shape, dtype, *a, **k)
    monkeypatch.setattr(xctrt.io, "write_volume_tiff", full_on_image)
    out = tmp_path / "sim"
    code, _, err = run_cli("simulate", out, "--shape", 2, 32, 32, "--views", 30, "--voxel-size", 0.05,
                           "--workers", 1, "--no-progress")
    assert_one_error_line(code, err, out / "image.tif", os.strerror(errno.ENOSPC))
    assert not out.exists()
