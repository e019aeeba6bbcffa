"""A real model package on the GPU path: `--device cuda` against the host pipeline, same engine.

    python benchmarks/gpu_package_check.py --out DIR                         # GPU machine, shipped model
    python benchmarks/gpu_package_check.py --out DIR --host-arrays -m untrained-tiny --shape 4 300 280

Both runs use the torch backend (the package's ONNX graphs through onnx2torch, float32) on the same
device, so the model computes the same numbers; only the stages around it move: the host pipeline
tiles, stitches, aggregates and labels components in C++, `--device cuda` does all of that in CuPy
on the GPU. Labels and defect tables must be identical; the speeds say what moving them is worth.
A third run, `--device cuda --precision bf16`, reports its speed and how many labels it changes.
A fourth runs the Conv-LoRA experts routed on the GPU (graph_rewrites.route_experts, as ONNX Runtime
runs them on a CPU: each expert only on the windows its gate chose): data-dependent shapes, so no
CUDA graphs and no folded shapes, against 1/8 of the experts' work; its speed and label agreement
say whether `--device cuda` should route them.
JSON goes to DIR/gpu_package.json; a short table is printed last.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from xctrt.backends import TorchEngine  # noqa: E402
from xctrt.model import load_package  # noqa: E402
from xctrt.phantom import write_phantom  # noqa: E402
from xctrt.pipeline import Segmenter  # noqa: E402


def compare(res: dict, labels: dict) -> None:
    """The host pipeline's labels and table against the GPU path's (float32), and bf16's labels against both."""
    (lh, th), (lg, tg) = labels["host"], labels["gpu"]
    res["labels_identical"] = bool(np.array_equal(lh, lg))
    res["label_agreement"] = float((lh == lg).mean())
    res["table_identical"] = set(th) == set(tg) and all(
        th[k].dtype == tg[k].dtype and np.array_equal(th[k], tg[k], equal_nan=th[k].dtype.kind == "f") for k in th)
    res["bf16_label_agreement"] = float((labels["gpu-bf16"][0] == lg).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("-m", "--model", default="default")
    ap.add_argument("--shape", type=int, nargs=3, default=[16, 768, 768])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--slab", type=int, default=16)
    ap.add_argument("--host-arrays", action="store_true", help="the GPU path's code on the host (dry run)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = "host-arrays" if args.host_arrays else "cuda"
    res: dict = {"model": args.model, "shape": args.shape, "batch": args.batch_size, "slab": args.slab, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="xctrt-pkg-") as tmp:
        vol, warm = Path(tmp) / "phantom.tif", Path(tmp) / "warm.tif"
        write_phantom(vol, tuple(args.shape), seed=0, voxel_size=(0.01,) * 3)
        write_phantom(warm, (2,) + tuple(args.shape[1:]), seed=1, voxel_size=(0.01,) * 3)
        labels = {}
        for name, device, precision in (("host", "cpu", "fp32"), ("gpu", gpu, "fp32"), ("gpu-bf16", gpu, "bf16"),
                                        ("gpu-routed", gpu, "fp32")):
            engine = None
            if name == "gpu-routed":   # the experts routed: a module with dynamic shapes (static_batch off)
                engine = TorchEngine(load_package(args.model), precision=precision,
                                     device="cpu" if args.host_arrays else "cuda", static_batch=False)
            seg = Segmenter(args.model, backend="torch", batch_size=args.batch_size, slab=args.slab,
                            progress=False, device=device, precision=precision, engine=engine)
            seg.segment(warm, keep_labels=False)         # warm-up: module load, kernel choice, allocations
            t0 = time.perf_counter()
            r = seg.segment(vol, out_dir=Path(tmp) / name, keep_labels=True)
            wall = time.perf_counter() - t0
            labels[name] = (r.labels, r.defects)
            res["runs"][name] = {"pipeline": device, "precision": precision,
                                 "engine": f"{seg.engine.name} on {seg.engine.device}",
                                 "wall_s": wall, "slices_per_s": args.shape[0] / wall,
                                 "stage_busy_s": r.summary["timing"]["stage_busy_s"],
                                 "gpu_memory_used_max_gib": r.summary["timing"].get("gpu_memory_used_max_gib"),
                                 "cuda_graphs_not_used_because": r.summary["timing"].get("cuda_graphs_not_used_because"),
                                 "fused_kernels_not_used_because":
                                     r.summary["timing"].get("fused_kernels_not_used_because"),
                                 "routed_adapters": seg.engine.routed_adapters,
                                 "defects": {k: v["count"] for k, v in r.summary["result"]["defects"].items()}}
            if name == "gpu-bf16":   # saved before the routed run too: if that one runs out of time, these stay
                compare(res, labels)
                (args.out / "gpu_package.json").write_text(json.dumps(res, indent=2))
    compare(res, labels)
    res["routed_label_agreement"] = float((labels["gpu-routed"][0] == labels["gpu"][0]).mean())
    (args.out / "gpu_package.json").write_text(json.dumps(res, indent=2))
    h, g, b, rt = (res["runs"][k] for k in ("host", "gpu", "gpu-bf16", "gpu-routed"))
    print(f"model {args.model}, volume {args.shape}, batch {args.batch_size}, engine {h['engine']}")
    print(f"{'pipeline':<16}{'slices/s':>10}   busy s per stage")
    for name, r in (("host (C++)", h), (f"{gpu}", g), (f"{gpu} bf16", b), (f"{gpu} routed", rt)):
        print(f"{name:<16}{r['slices_per_s']:>10.2f}   "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["stage_busy_s"].items() if v >= 0.005))
    print(f"labels identical: {res['labels_identical']} ({100 * res['label_agreement']:.4f} %), "
          f"defect table identical: {res['table_identical']}; bf16 vs float32 labels agree "
          f"{100 * res['bf16_label_agreement']:.4f} %; experts routed ({rt['routed_adapters']} adapters, "
          f"CUDA graphs not used because: {rt['cuda_graphs_not_used_because']}) vs static labels agree "
          f"{100 * res['routed_label_agreement']:.4f} %")
    return 0 if res["labels_identical"] and res["table_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
