"""The host's streamed 3D components (C++) on label slabs like the GPU bench's: slices per second.

    python benchmarks/host_components.py [--labels phantom|speckle] [--planes 64] [--size 1200] [--slab 32]
                                         [--repeats 3] [--json FILE]

What the pipeline's components thread does per slab, on label slabs made with NumPy first (not timed):
  phantom  gpu_post_check.py's phantom: a --size² cylinder with 2 % random ellipsoid pores and
           inclusions, aggregated as the GPU bench's thresholds do
  speckle  labels like the GPU bench's random-weight network's: the same cylinder of material with
           scattered voxels of pore and inclusion, ~550 defects per 1200² slice, nearly all of one voxel
           (the H200 bench's random ViT-B found 539k defects in 1000 slices in shared mode)
Best of --repeats each, all on the same slabs:
  counter     DefectCounter.add_slab: the labeller, which also counts the voxels per label value
  bincount    the same labeller with the counts from np.bincount, as DefectCounter did until 2026-11-27
              (the baseline)
  labeller    the labeller alone (no counts)
  finish      the table after the last slab (merge, distance to the part surface on all cores)
  finish_without_surface   the same without the distance search (as the GPU path asks for it, to
              search on the device)
  csv         defects.csv's text from that table (C++, all cores), as the run's report writes it
The counts must equal np.bincount's, and the table must be the same either way.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_post_check import LABEL_IDS, PRIORITY, THRESHOLDS, Phantom  # noqa: E402
from surface_distance import best_of  # noqa: E402
from xctrt import _core  # noqa: E402
from xctrt.defects import DefectCounter, table_to_csv  # noqa: E402
from xctrt.gpu import post  # noqa: E402


SPECKLE_FRACTION = 3e-4   # of the part's voxels, per defect class


def speckle_slabs(planes: int, size: int, slab: int, seed: int = 0):
    """[(labels uint8, grey uint16)]: the phantom's cylinder of material, SPECKLE_FRACTION of its voxels
    pore and as many inclusion, at random."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    part = (yy * yy + xx * xx < (0.45 * size) ** 2).astype(np.uint8)
    out = []
    for z0 in range(0, planes, slab):
        nz = min(planes, z0 + slab) - z0
        lab = np.repeat(part[None], nz, 0)
        u = rng.random(lab.shape, dtype=np.float32)
        lab[(u < SPECKLE_FRACTION) & (lab == 1)] = 2
        lab[(u >= 1 - SPECKLE_FRACTION) & (lab == 1)] = 3
        out.append((lab, rng.integers(0, 65536, lab.shape, dtype=np.uint16)))
    return out


def slabs(planes: int, size: int, slab: int):
    """[(labels uint8, grey)] slab by slab, as the GPU stage hands them to the components."""
    ph = Phantom(np, (planes, size, size))
    out = []
    for z0 in range(0, planes, slab):
        probs, grey = ph.slab(z0, min(planes, z0 + slab))
        lab = post.aggregate(probs.transpose(1, 0, 2, 3), THRESHOLDS, LABEL_IDS, PRIORITY)
        out.append((np.ascontiguousarray(lab), np.ascontiguousarray(grey)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", choices=("phantom", "speckle"), default="phantom")
    ap.add_argument("--planes", type=int, default=64)
    ap.add_argument("--size", type=int, default=1200, help="Y = X of the phantom")
    ap.add_argument("--slab", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    shape = (args.planes, args.size, args.size)
    t0 = time.perf_counter()
    data = (slabs if args.labels == "phantom" else speckle_slabs)(args.planes, args.size, args.slab)
    print(f"{args.labels}: {args.planes} planes of {args.size}² in slabs of {args.slab} "
          f"(made in {time.perf_counter() - t0:.0f} s)", flush=True)

    # each streams every slab into a new labeller (its making, a few allocations, timed too)
    def counter():
        c = DefectCounter(shape, (1.0, 1.0, 1.0))
        for lab, grey in data:
            c.add_slab(lab, grey)
        return c

    def bincount():
        lb = _core.ComponentLabeller(shape=shape, classes=[2, 3])
        counts = np.zeros(256, np.int64)
        for lab, grey in data:
            counts += np.bincount(lab.ravel(), minlength=256)
            lb.add_slab(lab, grey)
        return counts

    def labeller():
        lb = _core.ComponentLabeller(shape=shape, classes=[2, 3])
        for lab, grey in data:
            lb.add_slab(lab, grey)
        return lb

    res = {}
    res["counter"], c = best_of(counter, args.repeats)
    res["bincount"], counts = best_of(bincount, args.repeats)
    res["labeller"], lb = best_of(labeller, args.repeats)
    t = time.perf_counter()
    table = c.finish(1)
    res["finish"] = time.perf_counter() - t
    res["csv"], csv = best_of(lambda: table_to_csv(table, "vox"), args.repeats)
    same_counts = c.class_voxels.tolist() == counts.tolist()
    t = time.perf_counter()
    lb.finish(1, surface_distance=False)
    res["finish_without_surface"] = time.perf_counter() - t
    ref = lb.finish(1)
    same_table = all(np.array_equal(table[k], ref[k], equal_nan=True) for k in ref)
    print("  ".join(f"{k} {v:.3f} s" + (f" ({args.planes / v:.0f} slices/s)" if k in ("counter", "bincount", "labeller") else "")
                    for k, v in res.items())
          + f"; counter vs bincount {res['bincount'] / res['counter']:.2f}x; {len(table['id'])} defects "
          f"({len(csv) / 2 ** 20:.1f} MiB of CSV); "
          f"same counts {same_counts}, same table {same_table}")
    if args.json:
        args.json.write_text(json.dumps({
            "labels": args.labels, "planes": args.planes, "size": args.size, "slab": args.slab,
            "defects": len(table["id"]), "csv_bytes": len(csv), "seconds": res,
            "slices_per_s": {k: args.planes / res[k] for k in ("counter", "bincount", "labeller")},
            "counter_vs_bincount": res["bincount"] / res["counter"], "same_counts": same_counts,
            "same_table": same_table, "repeats": args.repeats, "host": platform.node(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=2) + "\n")
    return 0 if same_counts and same_table else 1


if __name__ == "__main__":
    sys.exit(main())
