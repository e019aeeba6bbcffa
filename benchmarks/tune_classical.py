"""Choose the classical baseline's parameters on TRAINING data only (never the test sets).

    PYTHONPATH=python:. python benchmarks/tune_classical.py \
        /work/shared/data/smg/train/pair_1 /work/shared/data/smg/train/pair_2 \
        [--slices 40] [--json benchmarks/results/tune_classical.json]

Grid over smoothing sigma, local window, rim width, robust second pass and k_pore / k_incl on
`--slices` evenly spaced slices of each training volume. Score of a setting = mean over the
volumes of (pore IoU + inclusion IoU) / 2 (volume IoU over the sampled slices), so a volume with
dense pores (pair_1, 1.7 %) and one with sparse pores (pair_2, 0.09 %) both count. Each volume's
Otsu threshold is computed on all its voxels.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classical import labels_from_statistics, slice_statistics, volume_threshold  # noqa: E402

from xctrt.metrics import MetricsAccumulator  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("train_dirs", type=Path, nargs="+")
    ap.add_argument("--slices", type=int, default=40, help="evenly spaced slices per volume")
    ap.add_argument("--smooth", type=float, nargs="+", default=[0.7, 1.0, 1.5])
    ap.add_argument("--window", type=int, nargs="+", default=[31, 61, 101])
    ap.add_argument("--edge-margin", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--robust", type=float, nargs="+", default=[0.0, 2.0, 2.5])
    ap.add_argument("--k-pore", type=float, nargs="+", default=[1.5, 2.0, 2.5, 3.0, 3.5, 4.0])
    ap.add_argument("--k-incl", type=float, nargs="+", default=[3.0, 3.5, 4.0, 5.0])
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    vols = []
    for d in a.train_dirs:
        image = tifffile.imread(d / "image.tif")
        truth = tifffile.imread(d / "labels.tif")
        t = volume_threshold(image)
        zs = np.unique(np.linspace(0, image.shape[0] - 1, min(a.slices, image.shape[0])).round().astype(int)).tolist()
        vols.append((d, image[zs], truth[zs], t, zs))
        print(f"{d}: {image.shape}, Otsu threshold {t}, {len(zs)} evenly spaced slices")
        del image, truth
    rows = []
    t0 = time.perf_counter()
    grid = list(itertools.product(a.smooth, a.window, a.edge_margin, a.robust))
    settings: dict = {}
    for vi, (d, image, truth, t, zs) in enumerate(vols):
        for smooth, window, margin, robust in grid:
            stats = [slice_statistics(image[i], t, smooth, window, margin, robust) for i in range(len(zs))]
            for kp, ki in itertools.product(a.k_pore, a.k_incl):
                acc = MetricsAccumulator()
                for i, st in enumerate(stats):
                    acc.update(labels_from_statistics(*st, kp, ki), truth[i])
                c = acc.result()["classes"]
                key = (smooth, window, margin, robust, kp, ki)
                settings.setdefault(key, []).append({k: c[k]["iou"] for k in c})
    for (smooth, window, margin, robust, kp, ki), ious in settings.items():
        score = float(np.mean([(i["pore"] + i["inclusion"]) / 2 for i in ious]))
        rows.append({"smooth": smooth, "window": window, "edge_margin": margin, "robust": robust, "k_pore": kp,
                     "k_incl": ki, "score": score, "iou": {str(d.name): i for (d, *_), i in zip(vols, ious)}})
    rows.sort(key=lambda r: -r["score"])
    print(f"{len(rows)} settings in {time.perf_counter() - t0:.0f} s; best 10 "
          f"(score = mean over volumes of mean(pore IoU, inclusion IoU)):")
    for r in rows[:10]:
        per = "  ".join(f"{n} {v['material']:.3f}/{v['pore']:.3f}/{v['inclusion']:.3f}" for n, v in r["iou"].items())
        print(f"  smooth {r['smooth']:<4} window {r['window']:<3} rim {r['edge_margin']} robust {r['robust']:<3} "
              f"k_pore {r['k_pore']:<4} k_incl {r['k_incl']:<4} score {r['score']:.4f}  IoU mat/pore/incl {per}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"train_dirs": [str(v[0]) for v in vols], "slices": {str(v[0]): v[4] for v in vols},
                                      "otsu": {str(v[0]): v[3] for v in vols}, "best": rows[0], "top": rows[:25]},
                                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
