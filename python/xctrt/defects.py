"""Per-defect table and volume summary from the streamed component labeller (C++)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import _core

DEFECT_CLASSES = {2: "pore", 3: "inclusion"}
HIST_BINS_VOX = [1, 2, 3, 5, 8, 13, 21, 34, 55]  # equivalent-diameter bin edges in voxels (Fibonacci-ish)


class DefectCounter:
    """Streams label slabs through 3D connected components; also counts class voxels."""

    counts_in_stage = False   # add_slab does the counting (on the pipeline's components thread)

    def __init__(self, shape, voxel_size, connectivity=26, classes=tuple(DEFECT_CLASSES), surface_search=None):
        """surface_search(air, runs, comp, n) -> (n,) float64: the distance of each kept defect to the
        part surface, searched elsewhere (the GPU path's kernel) from the labeller's
        surface_search_inputs(), for n >= 1 with outside air; None: the labeller's own search, on
        all host cores. Either gives the same bits."""
        if connectivity not in (6, 18, 26):
            raise ValueError("connectivity must be 6, 18 or 26")
        self.surface_search = surface_search
        self.shape = tuple(int(s) for s in shape)
        self.voxel_size = tuple(float(v) for v in voxel_size)
        self.labeller = _core.ComponentLabeller(shape=tuple(shape), classes=list(classes),
                                                connectivity=connectivity, voxel_size=self.voxel_size)

    def add_slab(self, labels: np.ndarray, image: np.ndarray) -> None:
        self.labeller.add_slab(labels, image)

    @property
    def class_voxels(self) -> np.ndarray:
        """(256,) int64 voxels per label value so far (counted by the labeller, on all cores: NumPy's
        bincount widens uint8 to int64 first and took 4x as long as the labelling itself)."""
        return self.labeller.value_counts

    def finish(self, min_voxels: int = 1) -> dict[str, np.ndarray]:
        min_voxels = max(0, int(min_voxels))
        if self.surface_search is None:
            return self.labeller.finish(min_voxels=min_voxels)
        table = self.labeller.finish(min_voxels=min_voxels, surface_distance=False)
        air, runs, comp = self.labeller.surface_search_inputs()
        n = len(table["id"])
        if len(air) and n:   # else NaN, as the labeller's own search leaves it without outside air
            table["surface_distance"] = np.asarray(self.surface_search(air, runs, comp, n), np.float64)
        return table

    @property
    def outside_air_voxels(self) -> int | None:
        """Air voxels outside the part (reaching the view's y/x sides), after finish()."""
        return self.labeller.outside_air_voxels

    def outside_air_runs(self) -> np.ndarray:
        """Their x-runs, (m, 4) int32 z, y, x0, x1, after finish()."""
        return self.labeller.outside_air_runs()

    def outside_air_mid_runs(self) -> np.ndarray:
        """Those of them on the volume's mid-planes (mid_plane_runs), for the preview."""
        return mid_plane_runs(self.labeller.outside_air_runs(), self.shape)


def runs_mask(rows, c0, c1, shape) -> np.ndarray:
    """bool (rows, columns) set on every [row, c0..c1] of these x-runs (a difference array)."""
    d = np.zeros((shape[0], shape[1] + 1), np.int32)
    np.add.at(d, (rows, c0), 1)
    np.add.at(d, (rows, c1 + 1), -1)
    return np.cumsum(d[:, :-1], axis=1) > 0


def mid_plane_runs(runs: np.ndarray, shape) -> np.ndarray:
    """The x-runs of (m, 4) z, y, x0, x1 `runs` that touch the volume's mid-planes (z = Z // 2, y = Y // 2,
    or x0 <= X // 2 <= x1): all the preview's enclosed-air marking reads of them."""
    Z, Y, X = shape
    runs = np.asarray(runs).reshape(-1, 4)
    z, y, x0, x1 = runs.T   # column views: no copies of millions of runs
    return runs[(z == Z // 2) | (y == Y // 2) | ((x0 <= X // 2) & (x1 >= X // 2))]


def outside_air_masks(runs: np.ndarray, shape):
    """For z = 0..Z-1 in order: bool (Y, X) of slice z's air outside the part, from the labeller's
    outside_air_runs() ((m, 4) z, y, x0, x1)."""
    Z, Y, X = shape
    runs = np.asarray(runs, np.int64).reshape(-1, 4)
    runs = runs[np.argsort(runs[:, 0], kind="stable")]
    bounds = np.searchsorted(runs[:, 0], np.arange(Z + 1))
    for z in range(Z):
        r = runs[bounds[z]:bounds[z + 1]]
        yield runs_mask(r[:, 1], r[:, 2], r[:, 3], (Y, X))


def csv_columns(unit: str) -> list[tuple[str, str]]:
    """(table column, CSV header) pairs; lengths in `unit` (mm, or vox when the size is unknown)."""
    return [
        ("id", "id"), ("class_name", "class"), ("voxels", "voxels"),
        ("volume", f"volume_{unit}3"), ("equivalent_diameter", f"equivalent_diameter_{unit}"),
        ("surface_area", f"surface_area_{unit}2"), ("sphericity", "sphericity"),
        ("centroid_z", "centroid_z"), ("centroid_y", "centroid_y"), ("centroid_x", "centroid_x"),
        ("bbox_z0", "bbox_z0"), ("bbox_y0", "bbox_y0"), ("bbox_x0", "bbox_x0"),
        ("bbox_z1", "bbox_z1"), ("bbox_y1", "bbox_y1"), ("bbox_x1", "bbox_x1"),
        ("grey_mean", "grey_mean"), ("grey_min", "grey_min"), ("grey_max", "grey_max"),
        ("touches_edge", "touches_edge"), ("surface_distance", f"surface_distance_{unit}"),
    ]


# defects.csv columns as _core.table_csv formats them: %.6g, %.3f, %.6g or empty where not finite,
# strings; the rest are integers (d)
_CSV_KIND = {"volume": "g", "equivalent_diameter": "g", "surface_area": "g", "sphericity": "g",
             "grey_mean": "g", "grey_min": "g", "grey_max": "g",
             "centroid_z": "f", "centroid_y": "f", "centroid_x": "f", "class_name": "s", "surface_distance": "G"}


def _csv_args(table: dict[str, np.ndarray], unit: str) -> tuple[list, str, str]:
    """defects.csv's columns, kinds and header as _core.table_csv and table_csv_write take them."""
    cols = csv_columns(unit)
    # class names and numbers: no commas or quotes, so no CSV quoting is ever needed
    classes, codes = np.unique(np.asarray(table["class"]), return_inverse=True)
    names = (codes.reshape(-1), [DEFECT_CLASSES.get(int(c), str(int(c))) for c in classes])
    kinds = "".join(_CSV_KIND.get(k, "d") for k, _ in cols)
    columns = [names if k == "class_name" else np.asarray(table[k]) for k, _ in cols]
    return columns, kinds, ",".join(h for _, h in cols) + "\n"


def table_to_csv(table: dict[str, np.ndarray], unit: str) -> bytes:
    """defects.csv as UTF-8 bytes, header included (formatted in C++ on all cores: 12-13x faster than cell by
    cell in Python, benchmarks/table_csv.py)."""
    return _core.table_csv(*_csv_args(table, unit))


def write_table_csv(path: Path, table: dict[str, np.ndarray], unit: str) -> float:
    """Write defects.csv (table_to_csv's bytes) to `path` as it is formatted: each core writes the block of
    rows it formatted in its turn, so the writes overlap the formatting instead of following it (a random
    network's ~500k rows are ~120 MB). Returns the seconds spent inside the writes. A failed write (a full
    disk) raises OSError and leaves a partial file, which the caller discards."""
    with open(path, "wb") as f:
        _, err, write_s = _core.table_csv_write(f.fileno(), *_csv_args(table, unit))
    if err:
        raise OSError(err, os.strerror(err), str(path))
    return write_s


def summarise(table: dict[str, np.ndarray], class_voxels: np.ndarray, voxel_size, unit: str,
              class_names: dict[int, str], outside_air_voxels: int | None = None) -> dict:
    """Porosity of the part, counts and size statistics per defect class.

    Air the part encloses (label 0 not reaching the view's y/x sides: a closed cavity, or a pore's
    core the model left as air) is in neither porosity nor the part; it is reported beside them
    so that a large value can be looked at."""
    part = int(class_voxels[1:].sum())  # every non-air voxel belongs to the part
    voxel_volume = float(np.prod(voxel_size))
    enclosed = None if outside_air_voxels is None else int(class_voxels[0]) - int(outside_air_voxels)
    out = {
        "voxels_per_class": {"air": int(class_voxels[0]),
                             **{n: int(class_voxels[c]) for c, n in class_names.items()}},
        "part_volume": part * voxel_volume,
        "porosity_percent": 100.0 * float(class_voxels[2]) / part if part else 0.0,
        "inclusion_percent": 100.0 * float(class_voxels[3]) / part if part else 0.0,
        "enclosed_air_voxels": enclosed,
        "enclosed_air_volume": None if enclosed is None else enclosed * voxel_volume,
        "unit": unit,
        "defects": {},
    }
    mean_voxel_edge = voxel_volume ** (1 / 3)
    edges = [b * mean_voxel_edge for b in HIST_BINS_VOX] + [float("inf")]
    for cid, cname in DEFECT_CLASSES.items():
        sel = table["class"] == cid
        d = table["equivalent_diameter"][sel]
        v = table["volume"][sel]
        s = table["surface_distance"][sel]
        s = s[np.isfinite(s)]
        entry = {"count": int(sel.sum()), "touching_edge": int(table["touches_edge"][sel].sum())}
        if d.size:
            entry.update({
                f"volume_{unit}3": {"total": float(v.sum()), "min": float(v.min()), "median": float(np.median(v)),
                                    "mean": float(v.mean()), "max": float(v.max())},
                f"equivalent_diameter_{unit}": {"min": float(d.min()), "median": float(np.median(d)),
                                                "mean": float(d.mean()), "max": float(d.max())},
            })
        if s.size:  # how close the defects come to the part surface (machining, fatigue)
            entry[f"surface_distance_{unit}"] = {"min": float(s.min()), "median": float(np.median(s))}
        counts, _ = np.histogram(d, bins=[0.0] + edges)
        entry[f"histogram_equivalent_diameter_{unit}"] = {
            "edges": [0.0] + [e for e in edges[:-1]] + ["inf"], "counts": counts.tolist()}
        out["defects"][cname] = entry
    return out
