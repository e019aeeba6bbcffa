"""The ONNX Runtime engine's CPU rewrites of the shipped Conv-LoRA model, against the graph as exported:
same run, same volumes.

    PYTHONPATH=python python benchmarks/routed_experts.py ../shared/data/smg/test1 ../shared/data/smg/test5 \
        --slices 3 --json benchmarks/results/routed_experts.json

Three engines segment the middle --slices slices of each volume with `xctrt segment`'s pipeline (each
after a one-tile warm-up):
  as exported   all 8 experts of every adapter run on every window; a one-hot keeps one
  routed        each expert runs only on the windows its gate chose (graph_rewrites.route_experts)
  matmul        routed, and the experts' bicubic Resizes run as two MatMuls each
                (graph_rewrites.resize_as_matmul): what the engine does by default
The routed labels and defect tables must be identical to those as exported; the matmul ones may differ
only by float32 rounding, so the script counts the label voxels that differ from routed and fails when
more than --max-changed of them (a fraction) do. Where the volume's folder has labels.tif, each
engine's per-class IoU against it is reported too. Exit status 1 when a check fails. The wall-clock
ratios are the speed-ups. --skip-exported leaves the slow first engine out (longer accuracy runs);
--profile adds ONNX Runtime's profile of each engine on 4 tiles of the middle slice (kernel time per
tile, and the share of it in Resize).
The gates' choices over one slice's tiles (fraction of windows per expert, all adapters together) say
where the routing gain comes from: the experts upsample by 1..8x, so a window's cost depends on its expert.
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

from xctrt.backends import OnnxRuntimeEngine, rewrite_for_cpu  # noqa: E402
from xctrt.metrics import CLASS_NAMES, iou_per_class  # noqa: E402
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


def kernel_profile(package, tiles: np.ndarray, threads: int, route: bool, resize_matmul: bool) -> dict:
    """ONNX Runtime's own profile of the package's graphs, rewritten as the engine would be, over these
    tiles (after one warm-up run): kernel milliseconds per tile, and the share of that in Resize."""
    import onnxruntime as ort

    total = resize = 0.0
    with tempfile.TemporaryDirectory(prefix="xctrt-profile-") as tmp:
        for g in package.graphs:
            data = rewrite_for_cpu(g.data, route, resize_matmul)[0]
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(tmp) / "ort")
            sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
            feed = {sess.get_inputs()[0].name: tiles}
            sess.run(None, feed)   # the first run of a session pays its one-off costs: count the second
            sess.run(None, feed)
            events = json.loads(Path(sess.end_profiling()).read_text())
            runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
            start = runs[-1]["ts"] if runs else 0
            for e in events:
                if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
                    total += e["dur"]
                    resize += e["dur"] if e.get("args", {}).get("op_name") == "Resize" else 0
    return {"kernel_ms_per_tile": round(total / 1e3 / len(tiles), 1), "resize_share": round(resize / total, 4)}


def middle_tiles(slice_: np.ndarray, lo: float, hi: float, size: int) -> np.ndarray:
    """The size x size tiles of one windowed slice at stride size (edge tiles shifted inside)."""
    img = np.clip((slice_.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)
    ys = sorted({min(y, img.shape[0] - size) for y in range(0, img.shape[0], size)})
    xs = sorted({min(x, img.shape[1] - size) for x in range(0, img.shape[1], size)})
    return np.stack([img[y:y + size, x:x + size] for y in ys for x in xs])[:, None]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("volumes", nargs="+", type=Path, help="folders with image.tif (and labels.tif), or TIFF files")
    ap.add_argument("-m", "--model", default="default")
    ap.add_argument("--slices", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch-size", type=int, default=8, help="tiles per engine call (default: %(default)s, "
                    "as the 2026-11-26/27 runs in benchmarks/RESULTS.md)")
    ap.add_argument("--skip-exported", action="store_true", help="leave out the graph as exported")
    ap.add_argument("--max-changed", type=float, default=1e-4,
                    help="largest fraction of label voxels matmul may change against routed (default 1e-4)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one batch of the middle slice's tiles per engine (kernel time, Resize share)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    package = load_package(args.model)
    engines = {"routed": OnnxRuntimeEngine(package, args.threads, resize_matmul=False),
               "matmul": OnnxRuntimeEngine(package, args.threads)}
    if not args.skip_exported:
        engines = {"as exported": OnnxRuntimeEngine(package, args.threads, route=False, resize_matmul=False),
                   **engines}
    res = {"model": package.name, "threads": args.threads, "batch_size": args.batch_size, "machine": platform.node(),
           "cpu": platform.processor() or platform.machine(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
           "routed_adapters": engines["routed"].routed_adapters,
           "matmul_resizes": engines["matmul"].matmul_resizes, "max_changed": args.max_changed, "volumes": []}
    ok = True
    with tempfile.TemporaryDirectory(prefix="xctrt-routed-") as tmp:
        for src in args.volumes:
            path = src / "image.tif" if src.is_dir() else src
            vol = tifffile.imread(path)
            z0 = max(0, vol.shape[0] // 2 - args.slices // 2)
            sub = np.ascontiguousarray(vol[z0:z0 + args.slices])
            truth = (np.asarray(tifffile.imread(src / "labels.tif")[z0:z0 + sub.shape[0]])
                     if src.is_dir() and (src / "labels.tif").exists() else None)
            part = Path(tmp) / f"{src.name}.tif"
            warm = Path(tmp) / f"{src.name}-warm.tif"
            tifffile.imwrite(part, sub)
            tifffile.imwrite(warm, sub[:1, :package.input_size, :package.input_size])   # one tile: warm-up only
            row = {"volume": str(src), "slices": [z0, z0 + sub.shape[0]], "shape": list(sub.shape), "runs": {}}
            out = {}
            for name, eng in engines.items():
                seg = Segmenter(package, engine=eng, threads=args.threads, batch_size=args.batch_size,
                                progress=False)
                seg.segment(warm, keep_labels=False)
                t0 = time.perf_counter()
                r = seg.segment(part, out_dir=Path(tmp) / f"{src.name}-{name.replace(' ', '_')}", keep_labels=True)
                wall = time.perf_counter() - t0
                out[name] = r
                row["runs"][name] = {"wall_s": round(wall, 2), "slices_per_s": round(sub.shape[0] / wall, 4),
                                     "defects": {k: v["count"] for k, v in r.summary["result"]["defects"].items()}}
                if truth is not None:
                    row["runs"][name]["iou"] = {CLASS_NAMES[c]: v for c, v in iou_per_class(r.labels, truth).items()}
            routed, fast = out["routed"], out["matmul"]
            changed = int(np.count_nonzero(routed.labels != fast.labels))
            row["matmul"] = {"label_voxels_changed": changed, "fraction_changed": changed / routed.labels.size,
                             "table_identical": same_table(routed, fast),
                             "speedup_over_routed": round(row["runs"]["routed"]["wall_s"]
                                                          / row["runs"]["matmul"]["wall_s"], 2)}
            ok &= changed <= args.max_changed * routed.labels.size
            line = (f"{src}: slices {z0}..{z0 + sub.shape[0] - 1} of {vol.shape}: "
                    + ", ".join(f"{k} {v['wall_s']:.1f} s" for k, v in row["runs"].items()))
            if "as exported" in out:
                a = out["as exported"]
                row["labels_identical"] = bool(np.array_equal(a.labels, routed.labels))
                row["table_identical"] = same_table(a, routed)
                row["speedup"] = round(row["runs"]["as exported"]["wall_s"] / row["runs"]["routed"]["wall_s"], 2)
                ok &= row["labels_identical"] and row["table_identical"]
                line += (f"; routed x{row['speedup']:.2f} over as exported, labels identical "
                         f"{row['labels_identical']}, table identical {row['table_identical']}")
            line += (f"; matmul x{row['matmul']['speedup_over_routed']:.2f} over routed, {changed} label voxels "
                     f"changed ({100 * row['matmul']['fraction_changed']:.5f} %), table identical "
                     f"{row['matmul']['table_identical']}")
            if truth is not None:
                line += "; IoU " + ", ".join(f"{k} " + "/".join("-" if v["iou"][c] is None else f"{v['iou'][c]:.4f}"
                                                                for c in ("material", "pore", "inclusion"))
                                             for k, v in row["runs"].items())
            lo, hi = routed.summary["run"]["intensity_window"]
            tiles = middle_tiles(sub[sub.shape[0] // 2], lo, hi, package.input_size)
            row["gate_choices"] = gate_choices(package, tiles, args.threads)
            if args.profile:
                tiles = tiles[:4]
                how = {"as exported": (False, False), "routed": (True, False), "matmul": (True, True)}
                row["profile"] = {name: kernel_profile(package, tiles, args.threads, *how[name]) for name in engines}
                line += "; ONNX Runtime profile, 4 tiles: " + ", ".join(
                    f"{k} {v['kernel_ms_per_tile']:.0f} ms per tile, {100 * v['resize_share']:.1f} % in Resize"
                    for k, v in row["profile"].items())
            res["volumes"].append(row)
            print(line, flush=True)
            print("  windows per expert: " + ", ".join(f"{e}: {100 * f:.1f} %" for e, f in row["gate_choices"].items()))
    res["ok"] = bool(ok)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    return 0 if ok else 1


def same_table(a, b) -> bool:
    """Two runs' defect tables: the same classes, the same columns, the same values (NaN equal to NaN)."""
    return set(a.defects) == set(b.defects) and all(
        np.array_equal(a.defects[k], b.defects[k], equal_nan=a.defects[k].dtype.kind == "f") for k in a.defects)


if __name__ == "__main__":
    sys.exit(main())
