"""Conv-LoRA experts routed (each window through the expert its gate chose) against the graph as exported
(all 8 experts on every window, a one-hot keeps one): ONNX Runtime on the CPU, same run, same volume.

    PYTHONPATH=python python benchmarks/routed_experts.py ../shared/data/smg/test1 ../shared/data/smg/test5 \
        --slices 3 --json benchmarks/results/routed_experts.json

For each volume the middle --slices slices are segmented by `xctrt segment`'s pipeline twice, once per
engine (after a one-tile warm-up). Labels and defect tables must be identical (exit status 1
otherwise); the wall-clock ratio is the speed-up. The gates' choices over one slice's tiles (fraction of
windows per expert, all adapters together) say where it comes from: the experts upsample by 1..8x, so
the cost of a window depends on the expert it routes to.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from xctrt.backends import OnnxRuntimeEngine  # noqa: E402
from xctrt.model import load_package  # noqa: E402
from xctrt.pipeline import Segmenter  # noqa: E402


def gate_choices(package, tiles: np.ndarray, threads: int) -> dict[int, float]:
    """Fraction of windows routed to each expert, over every adapter of every graph, for these tiles."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    counts: dict[int, int] = {}
    for g in package.graphs:
        model = onnx.load_from_string(g.data)
        argmax = [n.output[0] for n in model.graph.node if n.op_type == "ArgMax"]
        model.graph.output.extend(onnx.ValueInfoProto(name=a) for a in argmax)
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        for out in sess.run(argmax, {sess.get_inputs()[0].name: tiles}):
            for e, c in zip(*np.unique(out, return_counts=True)):
                counts[int(e)] = counts.get(int(e), 0) + int(c)
    total = sum(counts.values())
    return {e: counts[e] / total for e in sorted(counts)}


def middle_tiles(slice_: np.ndarray, lo: float, hi: float, size: int) -> np.ndarray:
    """The size x size tiles of one windowed slice at stride size (edge tiles shifted inside)."""
    img = np.clip((slice_.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)
    ys = sorted({min(y, img.shape[0] - size) for y in range(0, img.shape[0], size)})
    xs = sorted({min(x, img.shape[1] - size) for x in range(0, img.shape[1], size)})
    return np.stack([img[y:y + size, x:x + size] for y in ys for x in xs])[:, None]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("volumes", nargs="+", type=Path, help="folders with image.tif, or TIFF files")
    ap.add_argument("-m", "--model", default="default")
    ap.add_argument("--slices", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    package = load_package(args.model)
    engines = {"as exported": OnnxRuntimeEngine(package, args.threads, route=False),
               "routed": OnnxRuntimeEngine(package, args.threads, route=True)}
    res = {"model": package.name, "threads": args.threads, "machine": platform.node(),
           "cpu": platform.processor() or platform.machine(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "routed_adapters": engines["routed"].routed_adapters, "volumes": []}
    ok = True
    with tempfile.TemporaryDirectory(prefix="xctrt-routed-") as tmp:
        for src in args.volumes:
            path = src / "image.tif" if src.is_dir() else src
            vol = tifffile.imread(path)
            z0 = max(0, vol.shape[0] // 2 - args.slices // 2)
            sub = np.ascontiguousarray(vol[z0:z0 + args.slices])
            part = Path(tmp) / f"{src.name}.tif"
            warm = Path(tmp) / f"{src.name}-warm.tif"
            tifffile.imwrite(part, sub)
            tifffile.imwrite(warm, sub[:1, :package.input_size, :package.input_size])   # one tile: warm-up only
            row = {"volume": str(src), "slices": [z0, z0 + sub.shape[0]], "shape": list(sub.shape), "runs": {}}
            out = {}
            for name, eng in engines.items():
                seg = Segmenter(package, engine=eng, threads=args.threads, progress=False)
                seg.segment(warm, keep_labels=False)
                t0 = time.perf_counter()
                r = seg.segment(part, out_dir=Path(tmp) / f"{src.name}-{name.replace(' ', '_')}", keep_labels=True)
                wall = time.perf_counter() - t0
                out[name] = r
                row["runs"][name] = {"wall_s": round(wall, 2), "slices_per_s": round(sub.shape[0] / wall, 4),
                                     "defects": {k: v["count"] for k, v in r.summary["result"]["defects"].items()}}
            a, b = out["as exported"], out["routed"]
            row["labels_identical"] = bool(np.array_equal(a.labels, b.labels))
            row["table_identical"] = set(a.defects) == set(b.defects) and all(
                np.array_equal(a.defects[k], b.defects[k], equal_nan=a.defects[k].dtype.kind == "f") for k in a.defects)
            row["speedup"] = round(row["runs"]["as exported"]["wall_s"] / row["runs"]["routed"]["wall_s"], 2)
            lo, hi = a.summary["run"]["intensity_window"]
            row["gate_choices"] = gate_choices(package, middle_tiles(sub[sub.shape[0] // 2], lo, hi,
                                                                     package.input_size), args.threads)
            ok &= row["labels_identical"] and row["table_identical"]
            res["volumes"].append(row)
            print(f"{src}: slices {z0}..{z0 + sub.shape[0] - 1} of {vol.shape}: as exported "
                  f"{row['runs']['as exported']['wall_s']:.1f} s, routed {row['runs']['routed']['wall_s']:.1f} s, "
                  f"x{row['speedup']:.2f}; labels identical {row['labels_identical']}, "
                  f"table identical {row['table_identical']}", flush=True)
            print("  windows per expert: " + ", ".join(f"{e}: {100 * f:.1f} %" for e, f in row["gate_choices"].items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
