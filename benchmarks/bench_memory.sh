#!/usr/bin/env bash
# Peak resident memory of `xctrt segment` on a 1024^3 uint16 volume (2 GiB); model $MODEL (default untrained-tiny).
# Usage: benchmarks/bench_memory.sh [WORKDIR]   (needs ~2.2 GB free disk; xctrt installed or PYTHONPATH=python)
set -euo pipefail
work=${1:-$(mktemp -d)}
mkdir -p "$work"
size=${SIZE:-1024}
python -m xctrt phantom "$work/big.tif" --shape "$size" "$size" "$size" --uncompressed
ls -l "$work/big.tif"
/usr/bin/time -v python -m xctrt segment "$work/big.tif" -o "$work/out" -m "${MODEL:-untrained-tiny}" --no-progress 2> "$work/time.txt"
grep -E "Maximum resident|Elapsed \(wall" "$work/time.txt"
python - "$work" <<'PY'
import json, sys, tifffile
w = sys.argv[1]
s = json.load(open(f"{w}/out/summary.json"))
with tifffile.TiffFile(f"{w}/out/labels.tif") as t:
    print("labels", t.series[0].shape, t.series[0].dtype, "slices/s", round(s["timing"]["slices_per_s"], 2))
rss = [l for l in open(f"{w}/time.txt") if "Maximum resident" in l][0].split()[-1]
print(f"peak RSS {int(rss) / 2**20:.3f} GiB")
PY
