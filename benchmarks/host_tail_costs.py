"""Two host costs behind the GPU run's tail (issue 5), measured on this machine's CPU.

    python benchmarks/host_tail_costs.py [--runs 2700000] [--repeat 3] [--json OUT]

- Python's full garbage-collection pass after importing torch and xctrt (what a run of `xctrt segment
  --device cuda` carries), and the same pass with those objects frozen out (gc.freeze, as
  timing.CollectorWatch does during a run).
- Picking a slab's air runs on the volume's sides on the host, as the device labeller did before it
  picked them on the device: --runs (z, y, x0, x1, flag) int32 rows, ~6 % flagged (a random network's
  slab: ~2.7 M air runs), NumPy's boolean selection of the flagged rows' first four columns, beside a
  plain copy of all rows (what their copy to the host costs in host memory traffic).
Best of --repeat each.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2_700_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import torch  # noqa: F401  (what a GPU run holds)

    import xctrt.gpu.bench  # noqa: F401
    import xctrt.pipeline  # noqa: F401
    objects = len(gc.get_objects())
    full = best(gc.collect, args.repeat)
    gc.freeze()
    try:
        frozen = best(gc.collect, args.repeat)
    finally:
        gc.unfreeze()

    rng = np.random.default_rng(0)
    rows = rng.integers(0, 1200, (args.runs, 5)).astype(np.int32)
    rows[:, 4] = rng.random(args.runs) < 0.06
    pick = best(lambda: np.ascontiguousarray(rows[rows[:, 4] != 0, :4]), args.repeat)
    copy = best(rows.copy, args.repeat)

    out = {"gc_objects": objects, "gc_full_pass_s": round(full, 4), "gc_full_pass_frozen_s": round(frozen, 4),
           "air_runs": args.runs, "host_pick_s": round(pick, 4), "host_copy_of_all_s": round(copy, 4)}
    print(f"full garbage-collection pass over {objects:,} objects: {full:.3f} s; with them frozen: {frozen:.4f} s")
    print(f"picking the flagged ones of {args.runs:,} air runs on the host: {pick * 1e3:.1f} ms "
          f"(a plain copy of all {rows.nbytes / 1e6:.0f} MB: {copy * 1e3:.1f} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
