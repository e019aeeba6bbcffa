"""Build the small, randomly initialised model package that ships until a trained one lands.

It follows the runtime's graph contract (image (N,1,S,S) in [0,1] -> probabilities (N,3,S,S)),
so every stage of `xctrt segment` runs for real; its labels mean nothing. A fixed 5x5 mean
filter in front of the random convolutions keeps the output from being per-voxel speckle.
Deterministic: the same seed gives byte-identical files (a test checks the shipped copy).

    python training/make_untrained_model.py python/xctrt/models/untrained-tiny
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from xctrt.model import write_package  # noqa: E402

CLASSES = ["material", "pore", "inclusion"]
TILE = 256


def build_graph(seed: int = 0, hidden: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((hidden, 1, 3, 3)) * np.sqrt(2 / 9)).astype(np.float32) * 4
    b1 = (rng.standard_normal(hidden) * 0.5).astype(np.float32)
    w2 = (rng.standard_normal((len(CLASSES), hidden, 1, 1)) * np.sqrt(2 / hidden)).astype(np.float32)
    b2 = np.zeros(len(CLASSES), np.float32)
    nodes = [
        helper.make_node("AveragePool", ["image"], ["smooth"], kernel_shape=[5, 5], pads=[2, 2, 2, 2],
                         count_include_pad=0),
        helper.make_node("Conv", ["smooth", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Conv", ["hr", "w2", "b2"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["probs"]),
    ]
    graph = helper.make_graph(
        nodes, "untrained_tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, TILE, TILE])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", len(CLASSES), TILE, TILE])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="xctrt")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def manifest(seed: int) -> dict:
    return {
        "name": "untrained-tiny",
        "trained": False,
        "description": "Random weights (seed %d): exercises the whole pipeline; its labels mean nothing. "
                       "Replace with a trained Conv-LoRA SAM package." % seed,
        "backbone": "tiny CNN (mean filter + 2 random conv layers), 107 parameters",
        "training_data": "none",
        "recipe": f"python training/make_untrained_model.py OUT --seed {seed}",
        "classes": [{"id": i + 1, "name": n, "threshold": 0.5} for i, n in enumerate(CLASSES)],
        "aggregation": "priority",
        "priority": ["inclusion", "pore", "material"],
        "input": {"size": TILE, "mode": "tile", "overlap": 32, "blend": "ramp", "pad": "edge"},
        "intensity_window": {"mode": "percentile", "low": 0.5, "high": 99.5},
        "graphs": [{"file": "model.onnx", "outputs": CLASSES}],
        "metrics": {},
        "versions": {"onnx_opset": 17},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="package folder (or .zip) to write")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    write_package(args.out, manifest(args.seed), {"model.onnx": build_graph(args.seed)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
