"""The streaming pipeline: labels, defect table, files, and invariance to slab/batch/thread settings."""
from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import (OUTPUT_NAMES, PHANTOM_SHAPE, PHANTOM_VOXEL, outside_air_reference, phantom_array,
                      surface_distance_reference)
from xctrt import _core
from xctrt.cpus import usable_cpus
from xctrt.errors import XctrtError
from xctrt.io import ArraySource, open_volume
from xctrt.model import load_package, write_package
from xctrt.pipeline import Segmenter

LABELS = {0, 1, 2, 3}
# With its own percentile window the untrained model finds one pore and one inclusion in the
# phantom; this window makes it report 150+ pores, so the table checks below have rows to check.
RICH = (6000, 30000)


@pytest.fixture(scope="module")
def rich():
    """A segmenter whose labels on the phantom hold many defects (do not mutate)."""
    return make_segmenter(window=RICH)


@pytest.fixture(scope="module")
def reference(rich, phantom_volume):
    """The in-memory result on the phantom (min_voxels=1, connectivity 26, slab 8, batch 8)."""
    return rich.segment(phantom_volume)


@pytest.fixture(scope="module")
def wide_volume():
    """Slices larger than one 256 tile in both directions (2 x 2 overlapping tiles per slice)."""
    return phantom_array((5, 300, 270), seed=2)


def make_segmenter(package=None, **kw):
    kw.setdefault("backend", "onnxruntime")
    kw.setdefault("progress", False)
    return Segmenter(package if package is not None else load_package(), **kw)


def by_hand(seg: Segmenter, volume: np.ndarray) -> np.ndarray:
    """The stages called one by one, one slice per engine call."""
    pkg = seg.package
    lo, hi = seg.intensity_window(ArraySource(volume))
    thresholds = np.array([c.threshold for c in pkg.classes], np.float32)
    ids = np.array([c.id for c in pkg.classes], np.uint8)
    prio = np.array(pkg.priority, np.int64)
    out = np.empty(volume.shape, np.uint8)
    h, w = volume.shape[1:]
    for i, s in enumerate(volume):
        s = np.ascontiguousarray(s)
        if pkg.input_mode == "tile":
            tiles = _core.extract_tiles(s, pkg.input_size, pkg.overlap, lo, hi, pkg.pad)
            probs = seg.engine.run(np.ascontiguousarray(tiles[:, None]))
            full = _core.stitch_tiles(probs, h, w, pkg.overlap, pkg.blend)
        else:
            x = _core.resize_bilinear(_core.window(s, lo, hi), pkg.input_size, pkg.input_size)
            probs = seg.engine.run(np.ascontiguousarray(x[None, None]))
            full = _core.resize_bilinear(probs[0], h, w)
        out[i] = _core.aggregate(full, thresholds, ids, prio, pkg.aggregation)
    return out


def class_counts(labels):
    return np.bincount(labels.ravel(), minlength=4)


# ------------------------------------------------------------------ in memory


def test_labels_shape_dtype_and_values(reference, phantom_volume):
    lab = reference.labels
    assert lab.shape == phantom_volume.shape and lab.dtype == np.uint8
    assert set(np.unique(lab).tolist()) <= LABELS
    # the fixture must exercise the defect classes, or the checks below prove little
    assert class_counts(lab)[2] > 0 and class_counts(lab)[3] > 0
    assert (reference.defects["class"] == 2).sum() > 50
    assert reference.outputs == {}


def test_defect_table_agrees_with_the_labels(reference):
    lab, t = reference.labels, reference.defects
    n = len(t["id"])
    assert n > 0 and all(len(v) == n for v in t.values())
    assert sorted(t["id"].tolist()) == list(range(1, n + 1))
    counts = class_counts(lab)
    for cls in (2, 3):
        sel = t["class"] == cls
        assert int(t["voxels"][sel].sum()) == counts[cls], f"class {cls}"
        for z0, y0, x0, z1, y1, x1, v in zip(*(t[k][sel] for k in (
                "bbox_z0", "bbox_y0", "bbox_x0", "bbox_z1", "bbox_y1", "bbox_x1", "voxels"))):
            box = lab[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1]
            assert (box == cls).sum() >= v  # the component lies inside its (inclusive) box
    assert set(t["class"].tolist()) <= {2, 3}
    # volumes in mm3 with the unit voxel size of a bare array
    np.testing.assert_allclose(t["volume"], t["voxels"].astype(float))
    vpc = reference.summary["result"]["voxels_per_class"]
    assert [vpc["air"], vpc["material"], vpc["pore"], vpc["inclusion"]] == counts.tolist()
    assert reference.summary["result"]["defects"]["pore"]["count"] == int((t["class"] == 2).sum())


