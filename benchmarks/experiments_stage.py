"""Stage the data of benchmarks/experiments_gpu.sh: contiguous slice blocks (2.5D needs true neighbours)
cut from ../shared/data/smg, small enough to travel with a device call, plus a small simulated scan.

    PYTHONPATH=python:. python benchmarks/experiments_stage.py ../shared/data/smg .devdata/exp [--small]

Every staged volume folder holds image.tif, labels.tif and slices.json (training/common.py:
read_slices_json): its `segments` are the blocks (2.5D context never crosses a block end, where the
edge slice is replicated as at a volume end) and its `targets` the slices whose labels count.

    train/pair_1, train/pair_2   blocks of TRAIN_LEN slices, evenly spread, one per 200 source slices
                                 (at most TRAIN_BLOCKS, at least 1); all slices are targets
    test1, test3, test4, test5   EVAL_BLOCKS blocks of EVAL_LEN slices; targets = the inner slices
                                 (2 context slices at each block end are not scored). test5's blocks
                                 are taken from z >= 55 only
    test5_ft                     FT_SLICES labelled slices of test5 (z = 5, 15, 25, ...: all < 55,
                                 disjoint from the test5 blocks), each with its 2 + 2 neighbours as
                                 context: the paper's FineReal-Sub idea (re-fine-tune on a few real slices)
    sim                          `xctrt simulate` (SIM_SHAPE, 180 views), when xraydb is installed here
    experiments.json             what was staged, from where

--small stages a few slices per volume (the DRY_RUN plumbing check). The script prints the total size;
a device call carries 64 MiB in all (working tree included).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile

HALO = 2


def blocks_evenly(depth: int, n: int, length: int, lo: int = 0) -> list[tuple[int, int]]:
    length = min(length, depth - lo)
    starts = np.linspace(lo, depth - length, n).round().astype(int) if n > 1 else [lo + (depth - lo - length) // 2]
    out = []
    for s in starts:
        if not out or s >= out[-1][1]:
            out.append((int(s), int(s) + length))
    return out


def write_staged(src: Path, dst: Path, blocks: list[tuple[int, int]], targets_of) -> dict:
    """Copy the slices of `blocks` (source [z0, z1) ranges) of src/{image,labels}.tif into dst."""
    dst.mkdir(parents=True, exist_ok=True)
    zs = [z for a, b in blocks for z in range(a, b)]
    for name in ("image.tif", "labels.tif"):
        with tifffile.TiffFile(src / name) as tf:
            a = tf.asarray(key=zs)
        tifffile.imwrite(dst / name, a, photometric="minisblack", compression="zlib", compressionargs={"level": 9})
    segments, targets, k = [], [], 0
    for a, b in blocks:
        segments.append([k, k + b - a])
        targets += [k + i for i in targets_of(b - a)]
        k += b - a
    meta = {"source": str(src.resolve()), "source_slices": zs, "segments": segments, "targets": targets}
    (dst / "slices.json").write_text(json.dumps(meta) + "\n")
    size = sum(f.stat().st_size for f in dst.iterdir())
    print(f"{dst}: {len(zs)} slices in {len(blocks)} block(s) from {src.name} {blocks}, {len(targets)} targets, "
          f"{size / 1e6:.1f} MB", flush=True)
    return {"blocks": blocks, "slices": len(zs), "targets": len(targets), "bytes": size}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="smg data root (train/pair_*, test1, test3, test4, test5)")
    ap.add_argument("dst", type=Path)
    ap.add_argument("--small", action="store_true", help="a few slices per volume (plumbing check)")
    ap.add_argument("--train-blocks", type=int, default=3)
    ap.add_argument("--train-len", type=int, default=40)
    ap.add_argument("--eval-blocks", type=int, default=2)
    ap.add_argument("--eval-len", type=int, default=14)
    ap.add_argument("--ft-slices", type=int, default=5)
    ap.add_argument("--sim-shape", type=int, nargs=3, default=[32, 256, 256])
    ap.add_argument("--sets", nargs="+", default=["test1", "test3", "test4", "test5"])
    a = ap.parse_args(argv)
    if a.small:
        a.train_blocks, a.train_len, a.eval_blocks, a.eval_len, a.ft_slices = 2, 12, 1, 20 + 2 * HALO, 3
        a.sim_shape = [12, 128, 128]
    manifest = {"src": str(a.src.resolve()), "halo": HALO, "volumes": {}}
    all_t = lambda n: range(n)                                      # noqa: E731
    inner = lambda n: range(HALO, n - HALO)                         # noqa: E731
    centre = lambda n: [n // 2]                                     # noqa: E731
    for p in sorted((a.src / "train").iterdir()):
        if (p / "image.tif").is_file():
            depth = len(tifffile.TiffFile(p / "image.tif").pages)
            n = max(1, min(a.train_blocks, depth // 200))            # one block per 200 source slices
            manifest["volumes"][f"train/{p.name}"] = write_staged(
                p, a.dst / "train" / p.name, blocks_evenly(depth, n, a.train_len), all_t)
    for s in a.sets:
        depth = len(tifffile.TiffFile(a.src / s / "image.tif").pages)
        lo = 55 if s == "test5" and depth > 55 + a.eval_len else 0
        manifest["volumes"][s] = write_staged(a.src / s, a.dst / s, blocks_evenly(depth, a.eval_blocks, a.eval_len, lo),
                                              inner)
    if "test5" in a.sets:
        centres = [5 + 10 * i for i in range(a.ft_slices)]
        manifest["volumes"]["test5_ft"] = write_staged(a.src / "test5", a.dst / "test5_ft",
                                                       [(c - HALO, c + HALO + 1) for c in centres], centre)
    try:
        import skimage  # noqa: F401
        import xraydb  # noqa: F401
        have_sim = True
    except ImportError:
        have_sim = False
        print("xraydb/scikit-image missing: no simulated volume staged (the experiment simulates on its machine)")
    if have_sim:
        cmd = [sys.executable, "-m", "xctrt", "simulate", str(a.dst / "sim"), "--shape", *map(str, a.sim_shape),
               "--views", "180", "--seed", "0", "--no-progress"]
        subprocess.run(cmd, check=True)
        manifest["sim"] = {"shape": a.sim_shape, "command": " ".join(cmd[1:])}
    (a.dst / "experiments.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(f.stat().st_size for f in a.dst.rglob("*") if f.is_file())
    tree = working_tree_bytes()
    print(f"staged {total / 1e6:.1f} MB under {a.dst}; with the working tree ({tree / 1e6:.1f} MB) a device "
          f"call would carry {(total + tree) / 1e6:.1f} MB of {DEVICE_CALL_BYTES / 1e6:.1f} MB (64 MiB)")
    if total + tree > DEVICE_CALL_BYTES:   # (on the device itself, as in experiments_gpu.sh, nothing travels)
        print(f"warning: too much to carry in one device call; stage less (--train-blocks, --eval-blocks, "
              f"--train-len, --eval-len): at most {(DEVICE_CALL_BYTES - tree) / 1e6:.1f} MB of data", file=sys.stderr)
    return 0


DEVICE_CALL_BYTES = 64 * 2 ** 20   # what one device call carries: working tree and carried folders together


def working_tree_bytes() -> int:
    """Bytes of what travels with a device call besides the carried folders: tracked files and untracked
    ones git does not ignore (the shipped 36.7 MB model package among them)."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
    return sum((root / f).stat().st_size for f in out.decode().split("\0") if f and (root / f).is_file())


if __name__ == "__main__":
    sys.exit(main())
