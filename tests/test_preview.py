"""preview.png layout: one scale for the three planes, thin planes stretched (and said so), titles apart."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from xctrt.preview import MIN_SIDE, PANEL, plane_sizes, write_preview


def planes(z, y, x):
    g = np.zeros((z, y, x), np.float32)
    lab = np.ones((z, y, x), np.uint8)
    return {"z": (g[z // 2], lab[z // 2]), "y": (g[:, y // 2], lab[:, y // 2]),
            "x": (g[:, :, x // 2], lab[:, :, x // 2])}


def test_one_scale_for_all_planes():
    # a tall 256 x 32 x 32 volume: the side views are 384 high, the XY plane 32 voxels -> 48 pixels
    assert plane_sizes([(32, 32), (256, 32), (256, 32)], (1, 1, 1)) == [(48, 48, False), (48, 384, False),
                                                                         (48, 384, False)]
    # anisotropic voxels: 16 slices of 0.1 mm (1.6 mm) under 256 columns of 0.01 mm (2.56 mm)
    xy, xz, _ = plane_sizes([(256, 256), (16, 256), (16, 256)], (0.1, 0.01, 0.01))
    assert xy == (384, 384, False) and xz == (384, 240, False)


@pytest.mark.parametrize("shape", [(1, 64, 64), (2, 300, 40), (512, 8, 8), (300, 1, 1)])
def test_thin_planes_are_stretched_to_a_visible_size(shape):
    z, y, x = shape
    sizes = plane_sizes([(y, x), (z, x), (z, y)], (1, 1, 1))
    assert all(min(w, h) >= MIN_SIDE and max(w, h) <= PANEL for w, h, _ in sizes)
    assert any(s for _, _, s in sizes)


@pytest.mark.parametrize("shape, voxel", [((64, 64, 64), (0.01, 0.1, 0.01)), ((512, 8, 8), (1, 1, 1)),
                                          ((1, 16, 16), (1, 1, 1))])
def test_canvas_fits_every_title(tmp_path, shape, voxel):
    title = "a_rather_long_volume_file_name_from_the_scanner_2026-11-27.tif  200x16x16  model untrained-tiny"
    write_preview(tmp_path / "p.png", planes(*shape), (0, 1), voxel, {1: "material", 2: "pore", 3: "inclusion"},
                  title)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    with Image.open(tmp_path / "p.png") as im:
        assert im.width >= measure.textlength(title) + 16
        # the three plane titles and panels sit in columns at least as wide as the title "XY  z = 0 of 0..0"
        assert im.width >= 3 * measure.textlength("XY  z = 0 of 0..0")


def test_enclosed_air_is_marked_on_the_mid_planes_and_in_the_legend(tmp_path):
    """Air that does not reach the view's y/x sides gets its own colour on each mid-plane, exactly where the
    labeller's outside-air runs say it is enclosed; the legend names it only when a plane shows some."""
    from conftest import outside_air_reference
    from xctrt import _core
    from xctrt.preview import COLOURS, ENCLOSED, mark_enclosed_air
    rng = np.random.default_rng(5)
    shape = (9, 21, 17)
    lab = np.ones(shape, np.uint8)
    lab[:, :, :3] = 0                                     # outside air
    lab[rng.random(shape) < 0.15] = 0                     # air specks: some reach the outside, most do not
    lab[3:6, 8:13, 6:11] = 0                              # a cavity through all three mid-planes
    labeller = _core.ComponentLabeller(shape)
    labeller.add_slab(lab, np.zeros(shape, np.uint16))
    labeller.finish()
    Z, Y, X = shape
    mid = {"z": (np.zeros((Y, X)), lab[Z // 2]), "y": (np.zeros((Z, X)), lab[:, Y // 2]),
           "x": (np.zeros((Z, Y)), lab[:, :, X // 2])}
    marked = mark_enclosed_air(mid, labeller.outside_air_runs(), shape)
    enclosed = (lab == 0) & ~outside_air_reference(lab)
    for key, sl in (("z", np.s_[Z // 2]), ("y", np.s_[:, Y // 2]), ("x", np.s_[:, :, X // 2])):
        want = np.where(enclosed[sl], ENCLOSED, lab[sl])
        np.testing.assert_array_equal(marked[key][1], want)
        assert (marked[key][1] == ENCLOSED).any()
    np.testing.assert_array_equal(mid["z"][1], lab[Z // 2])   # the inputs are left as they were
    filled = mark_enclosed_air(mid, labeller.outside_air_runs(), shape, value=1)   # as --fill-enclosed-air draws it
    np.testing.assert_array_equal(filled["x"][1], np.where(enclosed[:, :, X // 2], 1, lab[:, :, X // 2]))

    def has_swatch(p):
        swatch = (0.15 * 128 + 0.85 * np.array(COLOURS[ENCLOSED])).astype(int)
        with Image.open(p) as im:
            return bool((np.abs(np.asarray(im.convert("RGB")).astype(int) - swatch).max(axis=-1) <= 1).any())
    names = {1: "material", 2: "pore", 3: "inclusion"}
    write_preview(tmp_path / "a.png", marked, (0, 1), (1, 1, 1), names, "t")
    write_preview(tmp_path / "b.png", mid, (0, 1), (1, 1, 1), names, "t")
    assert has_swatch(tmp_path / "a.png") and not has_swatch(tmp_path / "b.png")


@pytest.mark.parametrize("shape,size", [((300, 200), (192, 128)), ((7, 500), (384, 16)), ((40, 30), (80, 60)),
                                        ((1, 1), (16, 16)), ((1200, 1200), (384, 384))])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.uint8])
def test_panels_drawn_small_are_the_full_overlay_resized(shape, size, dtype):
    """A panel picks its pixels before blending: the same pixels as blending the whole plane first, for
    shrinking, stretching and every grey dtype a volume may have."""
    from xctrt.preview import _overlay, _panel
    rng = np.random.default_rng(sum(shape))
    grey = (rng.random(shape) * 70000 - 2000).astype(np.float32)
    grey = np.clip(grey, 0, np.iinfo(dtype).max).astype(dtype) if dtype != np.float32 else grey
    labels = rng.integers(0, 5, shape, dtype=np.uint8)
    want = np.asarray(_overlay(grey, labels, 1000.0, 60000.0).resize(size, Image.NEAREST))
    got = np.asarray(_panel(grey, labels, 1000.0, 60000.0, size))
    assert got.shape == (size[1], size[0], 3)
    np.testing.assert_array_equal(got, want)


def test_preview_cost_benchmark_checks_its_pixels(capsys, monkeypatch):
    """benchmarks/preview_cost.py on a small run: the int32 marking and the int64 reference mark the same
    pixels, and the PNG levels decode to the same picture (it exits 1 otherwise)."""
    from conftest import load_benchmark
    monkeypatch.setattr("sys.argv", ["preview_cost.py", "--runs", "20000", "--shape", "40", "90", "70",
                                     "--repeat", "1"])
    assert load_benchmark("preview_cost").main() == 0
    out = capsys.readouterr().out
    assert "20,000 outside-air runs, mid-planes of 40x90x70" in out and "same marks and PNG pixels: True" in out
    assert "zlib level 1" in out and "level 6" in out