def test_min_voxels_drops_small_defects(reference, phantom_volume):
    t = reference.defects
    cut = int(np.median(t["voxels"])) + 1
    seg = make_segmenter(window=RICH, min_voxels=cut)
    res = seg.segment(phantom_volume)
    np.testing.assert_array_equal(res.labels, reference.labels)  # labels are not filtered
    assert sorted(res.defects["voxels"].tolist()) == sorted(v for v in t["voxels"].tolist() if v >= cut)
    assert len(res.defects["id"]) < len(t["id"])


@pytest.mark.parametrize("kw", [
    {"slab": 1}, {"slab": 3}, {"slab": 100},
    {"batch_size": 1}, {"batch_size": 5}, {"batch_size": 64},
    {"threads": 1}, {"threads": 2},
    {"slab": 3, "batch_size": 5, "threads": 1},
])
def test_result_does_not_depend_on_slab_batch_or_threads(reference, phantom_volume, kw):
    res = make_segmenter(window=RICH, **kw).segment(phantom_volume)
    np.testing.assert_array_equal(res.labels, reference.labels)
    for k, v in reference.defects.items():
        np.testing.assert_array_equal(res.defects[k], v, err_msg=k)
    assert res.summary["result"] == reference.summary["result"]
    for k, v in kw.items():   # (more threads than this process may use run, and read, as all: 0)
        assert res.summary["run"][k] == (0 if k == "threads" and v > usable_cpus() else v)


@pytest.mark.parametrize("kw", [{"slab": 1, "batch_size": 1}, {"slab": 2, "batch_size": 3}, {"slab": 5, "batch_size": 64}])
def test_multi_tile_slices_match_the_stages_called_by_hand(wide_volume, kw):
    seg = make_segmenter(**kw)
    res = seg.segment(wide_volume)
    np.testing.assert_array_equal(res.labels, by_hand(seg, wide_volume))


@pytest.mark.parametrize("which", ["default", "rich"])
def test_single_tile_slices_match_the_stages_called_by_hand(segmenter, rich, reference, phantom_volume, which):
    if which == "rich":
        np.testing.assert_array_equal(reference.labels, by_hand(rich, phantom_volume))
    else:
        np.testing.assert_array_equal(segmenter.segment(phantom_volume).labels, by_hand(segmenter, phantom_volume))


def test_labels_for_slab_is_the_per_slice_pipeline(rich, reference, phantom_volume):
    window = rich.intensity_window(ArraySource(phantom_volume))
    assert window == RICH
    lab = rich.labels_for_slab(np.ascontiguousarray(phantom_volume[4:7]), window)
    np.testing.assert_array_equal(lab, reference.labels[4:7])


@pytest.mark.parametrize("value,dtype", [(1000, np.uint16), (0.7, np.float32), (200, np.uint8)])
def test_constant_volume_gives_one_label_per_slice(segmenter, value, dtype):
    v = np.full((3, 70, 90), value, dtype)
    lab = segmenter.segment(v).labels
    assert lab.shape == v.shape
    assert all(len(np.unique(s)) == 1 for s in lab)
    assert len(np.unique(lab)) == 1  # every slice is the same input
    lo, hi = segmenter.intensity_window(ArraySource(v))  # a flat volume still gets a valid window
    assert lo == float(np.asarray(value, dtype)) and hi == lo + 1.0


