"""Distance to the part surface: the host's chunked kd-tree search against the GPU kernel's per-run search.

    python benchmarks/surface_distance.py [--planes 200] [--size 1200] [--repeats 3] [--json FILE]

The input is what the GPU labeller hands to the search: the air outside the part and the defect runs
with their exposed sides, from gpu_post_check.py's phantom (a --size² cylinder with 2 % random
ellipsoid pores and inclusions), labelled slab by slab by xctrt.gpu.post on NumPy (slow: ~65 s for 200
planes on 2 cores; not timed). Then, best of --repeats each:
  host      _core.distance_to_surface: tree + search, a component's runs in chunks on all cores
  tree      _core.air_tree: the tree alone, as the GPU path builds it on the host
  per run   _core.search_air_runs: one search per run sharing its component's best (atomic minimum),
            the loop the CUDA kernel runs one thread per run, here on all cores
  forest    the same over the labeller's own trees: one per slab of the air on the volume's sides
            there (built while later slabs are labelled), one of the rest at the end
  alone     the same with every run its own component, minimum taken after: what each of a
            component's runs side by side on the GPU would do without the shared best
The results must be the same bits.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_post_check import LABEL_IDS, PRIORITY, THRESHOLDS, Phantom  # noqa: E402
from xctrt import _core  # noqa: E402
from xctrt.gpu import post  # noqa: E402


def search_inputs(planes: int, size: int = 1200, slab: int = 16):
    """(air runs (m, 4), defect runs (6, n), comp (n,) int32, components, the labeller's forest of trees) as the
    GPU labeller's finish() sees them."""
    shape = (planes, size, size)
    ph = Phantom(np, shape)
    lb = post.ComponentLabeller(shape)
    for z0 in range(0, planes, slab):
        probs, grey = ph.slab(z0, min(planes, z0 + slab))
        lb.add_slab(post.aggregate(probs.transpose(1, 0, 2, 3), THRESHOLDS, LABEL_IDS, PRIORITY), grey)
    got = {}

    def grab(forest, runs, comp, best2, voxel_size):   # the search's own arguments
        got.update(forest=tuple(a.copy() for a in forest), air=forest[2].copy(), runs=runs.copy(), comp=comp.copy(),
                   n=len(best2))
        return real(forest, runs, comp, best2, voxel_size)
    real, post.search_air_runs = post.search_air_runs, grab
    try:
        lb.finish()
    finally:
        post.search_air_runs = real
    return got["air"], got["runs"], got["comp"], got["n"], got["forest"]


def best_of(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--planes", type=int, default=200)
    ap.add_argument("--size", type=int, default=1200, help="Y = X of the phantom")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    air, runs, comp, n, forest = search_inputs(args.planes, args.size)
    print(f"{args.planes} planes of {args.size}²: {n} components, {runs.shape[1]} defect runs, {len(air)} air runs "
          f"in {len(forest[1]) - 1} trees "
          f"(labelled in {time.perf_counter() - t0:.0f} s)", flush=True)
    kept = comp >= 0
    rows = np.ascontiguousarray(runs[:4, kept].T)
    t_host, want = best_of(lambda: _core.distance_to_surface(air, rows, comp[kept].astype(np.int64), n,
                                                             exposed=runs[5, kept].astype(np.uint8)), args.repeats)
    t_tree, (nodes, tree_air) = best_of(lambda: _core.air_tree(air), args.repeats)

    def per_run():
        best2 = np.full(n, np.inf).view(np.uint64)
        _core.search_air_runs(nodes, tree_air, runs, comp, best2)
        return np.sqrt(best2.view(np.float64))
    t_run, got = best_of(per_run, args.repeats)

    def over_forest():
        best2 = np.full(n, np.inf).view(np.uint64)
        post.search_air_runs(forest, runs, comp, best2, (1.0, 1.0, 1.0))
        return np.sqrt(best2.view(np.float64))
    t_forest, got_forest = best_of(over_forest, args.repeats)

    def alone():
        idx = np.flatnonzero(kept)
        own = np.full(len(comp), -1, np.int32)
        own[idx] = np.arange(len(idx), dtype=np.int32)
        best2 = np.full(len(idx), np.inf).view(np.uint64)
        _core.search_air_runs(nodes, tree_air, runs, own, best2)
        out = np.full(n, np.inf)
        np.minimum.at(out, comp[idx], best2.view(np.float64))
        return np.sqrt(out)
    t_alone, got_alone = best_of(alone, args.repeats)
    same = all(g.tobytes() == want.tobytes() for g in (got, got_alone, got_forest))
    print(f"host (tree + chunked search) {t_host:.3f} s; tree {t_tree:.3f} s + per-run search {t_run:.3f} s "
          f"(each run alone: {t_alone:.3f} s; over the labeller's {len(forest[1]) - 1} trees: {t_forest:.3f} s); "
          f"same bits: {same}")
    if args.json:
        args.json.write_text(json.dumps({
            "planes": args.planes, "size": args.size, "components": n, "defect_runs": int(runs.shape[1]), "air_runs": len(air),
            "host_s": t_host, "tree_s": t_tree, "per_run_search_s": t_run, "each_run_alone_s": t_alone,
            "forest_trees": len(forest[1]) - 1, "forest_search_s": t_forest,
            "same_bits": same,
            "repeats": args.repeats, "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
