"""The issue's acceptance run, as a real process: a generated 64x512x512 uint16 volume through
`xctrt segment` on the CPU writes the four outputs with the input's shape and geometry."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile

import xctrt
from xctrt.io import open_volume


def _run(*args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(xctrt.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "xctrt", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_segment_generated_64x512x512_volume(tmp_path):
    r = _run("phantom", "demo.tif", "--shape", "64", "512", "512", "--voxel-size", "0.02", "0.01", "0.01",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _run("segment", "demo.tif", "-o", "out", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["defects.csv", "labels.tif", "preview.png", "summary.json"]
    with open_volume(out / "labels.tif") as labels:
        assert labels.shape == (64, 512, 512)
        assert labels.dtype == np.uint8
        assert np.allclose(labels.voxel_size, (0.02, 0.01, 0.01))
        assert set(np.unique(labels.read(0, 64))) <= {0, 1, 2, 3}
    with tifffile.TiffFile(out / "labels.tif") as t:
        assert t.pages[0].compression != 1  # compressed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input"]["shape"] == [64, 512, 512]
    assert summary["input"]["voxel_size_from"] == "file metadata"
    header = (out / "defects.csv").read_text().splitlines()[0]
    assert header.startswith("id,class,voxels,volume_mm3,equivalent_diameter_mm")
    assert header.endswith(",touches_edge,surface_distance_mm")
    # The console names each class's closest approach to the part surface, as summary.json has
    # it (no line where the labels show no air outside the part).
    near = {n: d["surface_distance_mm"]["min"] for n, d in summary["result"]["defects"].items()
            if "surface_distance_mm" in d}
    line = "closest to the part surface: " + ", ".join(f"{n} {v:.4g} mm" for n, v in near.items())
    assert line in r.stdout if near else "closest to the part surface" not in r.stdout
    from PIL import Image
    with Image.open(out / "preview.png") as im:
        assert im.format == "PNG" and im.width > 512
