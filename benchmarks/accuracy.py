"""Accuracy of a model (or the classical baseline) on labelled test volumes.

    PYTHONPATH=python:. python benchmarks/accuracy.py MODEL DATA_DIR [--sets test1 test3 test4 test5]
        [--json OUT] [--every N] [--backend auto|onnxruntime|torch|tensorrt]

MODEL: a model package path, "default" (the package shipped with xctrt), or "classical" (the
NumPy/SciPy baseline in benchmarks/classical.py). DATA_DIR holds one folder per set with
image.tif and labels.tif (uint8, 0 air 1 material 2 pore 3 inclusion).

For each set: per-class IoU over the evaluated slices (xctrt.metrics: TP/(TP+FP+FN), voxel
counts summed; None when the class is absent from truth and prediction) and the paper's
layer-by-layer precision/recall/F1 (mean ± std over slices; slices where a ratio is 0/0 are
skipped, see xctrt.metrics), plus wall-clock and CPU seconds per evaluated slice (from opening
the image file to having the labels; CPU = this process, all threads).

--every N evaluates slices 0, N, 2N, ... only. Packages then segment only those slices, with the
intensity window computed on the whole volume (as a full run would); the classical baseline uses
the whole volume's Otsu threshold. Both are 2D per slice, so the labels of an evaluated slice
are the same as in a full run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from xctrt.metrics import CLASS_NAMES, MetricsAccumulator, fmt_mean_std, fmt_value  # noqa: E402

CLASSES = (1, 2, 3)
NAMES = [CLASS_NAMES[c] for c in CLASSES]


class ClassicalRunner:
    name = "classical"

    def __init__(self):
        import classical
        self.mod = classical
        self.info = classical.describe()

    def __call__(self, image_path: Path, every: int) -> np.ndarray:
        vol = tifffile.imread(image_path)
        t = self.mod.volume_threshold(vol)
        return self.mod.segment_classical(vol[::every], threshold=t)


class PackageRunner:
    def __init__(self, model: str, backend: str, batch_size: int, threads: int):
        import xctrt
        self.seg = xctrt.Segmenter(model, backend=backend, batch_size=batch_size, threads=threads, progress=False)
        pkg = self.seg.package
        self.name = pkg.name
        self.info = {"name": pkg.name, "path": str(pkg.path), "trained": pkg.trained,
                     "backend": self.seg.engine.name, "device": self.seg.engine.device}

    def __call__(self, image_path: Path, every: int) -> np.ndarray:
        if every == 1:
            self.seg.window = None
            return self.seg.segment(image_path, keep_labels=True).labels
        from xctrt.io import open_volume
        src = open_volume(image_path)
        try:
            self.seg.window = None
            window = self.seg.intensity_window(src)  # of the whole volume, as a full run computes it
            sub = np.stack([src.read(z, z + 1)[0] for z in range(0, src.shape[0], every)])
        finally:
            src.close()
        self.seg.window = window
        try:
            return self.seg.segment(sub, keep_labels=True).labels
        finally:
            self.seg.window = None


def evaluate_set(runner, set_dir: Path, every: int, slab: int = 8) -> dict:
    image_path, labels_path = set_dir / "image.tif", set_dir / "labels.tif"
    w0, c0 = time.perf_counter(), time.process_time()
    pred = runner(image_path, every)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    truth = tifffile.imread(labels_path)
    shape = list(truth.shape)
    truth = truth[::every]
    if pred.shape != truth.shape:
        raise SystemExit(f"{set_dir}: prediction {pred.shape} and labels {truth.shape} differ")
    acc = MetricsAccumulator(CLASSES)
    for z0 in range(0, len(truth), slab):  # streamed, slab by slab
        acc.update(pred[z0:z0 + slab], truth[z0:z0 + slab])
    n = len(truth)
    return {"shape": shape, "every": every, "slices_evaluated": n, "wall_s": wall, "cpu_s": cpu,
            "wall_s_per_slice": wall / n, "cpu_s_per_slice": cpu / n, "metrics": acc.result()}


def _iou_cell(c: dict) -> str:
    s = fmt_value(c["iou"])
    return s + " (none in truth)" if c["truth_voxels"] == 0 and c["iou"] is not None else s


def tables(model_label: str, results: dict) -> str:
    out = [f"IoU over each volume and time ({model_label})", "",
           "| set | slices evaluated | IoU material | IoU pore | IoU inclusion | wall s/slice | CPU s/slice |",
           "|---|---|---|---|---|---|---|"]
    for s, r in results.items():
        c = r["metrics"]["classes"]
        out.append(f"| {s} | {r['slices_evaluated']} of {r['shape'][0]} | "
                   + " | ".join(_iou_cell(c[k]) for k in NAMES)
                   + f" | {r['wall_s_per_slice']:.3f} | {r['cpu_s_per_slice']:.3f} |")
    out += ["", f"Layer-by-layer mean ± std over slices ({model_label}); n = slices scored for P / R / F1", "",
            "| set | class | precision | recall | F1 | n (P/R/F1) |", "|---|---|---|---|---|---|"]
    for s, r in results.items():
        for k in NAMES:
            c = r["metrics"]["classes"][k]
            out.append(f"| {s} | {k} | {fmt_mean_std(c['precision'])} | {fmt_mean_std(c['recall'])} | "
                       f"{fmt_mean_std(c['f1'])} | {c['precision']['n']}/{c['recall']['n']}/{c['f1']['n']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help='model package path, "default" or "classical"')
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--sets", nargs="+", default=["test1", "test3", "test4", "test5"])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--every", type=int, default=1, help="evaluate every N-th slice only")
    ap.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "torch", "tensorrt"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.every < 1:
        ap.error("--every must be at least 1")
    missing = [s for s in a.sets if not (a.data_dir / s / "image.tif").is_file()
               or not (a.data_dir / s / "labels.tif").is_file()]
    if missing:
        ap.error(f"{a.data_dir}: no image.tif + labels.tif for {', '.join(missing)}")

    runner = ClassicalRunner() if a.model == "classical" else PackageRunner(a.model, a.backend, a.batch_size, a.threads)
    label = runner.name + ("" if runner.info.get("trained", True) or a.model == "classical" else " (UNTRAINED)")
    results = {}
    for s in a.sets:
        r = evaluate_set(runner, a.data_dir / s, a.every)
        results[s] = r
        c = r["metrics"]["classes"]
        print(f"{s} {tuple(r['shape'])}: {r['slices_evaluated']} slices, {r['wall_s_per_slice']:.3f} s/slice "
              f"({r['cpu_s_per_slice']:.3f} CPU s/slice)", flush=True)
        for k in NAMES:
            print(f"  {k:<9} IoU {_iou_cell(c[k]):<7}  P {fmt_mean_std(c[k]['precision'])}  "
                  f"R {fmt_mean_std(c[k]['recall'])}  F1 {fmt_mean_std(c[k]['f1'])}", flush=True)
    md = tables(label, results)
    print()
    print(md)
    if a.json:
        doc = {"model": a.model, "model_info": runner.info, "data_dir": str(a.data_dir), "sets": results,
               "every": a.every, "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
               "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "machine": {"host": platform.node(), "machine": platform.machine(), "cpus": os.cpu_count(),
                           "python": platform.python_version(), "numpy": np.__version__},
               "markdown": md}
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
