#!/usr/bin/env bash
# Are the simulator's defects recoverable by `xctrt segment`? (issue 4)
#
#     bash benchmarks/simulate_recovery.sh WORK [NAME="SIMULATE ARGS" ...]
#
# Default runs (the ones in benchmarks/RESULTS.md):
#     v360  128x512x512, 360 views          v60  the same at 60 views (streaks)
#     nf8   8x512x512, no pre-filter        cu8  the same with 0.5 mm Cu (less cupping)
# For each NAME: `xctrt simulate WORK/NAME --seed 0 ARGS` (an AlSi10Mg cylinder with pores and Ni
# inclusions, every unnamed setting the simulator's default), `xctrt segment` with the default model
# into WORK/seg-NAME, `xctrt evaluate` against the simulation's labels (IoU, the paper's layer-by-layer
# P/R/F1, 3D object detection; WORK/eval-NAME.json) and benchmarks/enclosed_air.py (the air the model's
# labels enclose, what it is in truth, the IoU with it filled; WORK/enclosed-NAME.json). Then the
# classical baseline on every volume (benchmarks/accuracy.py; WORK/classical.json) and the figure
# WORK/simulate_segment.png (benchmarks/simulate_recovery_figure.py: truth and prediction, middle slice).
# A step whose output exists is not run again. Needs `pip install '.[sim,test]'`. On the 2-core VM a
# 128-slice volume takes 1-5 min to simulate and ~25 min to segment.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:?usage: simulate_recovery.sh WORK [NAME="SIMULATE ARGS" ...]}; shift
[ $# -gt 0 ] || set -- "v360=--shape 128 512 512 --views 360" "v60=--shape 128 512 512 --views 60" \
  "nf8=--shape 8 512 512" "cu8=--shape 8 512 512 --beam-filter Cu 0.5"
PY=${PYTHON:-python}   # with xctrt installed (in a source tree with an in-place build: PYTHONPATH=python)
mkdir -p "$WORK"
names=()
for spec in "$@"; do
  name=${spec%%=*}; args=${spec#*=}
  [ -f "$WORK/$name/simulate.json" ] || \
    $PY -m xctrt simulate "$WORK/$name" --seed 0 $args --no-progress
  [ -f "$WORK/seg-$name/summary.json" ] || \
    $PY -m xctrt segment "$WORK/$name/image.tif" -o "$WORK/seg-$name" --no-progress
  echo "== $name ($args): default model"
  $PY -m xctrt evaluate "$WORK/seg-$name/labels.tif" "$WORK/$name/labels.tif" --json "$WORK/eval-$name.json"
  z=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['shape'][0])" "$WORK/$name/simulate.json")
  $PY benchmarks/enclosed_air.py default "$WORK" --sets "$name" --z 0 "$z" --pred "$WORK/seg-$name" \
    --json "$WORK/enclosed-$name.json"
  names+=("$name")
done
echo "== classical baseline"
$PY benchmarks/accuracy.py classical "$WORK" --sets "${names[@]}" --json "$WORK/classical.json"
$PY benchmarks/simulate_recovery_figure.py "$WORK" "${names[@]}" -o "$WORK/simulate_segment.png"
