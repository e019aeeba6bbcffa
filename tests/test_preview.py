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