def test_percentile_window_uses_sampled_slices(segmenter, phantom_volume):
    lo, hi = segmenter.intensity_window(ArraySource(phantom_volume))
    sample = phantom_volume[:, ::2, ::2].astype(np.float32)  # 12 slices: all of them are sampled
    assert (lo, hi) == pytest.approx(tuple(np.percentile(sample, [0.5, 99.5])))
    assert lo < hi


def test_window_override_is_used(segmenter, phantom_volume):
    seg = make_segmenter(segmenter.package, window=(1000, 30000))
    res = seg.segment(phantom_volume)
    assert res.summary["run"]["intensity_window"] == [1000.0, 30000.0]
    assert seg.intensity_window(ArraySource(phantom_volume)) == (1000.0, 30000.0)
    np.testing.assert_array_equal(res.labels, by_hand(seg, phantom_volume))


def test_on_slab_sees_every_slab_once_in_order(reference, phantom_volume):
    seen = []
    res = make_segmenter(slab=5, window=RICH).segment(
        phantom_volume, on_slab=lambda z0, img, lab: seen.append((z0, img.copy(), lab.copy())))
    assert [z for z, _, _ in seen] == [0, 5, 10]
    assert [len(lab) for _, _, lab in seen] == [5, 5, 2]
    np.testing.assert_array_equal(np.concatenate([img for _, img, _ in seen]), phantom_volume)
    np.testing.assert_array_equal(np.concatenate([lab for _, _, lab in seen]), reference.labels)
    np.testing.assert_array_equal(res.labels, reference.labels)


def test_on_slab_gets_read_only_arrays(rich, phantom_volume, tmp_path):
    """The callback cannot change the caller's volume through the image, nor labels.tif behind the table."""
    volume = phantom_volume.copy()   # writable, as a caller's array usually is
    attempts = []

    def scribble(z0, img, lab):
        for a in (img, lab):
            assert not a.flags.writeable
            try:
                a[:] = 0
            except ValueError:
                attempts.append(z0)
    res = rich.segment(volume, out_dir=tmp_path / "out", on_slab=scribble, keep_labels=True)
    assert len(attempts) == 2 * len(range(0, volume.shape[0], rich.slab))
    np.testing.assert_array_equal(volume, phantom_volume)
    with tifffile.TiffFile(tmp_path / "out" / "labels.tif") as tif:
        np.testing.assert_array_equal(tif.asarray(), res.labels)


@pytest.mark.parametrize("where", ["components", "table", "on_slab"])
def test_a_components_thread_failure_is_the_runs_error(rich, phantom_volume, tmp_path, monkeypatch, where):
    """The components (and then the table) run on a thread of their own: a failure there, in the
    labeller, the table or the caller's on_slab, is the run's error, no output folder is left looking
    complete, and none of the run's threads outlives it."""
    import threading

    from xctrt.defects import DefectCounter

    def broken(*args, **kwargs):
        raise RuntimeError(f"{where} broke")
    if where == "components":
        monkeypatch.setattr(DefectCounter, "add_slab", broken)
    elif where == "table":
        monkeypatch.setattr(DefectCounter, "finish", broken)
    with pytest.raises(RuntimeError, match=f"{where} broke"):
        rich.segment(phantom_volume, out_dir=tmp_path / "out", on_slab=broken if where == "on_slab" else None)
    assert not (tmp_path / "out").exists()
    for t in threading.enumerate():
        assert not t.name.startswith("xctrt-"), t.name


