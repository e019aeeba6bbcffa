"""Acceptance: every bad input, model or output folder ends `xctrt segment BAD -o OUT` with exit code 2,
one stderr line `xctrt: error: ...` naming the culprit, and nothing in OUT that looks like a result
(no labels.tif/defects.csv/preview.png/summary.json, no leftover partial files). A previous complete
run's outputs in OUT survive a failed run unchanged."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

import xctrt.pipeline as pipeline
from conftest import OUTPUT_NAMES
from xctrt.errors import XctrtError
from xctrt.model import EMBEDDED
from xctrt.phantom import write_phantom

LONG = (40, 64, 48)  # more slices than the 16 sampled for the intensity window, several slabs


# ------------------------------------------------------------------ helpers


def assert_one_error_line(code, err, *names, exit_code=2, prefix="xctrt: error: "):
    assert code == exit_code, err
    lines = err.splitlines()
    assert len(lines) == 1, f"stderr must be one line, got {len(lines)}:\n{err}"
    assert lines[0].startswith(prefix), lines[0]
    for n in names:
        assert str(n) in lines[0], f"{n} not named in: {lines[0]}"
    return lines[0]


def assert_no_outputs(out: Path, existed: bool = False):
    """A failed run leaves nothing: OUT is made before any work, and removed again if the run made
    it; a folder that was there before (existed=True) is left, empty."""
    if existed:
        assert sorted(p.name for p in out.iterdir()) == []
    else:
        assert not out.exists(), sorted(p.name for p in out.iterdir())


def segment_fails(run_cli, bad: Path, tmp_path: Path, *needles) -> str:
    """`xctrt segment BAD -o TMP/out` ends with one error line naming BAD (and each needle) and leaves
    no output behind; returns the line."""
    out = tmp_path / "out"
    code, _, err = run_cli("segment", bad, "-o", out)
    line = assert_one_error_line(code, err, bad, *needles)
    assert_no_outputs(out)
    return line


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def cut(path: Path, fraction: float | None = None, size: int | None = None) -> Path:
    data = path.read_bytes()
    bad = path.with_name("bad_" + path.name)
    bad.write_bytes(data[: size if size is not None else int(len(data) * fraction)])
    return bad


@pytest.fixture
def long_phantom(tmp_path) -> Path:
    """A compressed OME-TIFF, page by page (zlib), 40 slices."""
    p = tmp_path / "long.ome.tif"
    write_phantom(p, LONG, seed=3, voxel_size=(0.01, 0.01, 0.01))
    return p


# ------------------------------------------------------------------ (a) truncated TIFF


def test_truncated_tiff(run_cli, long_phantom, tmp_path):
    bad = cut(long_phantom, 0.6)
    out = tmp_path / "out"
    code, stdout, err = run_cli("segment", bad, "-o", out)
    line = assert_one_error_line(code, err, bad)
    assert "truncated or corrupt" in line
    assert "<tifffile" not in line   # what went wrong, not the reader's object repr
    assert stdout == ""
    assert_no_outputs(out)


def test_truncated_tiff_fails_mid_stream(run_cli, long_phantom, tmp_path, slab_calls):
    """Cut inside the last page: the chain of pages is intact, the damage shows only when that page
    is read, after the slabs before it went through the whole pipeline (a fixed window: no sampling)."""
    with tifffile.TiffFile(long_phantom) as tif:
        last = tif.pages[-1]
        size = last.dataoffsets[0] + last.databytecounts[0] // 2
    bad = cut(long_phantom, size=size)
    out = tmp_path / "out"
    code, _, err = run_cli("segment", bad, "-o", out, "--window", "0", "65535", "--slab", "2")
    assert_one_error_line(code, err, bad, "truncated or corrupt", f"slices {LONG[0] - 2}-{LONG[0] - 1}")
    assert len(slab_calls) >= 10, "the error should come after some slabs were segmented"
    assert_no_outputs(out)


def test_damaged_page_data_fails_mid_stream(run_cli, long_phantom, tmp_path, slab_calls):
    with tifffile.TiffFile(long_phantom) as tif:
        page = tif.pages[30]
        start, n = page.dataoffsets[0], page.databytecounts[0]
    data = bytearray(long_phantom.read_bytes())
    data[start + 2:start + n] = np.random.default_rng(0).integers(0, 256, n - 2, dtype=np.uint8).tobytes()
    bad = tmp_path / "damaged.ome.tif"
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    code, _, err = run_cli("segment", bad, "-o", out, "--window", "0", "65535", "--slab", "4")
    assert_one_error_line(code, err, bad, "truncated or corrupt", "slices 28-31")
    assert len(slab_calls) >= 5
    assert_no_outputs(out)


def test_truncated_tiff_in_a_real_process(run_process, long_phantom, tmp_path):
    """Nothing else on stderr either: no library log lines, no progress bar remains."""
    bad = cut(long_phantom, 0.6)
    out = tmp_path / "out"
    code, stdout, err = run_process("segment", bad, "-o", out)
    assert_one_error_line(code, err, bad, "truncated or corrupt")
    assert stdout == ""
    assert_no_outputs(out)


def test_tiff_truncated_at_a_page_boundary(run_cli, long_phantom, tmp_path):
    """Cut exactly where an IFD starts: every remaining page decodes, but slices are missing.
    That must not pass as a shorter volume."""
    with tifffile.TiffFile(long_phantom) as tif:
        offsets = [p.offset for p in tif.pages]
    bad = cut(long_phantom, size=offsets[len(offsets) // 2])
    out = tmp_path / "out"
    code, _, err = run_cli("segment", bad, "-o", out, "--no-progress")
    assert_one_error_line(code, err, bad, "truncated or corrupt")
    assert_no_outputs(out)


def test_truncated_uncompressed_tiff(run_cli, tmp_path):
    src = tmp_path / "plain.tif"
    tifffile.imwrite(src, np.random.default_rng(0).integers(0, 60000, LONG, dtype=np.uint16),
                     photometric="minisblack")
    bad = cut(src, 0.6)
    segment_fails(run_cli, bad, tmp_path)


# ------------------------------------------------------------------ (b) - (d) other bad volumes


def test_2d_image_tiff(run_cli, tmp_path):
    bad = tmp_path / "photo.tif"
    tifffile.imwrite(bad, np.zeros((64, 48), np.uint16))
    segment_fails(run_cli, bad, tmp_path, "2D")


@pytest.mark.parametrize("slice_", [37, 0])
def test_float_volume_with_nans(run_cli, tmp_path, slice_, slab_calls):
    vol = np.random.default_rng(1).random(LONG, dtype=np.float32)
    vol[slice_, 10:20, 5] = np.nan
    bad = tmp_path / "nan.tif"
    tifffile.imwrite(bad, vol, photometric="minisblack")
    out = tmp_path / "out"
    code, _, err = run_cli("segment", bad, "-o", out)
    assert_one_error_line(code, err, bad, f"slice {slice_} contains NaN")
    if slice_ == 37:  # not among the sampled slices: found mid-stream
        assert len(slab_calls) >= 2
    assert_no_outputs(out)


def test_float_npy_with_inf(run_cli, tmp_path):
    vol = np.ones(LONG, np.float64)
    vol[-1, 0, 0] = -np.inf
    bad = tmp_path / "inf.npy"
    np.save(bad, vol)
    segment_fails(run_cli, bad, tmp_path, f"slice {LONG[0] - 1}")


def test_empty_file(run_cli, tmp_path):
    bad = tmp_path / "empty.tif"
    bad.touch()
    segment_fails(run_cli, bad, tmp_path, "empty")


def test_nonexistent_input(run_cli, tmp_path):
    bad = tmp_path / "missing.tif"
    out = tmp_path / "out"
    code, _, err = run_cli("segment", bad, "-o", out)
    assert_one_error_line(code, err, bad, "no such file")
    assert not out.exists()  # nothing created for an input that is not there


@pytest.mark.parametrize("content", [b"hello, I am a text file\n" * 10, b"II*\x00" + b"\xff" * 64, b"MM\x00*garbage"])
def test_not_a_tiff(run_cli, tmp_path, content):
    bad = tmp_path / "fake.tif"
    bad.write_bytes(content)
    segment_fails(run_cli, bad, tmp_path)


def test_wrong_rank_npy(run_cli, tmp_path):
    bad = tmp_path / "4d.npy"
    np.save(bad, np.zeros((2, 3, 16, 16), np.uint8))
    segment_fails(run_cli, bad, tmp_path, "(2, 3, 16, 16)")


def test_unknown_volume_suffix(run_cli, tmp_path):
    bad = tmp_path / "scan.raw"
    bad.write_bytes(b"\0" * 100)
    segment_fails(run_cli, bad, tmp_path, "unknown volume format")


def test_folder_with_no_slices(run_cli, tmp_path):
    bad = tmp_path / "slices"
    bad.mkdir()
    (bad / "scan.log").write_text("x")
    segment_fails(run_cli, bad, tmp_path, "no .tif/.tiff/.png slices")


def test_folder_with_a_damaged_slice(run_cli, tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    for i, s in enumerate(np.random.default_rng(0).integers(0, 255, (20, 32, 32), dtype=np.uint8)):
        tifffile.imwrite(folder / f"s{i}.tif", s)
    (folder / "s17.tif").write_bytes(b"II*\x00broken")
    out = tmp_path / "out"
    code, _, err = run_cli("segment", folder, "-o", out)
    assert_one_error_line(code, err, folder / "s17.tif")
    assert_no_outputs(out)


# ------------------------------------------------------------------ (e) model, backend


def test_tampered_model_package(run_cli, phantom_path, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(EMBEDDED / "untrained-tiny", pkg)
    data = bytearray((pkg / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x10
    (pkg / "model.onnx").write_bytes(bytes(data))
    out = tmp_path / "out"
    code, _, err = run_cli("segment", phantom_path, "-o", out, "-m", pkg)
    assert_one_error_line(code, err, pkg, "sha256")
    assert_no_outputs(out)


def test_model_package_with_an_unloadable_graph(run_cli, phantom_path, tmp_path):
    """sha256 right (the package was written that way), graph bytes not ONNX."""
    from xctrt.model import load_package, write_package
    m = dict(load_package().manifest)
    m.pop("files")
    pkg = write_package(tmp_path / "pkg", m, {"model.onnx": b"not an onnx graph"})
    out = tmp_path / "out"
    code, _, err = run_cli("segment", phantom_path, "-o", out, "-m", pkg)
    assert_one_error_line(code, err, pkg, "ONNX Runtime cannot load")
    assert_no_outputs(out)


def test_missing_model_package(run_cli, phantom_path, tmp_path):
    pkg = tmp_path / "nopkg"
    out = tmp_path / "out"
    code, _, err = run_cli("segment", phantom_path, "-o", out, "-m", pkg)
    assert_one_error_line(code, err, pkg, "not found")
    assert_no_outputs(out)


def test_unknown_backend(run_cli, phantom_path, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run_cli("segment", phantom_path, "-o", out, "--backend", "cuda-magic")
    # rejected by the argument parser, still as one xctrt error line naming the value and the choices
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xctrt: error:")
    assert "--backend" in lines[0] and "cuda-magic" in lines[0] and "onnxruntime" in lines[0]
    assert not out.exists()


def test_backend_not_installed(run_cli, phantom_path, tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_tensorrt(name, *a, **k):
        if name == "tensorrt" or name.startswith("tensorrt."):
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_tensorrt)
    out = tmp_path / "out"
    code, _, err = run_cli("segment", phantom_path, "-o", out, "--backend", "tensorrt")
    assert_one_error_line(code, err, "tensorrt")
    assert_no_outputs(out)


# ------------------------------------------------------------------ (f) output folder


def test_output_under_a_regular_file(run_cli, phantom_path, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("I am a file")
    out = afile / "sub"
    code, _, err = run_cli("segment", phantom_path, "-o", out)
    assert_one_error_line(code, err, out, "not writable")
    assert afile.read_text() == "I am a file"


def test_output_is_a_regular_file(run_cli, phantom_path, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("I am a file")
    code, _, err = run_cli("segment", phantom_path, "-o", afile)
    assert_one_error_line(code, err, afile, "not writable")
    assert afile.read_text() == "I am a file"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_output_folder(run_cli, phantom_path, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        code, _, err = run_cli("segment", phantom_path, "-o", out)
        assert_one_error_line(code, err, out, "not writable")
        assert_no_outputs(out, existed=True)
    finally:
        out.chmod(0o700)


def _enospc_after(n_pages, seen):
    real = pipeline.write_volume_tiff

    def write(target, pages, *a, **k):
        def limited():
            for i, page in enumerate(pages):
                if i == n_pages:
                    seen.append(Path(target).exists())  # the partial file is really on disk
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                yield page
        return real(target, limited(), *a, **k)
    return write


def test_disk_full_while_writing_labels(run_cli, long_phantom, tmp_path, monkeypatch, slab_calls):
    seen = []
    monkeypatch.setattr(pipeline, "write_volume_tiff", _enospc_after(20, seen))
    out = tmp_path / "out"
    code, _, err = run_cli("segment", long_phantom, "-o", out, "--slab", "4")
    assert_one_error_line(code, err, out, "labels.tif", "No space left on device")
    assert seen == [True]
    assert len(slab_calls) >= 5
    assert_no_outputs(out)


def test_disk_full_while_writing_the_preview(run_cli, phantom_path, tmp_path, monkeypatch):
    def full(path, *a, **k):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(pipeline, "write_preview", full)
    out = tmp_path / "out"
    code, _, err = run_cli("segment", phantom_path, "-o", out)
    assert_one_error_line(code, err, out, "No space left on device")
    assert_no_outputs(out)  # the finished labels.tif and defects.csv are discarded too


# ------------------------------------------------------------------ interrupted / internal errors


@pytest.mark.parametrize("exc,code_,prefix", [(KeyboardInterrupt, 130, "xctrt: interrupted"),
                                              (RuntimeError, 3, "xctrt: internal error: RuntimeError")])
def test_interrupted_or_crashed_run_leaves_nothing(run_cli, long_phantom, tmp_path, monkeypatch, exc, code_, prefix):
    real = pipeline.Segmenter.labels_for_slab
    calls = []

    def flaky(self, slab, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise exc("stop")
        return real(self, slab, *a, **k)
    monkeypatch.setattr(pipeline.Segmenter, "labels_for_slab", flaky)
    out = tmp_path / "out"
    code, _, err = run_cli("segment", long_phantom, "-o", out, "--slab", "4")
    assert_one_error_line(code, err, exit_code=code_, prefix=prefix)
    assert_no_outputs(out)


# ------------------------------------------------------------------ earlier results survive


def test_previous_outputs_survive_failed_runs(run_cli, long_phantom, tmp_path, monkeypatch):
    out = tmp_path / "out"
    code, stdout, err = run_cli("segment", long_phantom, "-o", out)
    assert code == 0, err
    assert err == ""
    assert "wrote" in stdout
    before = snapshot(out)
    assert set(before) == OUTPUT_NAMES

    failures = []
    failures.append(run_cli("segment", cut(long_phantom, 0.6), "-o", out))               # bad input
    with tifffile.TiffFile(long_phantom) as tif:
        size = tif.pages[-1].dataoffsets[0] + 10
    failures.append(run_cli("segment", cut(long_phantom, size=size), "-o", out,
                            "--window", "0", "65535", "--slab", "2"))                      # mid-stream
    pkg = tmp_path / "pkg"
    shutil.copytree(EMBEDDED / "untrained-tiny", pkg)
    (pkg / "model.onnx").write_bytes((pkg / "model.onnx").read_bytes()[:-1] + b"\0")
    failures.append(run_cli("segment", long_phantom, "-o", out, "-m", pkg))                # bad model
    with monkeypatch.context() as m:
        m.setattr(pipeline, "write_volume_tiff", _enospc_after(30, []))
        failures.append(run_cli("segment", long_phantom, "-o", out))                        # disk full
    for code, _, err in failures:
        assert_one_error_line(code, err)
    assert snapshot(out) == before


def test_multichannel_single_page_is_named_as_such(run_cli, tmp_path):
    bad = tmp_path / "rgb.tif"
    tifffile.imwrite(bad, np.zeros((32, 32, 3), np.uint8), photometric="rgb")  # one page, 3 samples per pixel
    segment_fails(run_cli, bad, tmp_path, "channel")


# ------------------------------------------------------------------ options out of range


@pytest.mark.parametrize("args, needle", [
    (["segment", "V", "--threads", "-1"], "argument --threads: must be an integer >= 0"),
    (["segment", "V", "--min-voxels", "-1"], "argument --min-voxels: must be an integer >= 0"),
    (["segment", "V", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["segment", "V", "--slab", "x"], "argument --slab: invalid integer >= 1 value"),
    (["segment", "V", "--window", "0", "inf"], "argument --window: must be a finite number"),
    (["segment", "V", "--voxel-size", "1e300"], "1e-6 to 1e4"),
    (["segment", "V", "--voxel-size", "1e-300"], "1e-6 to 1e4"),
    (["segment", "V", "--voxel-size", "nan"], "positive and finite"),
    (["bench", "--repeat", "0"], "argument --repeat: must be an integer >= 1"),
    (["bench", "--shape", "0", "64", "64"], "argument --shape: must be an integer >= 1"),
    (["phantom", "O.tif", "--shape", "4", "-8", "8"], "argument --shape: must be an integer >= 1"),
    (["phantom", "O.tif", "--seed", "-1"], "argument --seed: must be an integer >= 0"),
    (["phantom", "O.tif", "--voxel-size", "0"], "argument --voxel-size: 0: voxel_size entries must be positive"),
    (["domain-shift", "A", "B", "--seed", "-1"], "argument --seed: must be an integer >= 0"),
    (["bench", "V", "--shape", "4", "64", "64"], "either VOLUME or a generated volume of --shape"),
    (["segment", "V", "--voxel-size", "fine"], "argument --voxel-size: must be a number (mm), got fine"),
    (["segment", "V", "--window", "0", "bright"], "argument --window: must be a finite number, got bright"),
])
def test_options_out_of_range_are_one_usage_line(run_cli, tmp_path, args, needle):
    """Checked while parsing, before any file is read or written: one line, exit code 2, nothing made."""
    args = [str(tmp_path / a) if a in ("V", "O.tif", "A", "B") else a for a in args]
    code, _, err = run_cli(*args)
    assert_one_error_line(code, err, needle)
    assert sorted(tmp_path.iterdir()) == []


def test_segmenter_threads_and_min_voxels(phantom_path, tmp_path):
    with pytest.raises(XctrtError, match="threads and min_voxels must be >= 0"):
        pipeline.Segmenter(progress=False, threads=-1)
    with pytest.raises(XctrtError, match="threads and min_voxels must be >= 0"):
        pipeline.Segmenter(progress=False, min_voxels=-1)
    with pytest.raises(XctrtError, match="finite numbers low < high"):
        pipeline.Segmenter(progress=False, window=(0.0, float("inf")))
    # more threads than the process may use count as all (0) instead of starting 100000 of them
    seg = pipeline.Segmenter(progress=False, threads=100_000)
    assert seg.threads == 0
    assert pipeline.Segmenter(progress=False, threads=None).threads == 0   # None, as 0: all
    assert seg.segment(phantom_path).summary["run"]["threads"] == 0


def test_gpu_path_without_torch_is_one_line(run_cli, phantom_path, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "torch", None)   # `import torch` now fails as if not installed
    out = tmp_path / "out"
    for args in (["segment", phantom_path, "-o", out, "--device", "cuda"], ["bench", "--gpu"],
                 ["bench", "--gpu", "--host-arrays"]):
        code, _, err = run_cli(*args)
        assert_one_error_line(code, err, "the GPU path needs torch")
        assert not out.exists()


def test_sigterm_cleans_up_like_ctrl_c(run_cli, long_phantom, tmp_path, monkeypatch):
    """SIGTERM (timeout, systemd, kill) mid-run: exit 143, one line, nothing left behind."""
    import signal
    real = pipeline.Segmenter.labels_for_slab
    calls = []

    def terminated_midway(self, slab, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)   # the handler raises in this (the main) thread
        return real(self, slab, *a, **k)
    monkeypatch.setattr(pipeline.Segmenter, "labels_for_slab", terminated_midway)
    import xctrt.cli
    # as in a process that imported xctrt, then forked and called main(): main() itself notes the process
    monkeypatch.setattr(xctrt.cli, "_main_pid", -1)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    code, _, err = run_cli("segment", long_phantom, "-o", out, "--slab", "4")
    assert_one_error_line(code, err, exit_code=143, prefix="xctrt: terminated")
    assert_no_outputs(out)
    assert signal.getsignal(signal.SIGTERM) is before   # main() puts the previous handler back


def test_stdout_closed_by_the_reader_is_not_an_error(tmp_path):
    """`xctrt info | head -1`: the reader goes away; xctrt ends quietly, as SIGPIPE ends Unix tools."""
    import subprocess
    import sys
    from conftest import xctrt_env
    p = subprocess.Popen([sys.executable, "-m", "xctrt", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=xctrt_env(), cwd=tmp_path)
    p.stdout.close()   # before xctrt has imported anything, so its first print meets a closed pipe
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err
    assert err == ""
