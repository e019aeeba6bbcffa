"""torch.compile's autotuning in a TORCHINDUCTOR_CACHE_DIR: what it holds, and packed alone for git.

    python benchmarks/inductor_tuning.py CACHE_DIR [--label TEXT] [--pack OUT.tar.xz]

A max-autotune compile of the anchor spends its time benchmarking choices: each GEMM and convolution
shape's template kernels (timings in CACHE_DIR/cache/<system hash>, a JSON file rewritten after each
shape) and each pointwise kernel's launch configs (<kernel>.best_config beside the kernel's code).
With every choice of a shape timed there, inductor neither precompiles nor benchmarks them again; it
compiles the winner. Those files are KiB where the whole cache (kernels, graphs) is tens of MiB, so they
are what benchmarks/gpu_throughput.sh brings back for git, to go on from in a later session. The
marks `xctrt-warmed-<mode>` (a finished compile) travel with them.

Prints one line: how many shapes per operator are timed, best configs and marks. --pack writes the
archive (nothing when there is no tuning); the archive is written beside and renamed, so a stopped
run never leaves a half archive under the final name.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from collections import Counter
from pathlib import Path

MARK_PREFIX = "xctrt-warmed-"


def tuning_files(cache_dir: Path) -> list[Path]:
    """The tuning's files under cache_dir, relative to it, sorted: cache/*, **/*.best_config, the marks."""
    found = []
    for path in cache_dir.rglob("*"):
        if not path.is_file():
            continue
        rel = path.relative_to(cache_dir)
        if rel.parts[0] == "cache" or path.name.endswith(".best_config") or (
                len(rel.parts) == 1 and path.name.startswith(MARK_PREFIX)):
            found.append(rel)
    return sorted(found)


def summarize(cache_dir: Path) -> dict:
    """{"timed": {op: shapes timed}, "choices": timings in all, "best_configs": n, "marks": [...],
    "unreadable": [files of cache/ that are not inductor's JSON]}."""
    timed: Counter = Counter()
    choices = 0
    best = 0
    marks, unreadable = [], []
    for rel in tuning_files(cache_dir):
        if rel.parts[0] == "cache":
            try:
                ops = json.loads((cache_dir / rel).read_text())["cache"]
            except (OSError, ValueError, KeyError, TypeError):
                unreadable.append(str(rel))
                continue
            for op, by_inputs in ops.items():
                timed[op] += len(by_inputs)
                choices += sum(len(t) for per_precision in by_inputs.values() for t in per_precision.values())
        elif rel.name.endswith(".best_config"):
            best += 1
        else:
            marks.append(rel.name[len(MARK_PREFIX):])
    return {"timed": dict(sorted(timed.items())), "choices": choices, "best_configs": best,
            "marks": sorted(marks), "unreadable": unreadable}


def describe(summary: dict) -> str:
    ops = ", ".join(f"{op} {n}" for op, n in summary["timed"].items()) or "none"
    text = (f"shapes timed: {ops} ({summary['choices']} choices); pointwise best configs "
            f"{summary['best_configs']}; finished compiles: {', '.join(summary['marks']) or 'none'}")
    if summary["unreadable"]:
        text += f"; unreadable: {', '.join(summary['unreadable'])}"
    return text


def pack(cache_dir: Path, out: Path) -> int:
    """The tuning's files into out (tar.xz); returns how many (0: nothing written)."""
    files = tuning_files(cache_dir)
    if not files:
        return 0
    part = out.with_name(out.name + ".part")
    with tarfile.open(part, "w:xz") as tar:
        for rel in files:
            tar.add(cache_dir / rel, arcname=str(rel), recursive=False)
    os.replace(part, out)
    return len(files)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cache_dir", type=Path)
    ap.add_argument("--label", default="tuning")
    ap.add_argument("--pack", type=Path, help="write the tuning's files to this .tar.xz")
    args = ap.parse_args(argv)
    if not args.cache_dir.is_dir():
        print(f"{args.label}: no cache directory {args.cache_dir}")
        return 0
    print(f"{args.label}: {describe(summarize(args.cache_dir))}")
    if args.pack:
        n = pack(args.cache_dir, args.pack)
        print(f"tuning kept: {n} files in {args.pack} ({args.pack.stat().st_size / 1024:.0f} KiB)" if n
              else "tuning kept: nothing to keep")
    return 0


if __name__ == "__main__":
    sys.exit(main())
