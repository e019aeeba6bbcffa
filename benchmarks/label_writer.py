"""labels.tif written as a run writes it (issue 5): slabs handed to a writer thread at a steady pace
through a queue of two (as the pipeline's components thread hands them), compressed by
`xctrt.io.write_volume_tiff` (zlib level 1, strips of 64 rows, min(8, CPUs) threads), in two ways:

- `per slab`: each slab's pages compressed as soon as they have come (`batch_pages` = the slab; what a
  run does since 2026-11-28);
- `tifffile default`: tifffile's own batch, 512 MiB of strips, which a run used before (368 pages of
  1200², `--tifffile-batch`; tifffile's is 367.9, so its batches end inside a page).

    python benchmarks/label_writer.py [--shape 1000 1200 1200] [--slab 32] [--rate 100] [--json OUT]

For each way: the writer's seconds after the last slab was handed over (a run's end waits for them), the
most pages handed over and not yet on disk (host memory the writer holds; the file's size read at each
hand-over), and the longest gap of a Python thread ticking beside it every 0.5 ms (what the main thread's
launches would see; on a machine with few cores it is mostly the compression's CPU, not the GIL). The
labels: one slab of 8×8-voxel blocks of random classes with 2 % single-voxel pores (compresses ~6.7×,
as a random network's labels about do), handed over again and again.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from xctrt.io import write_volume_tiff  # noqa: E402


def labels_slab(slab: int, y: int, x: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 4, (slab, -(-y // 8), -(-x // 8)), dtype=np.uint8)
    lab = np.repeat(np.repeat(blocks, 8, 1), 8, 2)[:, :y, :x].copy()
    lab[rng.random(lab.shape, dtype=np.float32) < 0.02] = 2
    return lab


def write_at_pace(path: Path, lab: np.ndarray, z: int, rate: float, batch_pages: int) -> dict:
    slab = len(lab)
    q: queue.Queue = queue.Queue(maxsize=2)
    done: dict = {}

    def pages():
        while True:
            item = q.get()
            if item is None:
                return
            yield from item

    def writer():
        write_volume_tiff(path, pages(), (z, *lab.shape[1:]), np.uint8, None, batch_pages=batch_pages)
        done["t"] = time.perf_counter()

    stop = threading.Event()
    gaps = []

    def ticker():
        last = time.perf_counter()
        while not stop.is_set():
            time.sleep(0.0005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = threading.Thread(target=ticker)
    write = threading.Thread(target=writer)
    tick.start()
    write.start()
    handed, on_disk_bytes = [], []
    t0 = time.perf_counter()
    for i, z0 in enumerate(range(0, z, slab)):
        wait = t0 + z0 / rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        on_disk_bytes.append(path.stat().st_size if path.exists() else 0)
        q.put(lab[:min(slab, z - z0)])
        handed.append(min(z, z0 + slab))
    last = time.perf_counter()
    q.put(None)
    write.join()
    stop.set()
    tick.join()
    page_bytes = path.stat().st_size / z   # compressed, on average
    behind = [h - slab - b / page_bytes for h, b in zip(handed, on_disk_bytes)]   # before this slab's hand-over
    return {"batch_pages": batch_pages, "seconds": round(done["t"] - t0, 3),
            "after_last_slab_s": round(done["t"] - last, 3),
            "most_pages_not_on_disk": int(round(max(behind))),
            "ticker_longest_gap_ms": round(max(gaps) * 1e3, 1),
            "ticker_gaps_over_10ms": sum(g > 0.010 for g in gaps),
            "compressed_ratio": round(lab.nbytes / len(lab) * z / path.stat().st_size, 2)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(1000, 1200, 1200), metavar=("Z", "Y", "X"))
    ap.add_argument("--slab", type=int, default=32)
    ap.add_argument("--rate", type=float, default=100.0, help="slices handed over per second")
    ap.add_argument("--tifffile-batch", type=int, default=368, help="pages in tifffile's own batch")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each way, alternating")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    z, y, x = args.shape
    lab = labels_slab(args.slab, y, x)
    ways = {"per slab": args.slab, "tifffile default": args.tifffile_batch}
    runs = {name: [] for name in ways}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            for name, batch in ways.items():
                path = Path(tmp) / f"labels{r}.tif"
                res = write_at_pace(path, lab, z, args.rate, batch)
                path.unlink()
                runs[name].append(res)
                print(f"{name:17s} {json.dumps(res)}", flush=True)
    out = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "host": platform.node(),
           "cpus": len(os.sched_getaffinity(0)), "shape": [z, y, x], "slab": args.slab,
           "rate": args.rate, "runs": runs}
    print("\n| way | batch pages | writer after the last slab, s | most pages not on disk | longest tick gap, ms |")
    print("|---|---|---|---|---|")
    for name, rs in runs.items():
        print(f"| {name} | {rs[0]['batch_pages']} | {' / '.join(str(r['after_last_slab_s']) for r in rs)} | "
              f"{' / '.join(str(r['most_pages_not_on_disk']) for r in rs)} | "
              f"{' / '.join(str(r['ticker_longest_gap_ms']) for r in rs)} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
