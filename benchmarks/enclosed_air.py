"""What the air a model's labels enclose (summary.json's enclosed_air_voxels) is in truth.

    PYTHONPATH=python:. python benchmarks/enclosed_air.py MODEL DATA_DIR [--sets test1 test4 test5]
        [--z 40 60] [--json OUT] [--pred RUN_DIR]

Segments a contiguous run of slices (enclosure is 3D, so no --every here) of each set with the
package MODEL ("default": the shipped one), finds the air not connected (6-neighbours) to the
view's y/x sides, as xctrt's labeller does, and reports its size and what the released labels
call those voxels; also the IoU if that air were relabelled material or pore. In the released
labels themselves almost no air is enclosed (the parts are solid), so enclosed air in a
prediction is a model error; this says which kind.

--pred RUN_DIR scores a finished `xctrt segment` run of the one set given (its labels.tif, slices
--z of it) instead of segmenting again; MODEL then only names the model in the output.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from xctrt.io import commit_json, output_file
from xctrt.metrics import CLASS_NAMES, iou_per_class
from xctrt.pipeline import Segmenter


def outside_air(labels: np.ndarray) -> np.ndarray:
    """Air (label 0) connected through face neighbours to the volume's y or x sides."""
    comp, _ = ndimage.label(labels == 0)
    sides = np.concatenate([comp[:, 0].ravel(), comp[:, -1].ravel(), comp[:, :, 0].ravel(), comp[:, :, -1].ravel()])
    return np.isin(comp, np.unique(sides[sides > 0]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help='model package path or "default"')
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--sets", nargs="+", default=["test1", "test4", "test5"])
    ap.add_argument("--z", nargs=2, type=int, default=[40, 60], metavar=("FIRST", "END"),
                    help="slices FIRST..END-1 of each set (default 40 60)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--pred", type=Path, metavar="RUN_DIR",
                    help="an xctrt segment output folder of the one set: score its labels.tif, do not segment")
    a = ap.parse_args(argv)
    z0, z1 = a.z
    if not 0 <= z0 < z1:
        ap.error("--z needs 0 <= FIRST < END")
    if a.pred and len(a.sets) != 1:
        ap.error("--pred takes one set")
    seg = None if a.pred else Segmenter(a.model, progress=False)
    model = seg.package.name if seg else a.model
    results = {}
    for s in a.sets:
        image = tifffile.imread(a.data_dir / s / "image.tif")[z0:z1]
        truth = tifffile.imread(a.data_dir / s / "labels.tif")[z0:z1]
        t0 = time.perf_counter()
        if seg:
            res = seg.segment(image, keep_labels=True)
            pred, reported = res.labels, res.summary["result"]["enclosed_air_voxels"]
        else:
            run = tifffile.imread(a.pred / "labels.tif")
            pred = run[z0:z1]
            reported = json.loads((a.pred / "summary.json").read_text())["result"]["enclosed_air_voxels"] \
                if (z0, z1) == (0, len(run)) else None   # the whole run: its summary counted the same air
        if pred.shape != truth.shape:
            raise SystemExit(f"{s}: prediction {pred.shape} and labels {truth.shape} differ")
        enclosed = (pred == 0) & ~outside_air(pred)
        if reported is not None:   # as the run reports it
            assert int(enclosed.sum()) == reported, (int(enclosed.sum()), reported)
        as_material, as_pore = pred.copy(), pred.copy()
        as_material[enclosed], as_pore[enclosed] = 1, 2
        counts = np.bincount(truth[enclosed], minlength=4)
        results[s] = {
            "slices": [z0, z0 + len(truth)], "seconds": time.perf_counter() - t0,
            "enclosed_voxels": int(enclosed.sum()), "enclosed_percent_of_view": 100 * float(enclosed.mean()),
            "truth_of_enclosed": {CLASS_NAMES.get(c, str(c)): int(counts[c]) for c in range(4)},
            "enclosed_in_truth_labels": int(((truth == 0) & ~outside_air(truth)).sum()),
            "iou": iou_per_class(pred, truth), "iou_enclosed_as_material": iou_per_class(as_material, truth),
            "iou_enclosed_as_pore": iou_per_class(as_pore, truth)}
        r = results[s]
        share = {k: f"{100 * v / max(1, r['enclosed_voxels']):.1f} %" for k, v in r["truth_of_enclosed"].items()}
        print(f"{s} slices {z0}..{z0 + len(truth) - 1}: enclosed air {r['enclosed_voxels']} voxels "
              f"({r['enclosed_percent_of_view']:.2f} % of the view; {r['enclosed_in_truth_labels']} in the labels); "
              f"in truth {share}", flush=True)
        print(f"  IoU material/pore as predicted {r['iou'][1]:.4f}/{r['iou'][2]:.4f}, enclosed air as material "
              f"{r['iou_enclosed_as_material'][1]:.4f}/{r['iou_enclosed_as_material'][2]:.4f}, as pore "
              f"{r['iou_enclosed_as_pore'][1]:.4f}/{r['iou_enclosed_as_pore'][2]:.4f}", flush=True)
        if a.json:   # after every set: a long run stopped part way keeps the sets it finished
            doc = {"model": model, "sets": results, "pred": str(a.pred) if a.pred else None,
                   "command": " ".join(["benchmarks/enclosed_air.py", *sys.argv[1:]]),
                   "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "host": platform.node()}
            a.json.parent.mkdir(parents=True, exist_ok=True)
            commit_json(output_file(a.json), doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