def test_the_first_slabs_are_read_while_the_stage_is_made(rich, phantom_volume, tmp_path, monkeypatch):
    """The reader starts before the compute stage is made (on the GPU that takes its kernels' self-check),
    so the first slab is read meanwhile; a stage that cannot be made is the run's error, stops the reader
    and leaves no output folder and no thread behind."""
    import threading

    first_read = threading.Event()
    slabs = ArraySource.slabs

    def watched(self, n):
        for item in slabs(self, n):
            first_read.set()
            yield item
    monkeypatch.setattr(ArraySource, "slabs", watched)
    make_stage = Segmenter._compute_stage

    def waits_for_the_reader(self, *args, **kwargs):
        assert first_read.wait(timeout=30), "no slab read while the stage was made"
        return make_stage(self, *args, **kwargs)
    monkeypatch.setattr(Segmenter, "_compute_stage", waits_for_the_reader)
    res = rich.segment(phantom_volume, keep_labels=True)
    assert res.labels.shape == phantom_volume.shape and first_read.is_set()

    def broken(self, *args, **kwargs):
        assert first_read.wait(timeout=30)
        raise XctrtError("no stage today")
    first_read.clear()
    monkeypatch.setattr(Segmenter, "_compute_stage", broken)
    with pytest.raises(XctrtError, match="no stage today"):
        rich.segment(phantom_volume, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for t in threading.enumerate():
        assert not t.name.startswith("xctrt-"), t.name


def test_segment_and_segmenter_refuse_wrong_argument_types(phantom_volume):
    seg = make_segmenter()
    for bad in ([[[1]]], 5, None):
        with pytest.raises(XctrtError, match="volume must be an array"):
            seg.segment(bad)
    with pytest.raises(XctrtError, match="on_slab must be a function"):
        seg.segment(phantom_volume, on_slab=5)
    with pytest.raises(XctrtError, match="voxel size must be one number or three"):
        seg.segment(phantom_volume, voxel_size="fine")
    for kw in ({"batch_size": 2.5}, {"slab": 2.5}, {"threads": 1.5}, {"min_voxels": 2.5}, {"batch_size": "4"},
               {"slab": True}):
        with pytest.raises(XctrtError, match=f"{next(iter(kw))} must be a whole number"):
            make_segmenter(**kw)
    for window in ((1,), 5, ("a", "b"), (0, float("inf")), (float("nan"), 1), (3, 2)):
        with pytest.raises(XctrtError, match="intensity window must be two finite numbers low < high"):
            make_segmenter(window=window)
    assert make_segmenter(batch_size=np.int64(2), slab=np.int32(3)).batch_size == 2


def test_one_voxel_size_number_means_isotropic(rich, phantom_volume):
    a = rich.segment(phantom_volume, voxel_size=0.02)
    b = rich.segment(phantom_volume, voxel_size=(0.02, 0.02, 0.02))
    assert a.summary["input"]["voxel_size_mm"] == [0.02, 0.02, 0.02]
    np.testing.assert_array_equal(a.defects["volume"], b.defects["volume"])
    assert rich.segment(phantom_volume, voxel_size=np.float64(0.02)).summary["input"]["voxel_size_mm"] == [0.02] * 3


def test_leading_singleton_axes_of_an_array_are_dropped(rich, phantom_volume, reference):
    np.testing.assert_array_equal(rich.segment(phantom_volume[None, None]).labels, reference.labels)


def test_keep_labels_false_returns_no_volume(rich, phantom_volume, reference):
    res = rich.segment(phantom_volume, keep_labels=False)
    assert res.labels is None
    np.testing.assert_array_equal(res.defects["voxels"], reference.defects["voxels"])


def test_voxel_size_given_scales_the_table(rich, phantom_volume, reference):
    vs = (0.5, 0.2, 0.1)
    res = rich.segment(phantom_volume, voxel_size=vs)
    assert res.summary["input"]["voxel_size_from"] == "given"
    assert res.summary["result"]["unit"] == "mm"
    np.testing.assert_allclose(res.defects["volume"], reference.defects["voxels"] * np.prod(vs))
    with pytest.raises(XctrtError, match=r"voxel size .*positive and finite.*--voxel-size"):
        rich.segment(phantom_volume, voxel_size=(0.1, 0, 0.1))
    with pytest.raises(XctrtError, match="three numbers"):
        rich.segment(phantom_volume, voxel_size=(0.1, 0.1))
    with pytest.raises(XctrtError, match="factor 1000.*--voxel-size"):
        rich.segment(phantom_volume, voxel_size=(10.0, 0.001, 0.001))


def test_bad_voxel_size_leaves_no_output_folder(rich, phantom_volume, tmp_path):
    for vs in [(0.1, 0.0, 0.1), (10.0, 0.001, 0.001)]:
        with pytest.raises(XctrtError, match="voxel size"):
            rich.segment(phantom_volume, out_dir=tmp_path / "out", voxel_size=vs)
        assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ files


def test_summary_timeline_and_its_figure(rich, phantom_path, tmp_path):
    """summary.json's timeline: each stage's spans within the run, adding up to its busy seconds (the
    report's spans too, made after the others), and benchmarks/timeline_figure.py draws them where
    they are: a stage's colour at the middle of its first span, in its row."""
    from conftest import load_benchmark

    out = tmp_path / "out"
    res = rich.segment(phantom_path, out_dir=out)
    text = (out / "summary.json").read_text()
    summary = json.loads(text)
    assert summary == json.loads(json.dumps(res.summary))   # the file holds the run's summary
    assert list(summary)[-1] == "timeline"   # last, one span per line
    rows = summary["timeline"]
    lines = text.splitlines()
    assert lines[-1] == "}" and lines[-2] == "  ]" and len(lines) < 400 + len(rows)
    assert all(json.loads(line.strip().rstrip(",")) == row for line, row in zip(lines[-2 - len(rows):-2], rows))
    t = summary["timing"]
    assert all(0 <= a <= b <= t["total_s"] + 1e-3 for _, a, b in rows)
    for stage in ("read", "tile", "infer", "components", "table", "report"):
        spans = [(a, b) for name, a, b in rows if name == stage]
        assert spans, stage
        assert sum(b - a for a, b in spans) == pytest.approx(t["stage_busy_s"][stage], abs=2e-3), stage
    assert max(b for name, _, b in rows if name == "report") > max(b for name, _, b in rows if name == "read")
    # labels.tif: one span per slab but the last, whose span runs on to the file's close (write_close)
    writes = [(a, b) for name, a, b in rows if name == "write"]
    (close,) = [(a, b) for name, a, b in rows if name == "write_close"]
    slabs = -(-res.summary["input"]["shape"][0] // rich.slab)
    assert len(writes) == slabs - 1 and all(a <= close[0] for a, _ in writes)

    fig = load_benchmark("timeline_figure")
    png = tmp_path / "timeline.png"
    layout = fig.main([str(out / "summary.json"), str(png)])
    (title, lay), = layout.items()
    img = Image.open(png).convert("RGB")
    for stage in ("read", "infer", "components", "report"):
        a, b = next((a, b) for name, a, b in rows if name == stage)
        x = lay["left"] + int((a + b) / 2 * lay["scale"])
        y = lay["top"] + lay["rows"].index(stage) * lay["row_h"] + lay["row_h"] // 2
        assert img.getpixel((x, y)) == fig.colour(stage), stage
    assert lay["rows"][0] == "read" and lay["rows"][-1].startswith("main ")
    with pytest.raises(SystemExit, match="no run with a timeline"):
        fig.runs_of({"modes": {"paper": {"ours": {"slices": 1}}}})
    with pytest.raises(SystemExit, match="no timeline in this summary.json"):
        fig.runs_of({k: v for k, v in summary.items() if k != "timeline"})


def test_runs_freeze_what_came_before_out_of_the_garbage_collector(rich, phantom_volume, tmp_path, monkeypatch):
    """During a run the objects that existed before it are frozen out of the collector's passes (a full
    pass over torch's objects stalls a thread for tenths of a second); each full pass that still
    happens is a "gc" span of the timeline; the freeze ends with the run, also when it fails."""
    import gc

    from xctrt.defects import DefectCounter
    from xctrt.timing import CollectorWatch

    assert gc.get_freeze_count() == 0
    callbacks, seen = list(gc.callbacks), []

    def on_slab(z0, img, lab):
        seen.append(gc.get_freeze_count())
        if z0 == 0:
            gc.collect()   # a full pass, as the collector's own thresholds would set off

    res = rich.segment(phantom_volume, on_slab=on_slab)
    assert min(seen) > 1000 and gc.get_freeze_count() == 0
    info = res.summary["timing"]["garbage_collector"]   # frozen at the start (frozen objects may be freed since)
    assert info["frozen_objects"] >= max(seen) and info["passes"][2] >= 1 and info["seconds"][2] > 0
    spans = [(a, b) for name, a, b in res.summary["timeline"] if name == "gc"]
    assert len(spans) == info["passes"][2] and all(0 <= a <= b for a, b in spans)

    with CollectorWatch():   # runs in parallel share one freeze: the last to end lifts it
        # (frozen objects may still be freed meanwhile, a few at most; a lifted freeze would leave none)
        frozen = gc.get_freeze_count()
        assert rich.segment(phantom_volume).summary["timing"]["garbage_collector"]["frozen_objects"] > frozen * 0.99
        assert gc.get_freeze_count() > frozen * 0.99
    assert gc.get_freeze_count() == 0

    def broken(*args, **kwargs):
        raise RuntimeError("components broke")

    monkeypatch.setattr(DefectCounter, "add_slab", broken)
    with pytest.raises(RuntimeError, match="components broke"):
        rich.segment(phantom_volume, out_dir=tmp_path / "out")
    assert gc.get_freeze_count() == 0 and gc.callbacks == callbacks


def test_out_dir_writes_exactly_the_four_outputs(rich, phantom_path, reference, tmp_path):
    out = tmp_path / "out"
    res = rich.segment(phantom_path, out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_NAMES)  # no *.partial, no write check
    assert set(res.outputs) == OUTPUT_NAMES and all(p.parent == out for p in res.outputs.values())
    assert res.labels is None  # not kept by default when writing files

    with open_volume(out / "labels.tif") as src:
        assert src.shape == PHANTOM_SHAPE and src.file_dtype == np.uint8
        assert src.voxel_size == pytest.approx(PHANTOM_VOXEL)
        labels = src.read(0, src.shape[0])
    np.testing.assert_array_equal(labels, reference.labels)

    summary = json.loads((out / "summary.json").read_text())
    counts = class_counts(labels)
    assert summary["result"]["porosity_percent"] == pytest.approx(100 * counts[2] / counts[1:].sum())
    assert summary["result"]["inclusion_percent"] == pytest.approx(100 * counts[3] / counts[1:].sum())
    assert summary["result"]["part_volume"] == pytest.approx(counts[1:].sum() * np.prod(PHANTOM_VOXEL))
    assert summary["input"]["voxel_size_mm"] == pytest.approx(list(PHANTOM_VOXEL))
    assert summary["input"]["voxel_size_from"] == "file metadata"
    assert summary["input"]["shape"] == list(PHANTOM_SHAPE) and summary["input"]["dtype"] == "uint16"
    assert summary["outputs"] == ["labels.tif", "defects.csv", "preview.png", "summary.json"]
    assert summary["model"]["trained"] is False

    rows = list(csv.DictReader((out / "defects.csv").open()))
    t = reference.defects
    assert len(rows) == len(t["id"])
    assert "volume_mm3" in rows[0] and "equivalent_diameter_mm" in rows[0]
    for cls, name in ((2, "pore"), (3, "inclusion")):
        assert sum(int(r["voxels"]) for r in rows if r["class"] == name) == counts[cls]
    vol = sum(float(r["volume_mm3"]) for r in rows)
    assert vol == pytest.approx((counts[2] + counts[3]) * np.prod(PHANTOM_VOXEL), rel=1e-5)
    # Distance to the part surface, recomputed from the written labels with SciPy.
    want = surface_distance_reference(labels, _core.label_volume(labels, [2, 3], 26), PHANTOM_VOXEL)
    # (The random-weight model draws no air at the phantom's border: no outside, empty cells.)
    got = [float(r["surface_distance_mm"] or "nan") for r in rows]
    np.testing.assert_allclose(got, want, rtol=1e-5, equal_nan=True)
    for name in ("pore", "inclusion"):
        ours = [g for g, r in zip(got, rows) if r["class"] == name and np.isfinite(g)]
        entry = summary["result"]["defects"][name]
        assert (entry["surface_distance_mm"]["min"] == pytest.approx(min(ours), rel=1e-5) if ours
                else "surface_distance_mm" not in entry)

    with Image.open(out / "preview.png") as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.width > 100 and im.height > 100


def test_a_second_run_replaces_the_outputs(segmenter, phantom_path, tmp_path):
    out = tmp_path / "out"
    segmenter.segment(phantom_path, out_dir=out)
    first = (out / "labels.tif").read_bytes()
    segmenter.segment(phantom_path, out_dir=out, voxel_size=(1.0, 1.0, 1.0))
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_NAMES)
    assert json.loads((out / "summary.json").read_text())["input"]["voxel_size_mm"] == [1.0, 1.0, 1.0]
    with open_volume(out / "labels.tif") as src:
        assert src.voxel_size == pytest.approx((1.0, 1.0, 1.0))
    assert (out / "labels.tif").read_bytes() != first


def test_unknown_voxel_size_gives_sizes_in_voxels(segmenter, phantom_volume, tmp_path):
    p = tmp_path / "v.npy"
    np.save(p, phantom_volume)
    out = tmp_path / "out"
    res = segmenter.segment(p, out_dir=out)
    assert res.summary["input"]["voxel_size_mm"] is None
    assert res.summary["result"]["unit"] == "vox"
    header = (out / "defects.csv").read_text().splitlines()[0].split(",")
    assert "volume_vox3" in header and "volume_mm3" not in header
    with open_volume(out / "labels.tif") as src:
        assert src.voxel_size is None  # none invented


def test_keep_labels_with_out_dir(rich, phantom_path, reference, tmp_path):
    res = rich.segment(phantom_path, out_dir=tmp_path / "o", keep_labels=True)
    np.testing.assert_array_equal(res.labels, reference.labels)


# ------------------------------------------------------------------ manifest variants


@pytest.fixture(scope="module")
def base_manifest(default_package):
    m = copy.deepcopy(default_package.manifest)
    m.pop("files")
    return m, {g.file: g.data for g in default_package.graphs}


def test_resize_input_mode(tmp_path, base_manifest, phantom_volume, wide_volume):
    m, files = base_manifest
    pkg_dir = write_package(tmp_path / "resize", dict(m, input=dict(m["input"], mode="resize")), files)
    seg = make_segmenter(load_package(pkg_dir), batch_size=3, slab=4)
    assert seg.package.input_mode == "resize"
    for vol in (phantom_volume, wide_volume):
        res = seg.segment(vol)
        assert res.labels.shape == vol.shape and res.labels.dtype == np.uint8
        assert set(np.unique(res.labels).tolist()) <= LABELS
        np.testing.assert_array_equal(res.labels, by_hand(seg, vol))


def test_fixed_intensity_window_from_the_manifest(tmp_path, base_manifest, phantom_volume):
    m, files = base_manifest
    window = {"mode": "fixed", "low": 2000, "high": 25000}
    seg = make_segmenter(load_package(write_package(tmp_path / "fixed", dict(m, intensity_window=window), files)))
    res = seg.segment(phantom_volume)
    assert res.summary["run"]["intensity_window"] == [2000.0, 25000.0]
    # the same as overriding the window on the default package
    same = make_segmenter(window=(2000, 25000)).segment(phantom_volume)
    np.testing.assert_array_equal(res.labels, same.labels)
    other = make_segmenter().segment(phantom_volume)
    assert other.summary["run"]["intensity_window"] != [2000.0, 25000.0]


def test_argmax_aggregation_package(tmp_path, base_manifest, phantom_volume):
    m, files = base_manifest
    seg = make_segmenter(load_package(write_package(tmp_path / "argmax", dict(m, aggregation="argmax"), files)))
    res = seg.segment(phantom_volume)
    np.testing.assert_array_equal(res.labels, by_hand(seg, phantom_volume))


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize("kw,match", [
    ({"batch_size": 0}, "at least 1"), ({"slab": 0}, "at least 1"),
    ({"connectivity": 4}, "connectivity"), ({"window": (5, 5)}, "low < high"),
    ({"backend": "cuda-magic"}, "unknown backend"),
])
def test_bad_settings_are_xctrt_errors(default_package, kw, match):
    with pytest.raises(XctrtError, match=match):
        Segmenter(default_package, progress=False, **kw)


def test_default_batch_follows_where_the_model_runs(default_package, monkeypatch):
    from xctrt import pipeline
    assert [pipeline.default_batch_size("cpu", t) for t in (1, 2, 3, 4, 8, 16, 64)] == [1, 1, 1, 2, 4, 8, 8]
    assert pipeline.default_batch_size("cuda", 2) == 8
    monkeypatch.setattr(pipeline, "usable_cpus", lambda: 6)   # threads 0: all cores this process may use
    assert pipeline.default_batch_size("cpu", 0) == 3
    seg = Segmenter(default_package, progress=False, threads=2)
    assert seg.engine.device == "cpu" and seg.batch_size == 1
    assert Segmenter(default_package, progress=False, threads=2, batch_size=5).batch_size == 5


@pytest.mark.parametrize("connectivity", [6, 18])
def test_connectivity_changes_only_the_table(phantom_volume, reference, connectivity):
    res = make_segmenter(connectivity=connectivity, window=RICH).segment(phantom_volume)
    np.testing.assert_array_equal(res.labels, reference.labels)
    assert res.defects["voxels"].sum() == reference.defects["voxels"].sum()
    assert len(res.defects["id"]) >= len(reference.defects["id"])  # fewer neighbours never merge more


def test_summary_records_absolute_paths(rich, phantom_path, tmp_path, monkeypatch):
    monkeypatch.chdir(phantom_path.parent)
    summary = rich.segment(phantom_path.name).summary
    assert summary["input"]["path"] == str(phantom_path.absolute())
    assert Path(summary["model"]["path"]).is_absolute()
    assert rich.segment(np.zeros((2, 40, 40), np.uint16)).summary["input"]["path"] == "<array>"


def test_fill_enclosed_air(phantom_volume, tmp_path):
    """--fill-enclosed-air: exactly the air not reaching the view's y/x sides becomes material, in the labels,
    labels.tif (rewritten, nothing left beside it) and the summary; the defect table is the same."""
    plain = make_segmenter().segment(phantom_volume)
    lab = plain.labels
    enclosed = (lab == 0) & ~outside_air_reference(lab)
    assert enclosed.any(), "the tiny model's labels on the phantom should enclose some air"
    assert plain.summary["result"]["enclosed_air_voxels"] == enclosed.sum()
    assert plain.summary["result"]["enclosed_air_filled_voxels"] is None
    want = np.where(enclosed, 1, lab).astype(np.uint8)
    seg = make_segmenter(fill_enclosed_air=True)
    res = seg.segment(phantom_volume, out_dir=tmp_path / "out", voxel_size=0.02)   # labels.tif read back to fill
    assert res.labels is None
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "labels.tif"), want)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(OUTPUT_NAMES)
    r = res.summary["result"]
    assert r["enclosed_air_filled_voxels"] == enclosed.sum() and r["enclosed_air_voxels"] == 0
    assert r["voxels_per_class"]["air"] == (want == 0).sum() and r["voxels_per_class"]["material"] == (want == 1).sum()
    assert r["porosity_percent"] == pytest.approx(100 * (want == 2).sum() / (want > 0).sum())
    assert res.summary["run"]["fill_enclosed_air"] is True and "fill" in res.summary["timing"]["stage_busy_s"]
    np.testing.assert_array_equal(res.defects["voxels"], plain.defects["voxels"])
    for kw in ({}, {"out_dir": tmp_path / "kept", "keep_labels": True}):   # filled in memory (and written from it)
        np.testing.assert_array_equal(seg.segment(phantom_volume, **kw).labels, want)
    counts = seg.segment(phantom_volume, keep_labels=False).summary["result"]   # no labels anywhere: the counts
    assert counts["enclosed_air_filled_voxels"] == enclosed.sum() and counts["voxels_per_class"] == r["voxels_per_class"]
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "kept" / "labels.tif"), want)
    with pytest.raises(XctrtError, match="on_slab streams labels before fill_enclosed_air"):
        seg.segment(phantom_volume, on_slab=lambda *a: None)
    with pytest.raises(XctrtError, match="fill_enclosed_air must be True or False"):
        make_segmenter(fill_enclosed_air=1)
