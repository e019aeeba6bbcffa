"""defects.csv formatting: xctrt's (C++, _core.table_csv) against a cell-by-cell reference.

    python benchmarks/table_csv.py [--rows 200000] [--repeats 3]

A random defect table (every column, edge values included: -0, NaN, -NaN, +-inf, 1e300, subnormals,
values that round up) is written both ways; the texts must be identical, and the time of each is
printed (best of --repeats) with their ratio. The reference formats every cell on its own, as
defects.csv_columns documents them, and hands the rows to Python's csv module; tests use it too.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from xctrt.defects import DEFECT_CLASSES, csv_columns, table_to_csv  # noqa: E402

FLOAT_COLUMNS = ("volume", "equivalent_diameter", "surface_area", "sphericity", "grey_mean", "grey_min",
                 "grey_max", "centroid_z", "centroid_y", "centroid_x", "surface_distance")
INT_COLUMNS = ("id", "voxels", "bbox_z0", "bbox_y0", "bbox_x0", "bbox_z1", "bbox_y1", "bbox_x1")


def random_table(n: int, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = {k: rng.random(n) * 10.0 ** rng.integers(-8, 9, n) for k in FLOAT_COLUMNS}
    t["surface_distance"][::7] = np.nan
    t["grey_mean"][::11] = np.nan
    t["volume"][::13] = np.inf
    t["grey_max"][::29] = -np.inf
    t["grey_min"][::23] = -np.nan          # printf may spell it "-nan"; Python writes "nan"
    t["sphericity"][::17] = -0.0
    t["centroid_x"][::19] = -1e300         # 301 digits before the point
    t["surface_distance"][::31] = 5e-324   # the smallest subnormal
    t["equivalent_diameter"][::37] = 999999.5   # rounds up to 1e+06
    for k in INT_COLUMNS:
        t[k] = rng.integers(0, 2 ** 40, n)
    t["class"] = rng.choice(np.array([2, 3, 9], np.uint8), n)
    t["touches_edge"] = rng.random(n) < 0.5
    return t


def reference_csv(table: dict[str, np.ndarray], unit: str) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = csv_columns(unit)
    w.writerow([h for _, h in cols])
    for i in range(len(table["id"])):
        cells = []
        for k, _ in cols:
            if k == "class_name":
                c = int(table["class"][i])
                cells.append(DEFECT_CLASSES.get(c, str(c)))
                continue
            v = table[k][i]
            if k == "touches_edge":
                cells.append("1" if v else "0")
            elif k == "surface_distance":
                cells.append(f"{v:.6g}" if np.isfinite(v) else "")
            elif k.startswith("centroid"):
                cells.append(f"{v:.3f}")
            elif isinstance(v, float):
                cells.append(f"{v:.6g}")
            else:
                cells.append(str(v))
        w.writerow(cells)
    return buf.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    t = random_table(args.rows)
    best = {}
    for name, fn in (("xctrt", table_to_csv), ("reference", reference_csv)):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            text = fn(t, "mm")
            times.append(time.perf_counter() - t0)
        best[name] = (min(times), text)
    same = best["xctrt"][1] == best["reference"][1].encode()   # xctrt's is the file's bytes
    print(f"{args.rows} rows: xctrt {best['xctrt'][0]:.3f} s, cell-by-cell reference {best['reference'][0]:.3f} s "
          f"({best['reference'][0] / best['xctrt'][0]:.1f}x); identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
