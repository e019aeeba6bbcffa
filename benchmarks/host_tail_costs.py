"""Host costs behind the GPU run's tail (issue 5), measured on this machine's CPU.

    python benchmarks/host_tail_costs.py [--runs 2700000] [--csv-rows 537171] [--dir DIR] [--repeat 3] [--json OUT]

- Python's full garbage-collection pass after importing torch and xctrt (what a run of `xctrt segment
  --device cuda` carries), and the same pass with those objects frozen out (gc.freeze, as
  timing.CollectorWatch does during a run).
- Picking a slab's air runs on the volume's sides on the host, as the device labeller did before it
  picked them on the device: --runs (z, y, x0, x1, flag) int32 rows, ~6 % flagged (a random network's
  slab: ~2.7 M air runs), NumPy's boolean selection of the flagged rows' first four columns, beside a
  plain copy of all rows (what their copy to the host costs in host memory traffic).
- defects.csv for a table of --csv-rows rows (537,171: the random network's shared-mode table on the H200,
  2026-11-28): its formatting (defects.table_to_csv, C++ on all cores) and its write to a file in --dir
  (into the page cache, as a run writes it: no fsync), timed apart as runs did until 2026-11-28; and the
  same file formatted and written as a run does now (defects.write_table_csv: each core writes the block
  it formatted in its turn), the file checked to hold the same bytes.
- The GPU stage's self-check of its fused kernels (in every run's time) drew 2 x 3 x 1024 x 1024 random
  float32 probabilities with NumPy before it drew them on the device: that draw, timed here.
Best of --repeat each.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
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
    ap.add_argument("--csv-rows", type=int, default=537_171)
    ap.add_argument("--dir", help="where defects.csv is written (default: a temporary folder)")
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

    def draw_probs():
        p = np.random.default_rng(0).random((2, 3, 1024, 1024), dtype=np.float32)
        p[..., ::3] = np.floor(p[..., ::3] * 4) / 4
    probs = best(draw_probs, args.repeat)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from table_csv import random_table

    from xctrt.defects import table_to_csv, write_table_csv
    table = random_table(args.csv_rows)
    text = table_to_csv(table, "mm")
    fmt = best(lambda: table_to_csv(table, "mm"), args.repeat)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = Path(d) / "defects.csv"
        write = best(lambda: path.write_bytes(text), args.repeat)
        streamed = best(lambda: write_table_csv(path, table, "mm"), args.repeat)
        if path.read_bytes() != text:
            raise SystemExit("write_table_csv wrote other bytes than table_to_csv")

    # seconds to the microsecond: a small run's pick or write takes tens of them, which 0.1 ms would round to 0
    out = {"gc_objects": objects, "gc_full_pass_s": round(full, 6), "gc_full_pass_frozen_s": round(frozen, 6),
           "air_runs": args.runs, "host_pick_s": round(pick, 6), "host_copy_of_all_s": round(copy, 6),
           "csv_rows": args.csv_rows, "csv_bytes": len(text), "csv_format_s": round(fmt, 6),
           "csv_write_s": round(write, 6), "csv_streamed_s": round(streamed, 6), "check_probs_on_host_s": round(probs, 6),
           "cores": os.cpu_count()}
    print(f"full garbage-collection pass over {objects:,} objects: {full:.3f} s; with them frozen: {frozen:.4f} s")
    print(f"picking the flagged ones of {args.runs:,} air runs on the host: {pick * 1e3:.1f} ms "
          f"(a plain copy of all {rows.nbytes / 1e6:.0f} MB: {copy * 1e3:.1f} ms)")
    print(f"defects.csv of {args.csv_rows:,} rows ({len(text) / 1e6:.0f} MB): formatted in {fmt:.3f} s, "
          f"written in {write:.3f} s; formatted and written streamed {streamed:.3f} s, "
          f"{(fmt + write) / streamed:.2f}x faster ({os.cpu_count()} cores)")
    print(f"the fused-kernel check's random probabilities drawn on the host: {probs * 1e3:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
