"""Device operations per slab of the GPU slab labeller, counted without a GPU.

    python benchmarks/labeller_launches.py [--source OLD_post.py] [--labels speckle|phantom]
                                           [--planes 64] [--size 300] [--slab 32] [--json FILE]

xctrt.gpu.post.ComponentLabeller runs on the tests' CuPy stand-in (tests/fake_cupy.py), which counts
each device array operation (about one CUDA kernel launch on CuPy; the air labelling counts one though
CuPy's takes a few) and each host sync. On the H200 the labeller, beside the encoder, took 0.05-0.16 s
per 32-plane slab against 0.48 s for all 1000 planes alone (benchmarks/RESULTS.md, 2026-11-27): there
each of its small kernels waits for SMs the encoder's GEMMs hold, so its time there follows its launch
count. --source: also count an older copy of post.py (e.g. `git show 2ea8611:python/xctrt/gpu/post.py`),
on the same slabs, and check that both give the same table. The labels are host_components.py's.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import fake_cupy  # noqa: E402
from host_components import slabs, speckle_slabs  # noqa: E402
from xctrt.gpu import post  # noqa: E402


def load_post(path: Path):
    """An older xctrt/gpu/post.py as a module of the installed package (its relative imports resolve)."""
    spec = importlib.util.spec_from_file_location("xctrt.gpu._post_source", path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "xctrt.gpu"
    spec.loader.exec_module(mod)
    mod.__file__ = post.__file__   # its kernel sources: this package's
    return mod


def count(mod, data, shape) -> dict:
    """The labeller of module `mod` over the slabs on the stand-in: operations and syncs per slab, and
    in finish(); the table (host arrays)."""
    mod._cupy, mod._cupyx = fake_cupy, fake_cupy.cupyx
    cx = fake_cupy.cupyx   # what air_label imports where it falls back to CuPy's labelling
    sys.modules.update({"cupyx": cx, "cupyx.scipy": cx.scipy, "cupyx.scipy.ndimage": cx.scipy.ndimage})
    for name in ("_kernels", "_air_search"):   # compile (here: look up) the kernels afresh
        if isinstance(getattr(mod, name, None), dict):
            setattr(mod, name, {} if name == "_kernels" else {"kernel": None, "error": None})
    lb = mod.ComponentLabeller(shape)
    per = []
    for lab, grey in data:
        fake_cupy.ops = fake_cupy.syncs = 0
        lb.add_slab(fake_cupy.asarray(lab), fake_cupy.asarray(grey))
        per.append((fake_cupy.ops, fake_cupy.syncs))
    fake_cupy.ops = fake_cupy.syncs = 0
    table = lb.finish()
    ops, syncs = np.array(per).T
    return {"ops_per_slab": float(ops.mean()), "ops_per_slab_max": int(ops.max()),
            "syncs_per_slab": float(syncs.mean()), "finish_ops": fake_cupy.ops, "finish_syncs": fake_cupy.syncs,
            "defects": len(table["id"])}, table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, help="an older xctrt/gpu/post.py to count as well")
    ap.add_argument("--labels", choices=("speckle", "phantom"), default="speckle")
    ap.add_argument("--planes", type=int, default=64)
    ap.add_argument("--size", type=int, default=300, help="Y = X")
    ap.add_argument("--slab", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    shape = (args.planes, args.size, args.size)
    data = (speckle_slabs if args.labels == "speckle" else slabs)(args.planes, args.size, args.slab)
    out = {"shape": list(shape), "slab": args.slab, "labels": args.labels}
    out["now"], table = count(post, data, shape)
    if args.source:
        out["source"] = str(args.source)
        out["before"], old = count(load_post(args.source), data, shape)
        out["same_table"] = table.keys() == old.keys() and all(
            np.array_equal(table[k], old[k], equal_nan=True) for k in table)
    for k in ("before", "now"):
        if k in out:
            r = out[k]
            print(f"{k:6s} {r['ops_per_slab']:7.1f} device operations per slab (max {r['ops_per_slab_max']}), "
                  f"{r['syncs_per_slab']:5.1f} host syncs; finish {r['finish_ops']} operations, "
                  f"{r['finish_syncs']} syncs; {r['defects']} defects")
    if "same_table" in out:
        print(f"same table: {out['same_table']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0 if out.get("same_table", True) else 1


if __name__ == "__main__":
    sys.exit(main())
