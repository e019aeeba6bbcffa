#!/usr/bin/env bash
# The paper's research questions R1-R4 at a small budget, in ONE call on a lent GPU machine (<= 8 min wall).
#
#   1. here, once: stage contiguous slice blocks (2.5D needs true neighbours) and a simulated scan
#          PYTHONPATH=python:. python benchmarks/experiments_stage.py ../shared/data/smg .devdata/exp
#      (~52 MB; .devdata/ is git-ignored, see training/gpu_stage.sh)
#   2. the device call (tool `run`):
#          command:   bash benchmarks/experiments_gpu.sh .devdata/exp
#          carry:     [".devdata/exp"]
#          timeout_s: 600
#      results come back under $OUT: experiments.log, results.json (every number), summary.md (the tables)
#   Dry run here, on CPU (tiny networks, a few steps, every 10th target slice scored; stages a small subset
#   of DATA_ROOT into $WORK first when DATA_ROOT is not a staged folder):
#          DRY_RUN=1 bash benchmarks/experiments_gpu.sh [DATA_ROOT=../shared/data/smg]
#
# R1  2.5D U-Net baseline (training/unet25d.py) trained on DATA/train/* for R1_MINUTES; scored on
#     test1/3/4/5 with `xctrt evaluate` (IoU, the paper's layer-wise P/R/F1, 3D defect P/R).
# R2  CycleGAN simulated -> real (training/cyclegan.py): DATA/sim (or a fresh `xctrt simulate`) against
#     the unlabelled images of DATA/train/pair_1 (no test data in training) for GAN_MINUTES; translate the
#     simulated volume; report pore/inclusion survival (translate.json) and the domain shift
#     (`xctrt domain-shift`, Frechet distance of filter-bank features) of the simulated and the
#     translated volume to the real one.
# R3  re-fine-tuning on a few real slices (the paper's SAM-FineReal-Sub idea, on the U-Net): R1's model
#     fine-tuned for FT_MINUTES on the FT_SLICES labelled slices of DATA/test5_ft; scored on test5's
#     other slices (held-out blocks, z >= 55) and on test1/3/4.
# R4  forgetting: the change on test1/3/4 from R1 to R3; mitigation "replay": the same fine-tuning with
#     half of every batch drawn from DATA/train/* (the old training data).
#
# Knobs (environment): R1_MINUTES (2.0), GAN_MINUTES (1.5), FT_MINUTES (0.4), BATCH (16), GAN_BATCH (4),
# CROP (256), BASE (32, U-Net width), WORKERS (10, batch-drawing processes), EVAL_EVERY (1), DEVICE (cuda; DRY_RUN: cpu), WORK (/tmp/xctrt_exp),
# PYTHON (python3), OUT (set by the device tool; default $WORK/out).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DATA=${1:-../shared/data/smg}
DRY_RUN=${DRY_RUN:-0}
WORK=${WORK:-/tmp/xctrt_exp} LOG=experiments.log
. benchmarks/device_env.sh ""
$PY -c "import torch, xctrt._core; print(f'torch {torch.__version__}, cuda', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"

if [ "$DRY_RUN" = 1 ]; then
  DEVICE=${DEVICE:-cpu}; EVAL_EVERY=${EVAL_EVERY:-10}; STAGE_ARGS=--small
  UNET="--base 8 --depth 3 --crop 64 --batch-size 2 --steps 4 --steps-per-epoch 2 --val-crops 2 --threads 2"
  FT="--base 8 --depth 3 --crop 64 --batch-size 2 --steps 2 --steps-per-epoch 2 --threads 2"
  GAN="--ngf 8 --ndf 8 --blocks 2 --crop 64 --batch-size 1 --steps 3 --steps-per-epoch 3 --threads 2"
else
  DEVICE=${DEVICE:-cuda}; EVAL_EVERY=${EVAL_EVERY:-1}; STAGE_ARGS=
  B=${BATCH:-16}; C=${CROP:-256}
  UNET="--base ${BASE:-32} --depth 4 --crop $C --batch-size $B --steps 1000000 --steps-per-epoch 200 --val-crops 64 --workers ${WORKERS:-10} --max-minutes ${R1_MINUTES:-2.0}"
  FT="--crop $C --batch-size $B --steps 1000000 --steps-per-epoch 100 --workers ${WORKERS:-10} --max-minutes ${FT_MINUTES:-0.4}"
  GAN="--crop $C --batch-size ${GAN_BATCH:-4} --steps 1000000 --steps-per-epoch 400 --max-minutes ${GAN_MINUTES:-1.5}"
  if [ "$DEVICE" = cuda ]; then
    $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device (DRY_RUN=1 runs on CPU)')"
  fi
fi

if [ ! -f "$DATA/experiments.json" ]; then
  stage "stage contiguous blocks of $DATA into $WORK/data"
  rm -rf "$WORK/data"
  $PY benchmarks/experiments_stage.py "$DATA" "$WORK/data" $STAGE_ARGS
  DATA=$WORK/data
fi
SETS="test1 test3 test4 test5"
TRAIN_DIRS=$(ls -d "$DATA"/train/*/)
echo "data $DATA: train $(echo $TRAIN_DIRS | wc -w) volume(s), test sets $SETS (every $EVAL_EVERY-th target slice), device $DEVICE"
mkdir -p "$WORK/pred" "$WORK/eval"

score() {   # name checkpoint: predict every test set (one process: torch starts once), then `xctrt evaluate`
  $PY - "$1" "$2" "$DATA" "$WORK" "$EVAL_EVERY" "$DEVICE" $SETS <<'EOF'
import sys
from training.unet25d import predict
run, ckpt, data, work, every, device, *sets = sys.argv[1:]
for s in sets:
    predict(ckpt, f"{data}/{s}", f"{work}/pred/{run}_{s}.tif", int(every), f"{data}/{s}/labels.tif",
            f"{work}/pred/truth_{s}.tif", device=device)
EOF
  for s in $SETS; do
    echo "--- $1 on $s"
    $PY -m xctrt evaluate "$WORK/pred/$1_$s.tif" "$WORK/pred/truth_$s.tif" --json "$WORK/eval/$1_$s.json"
  done
}

stage "R1: 2.5D U-Net on $(echo $TRAIN_DIRS | xargs -n1 basename | tr '\n' ' ')"
$PY -m training.unet25d train --data $TRAIN_DIRS $UNET --device "$DEVICE" --seed 0 -o "$WORK/r1.pt"
score r1 "$WORK/r1.pt"

stage "R3: re-fine-tune R1 on the labelled slices of test5_ft"
$PY -m training.unet25d train --data "$DATA/test5_ft" --init "$WORK/r1.pt" --val-fraction 0 $FT \
  --device "$DEVICE" --seed 0 -o "$WORK/r3.pt"
score r3 "$WORK/r3.pt"

stage "R4: the same with replay (half of every batch from the training data)"
$PY -m training.unet25d train --data "$DATA/test5_ft" --init "$WORK/r1.pt" --val-fraction 0 $FT \
  --replay $TRAIN_DIRS --replay-fraction 0.5 --device "$DEVICE" --seed 0 -o "$WORK/r4.pt"
score r4 "$WORK/r4.pt"

stage "R2: CycleGAN simulated -> real (real domain: train/pair_1 images, unlabelled)"
SIM=$DATA/sim
if [ ! -f "$SIM/image.tif" ]; then
  SIM=$WORK/sim
  $PY -m xctrt simulate "$SIM" --shape 16 128 128 --views 90 --seed 0 --no-progress
fi
REAL=$DATA/train/pair_1
$PY -m training.cyclegan train --sim "$SIM" --real "$REAL" $GAN --device "$DEVICE" --seed 0 -o "$WORK/gan.pt"
$PY -m training.cyclegan translate "$WORK/gan.pt" "$SIM" "$WORK/translated" --device "$DEVICE"
$PY -m xctrt domain-shift "$SIM/image.tif" "$REAL/image.tif" | tee "$WORK/shift_sim.txt"
$PY -m xctrt domain-shift "$WORK/translated/image.tif" "$REAL/image.tif" | tee "$WORK/shift_translated.txt"

stage "summary"
$PY - "$WORK" "$OUT" "$SECONDS" "$SETS" <<'EOF'
import json, re, sys
from pathlib import Path
import torch

work, out, seconds, sets = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split()
fmt = lambda v: "–" if v is None else f"{v:.3f}"
names = ["material", "pore", "inclusion"]
res = {"seconds": seconds, "runs": {}, "eval": {}}
for run in ("r1", "r3", "r4"):
    ck = torch.load(work / f"{run}.pt", map_location="cpu", weights_only=False)
    res["runs"][run] = {k: ck[k] for k in ("config", "class_weights", "class_counts", "step", "history",
                                           "init_from", "training_data", "replay_data")}
    res["runs"][run]["best"] = {"step": ck["best"]["step"], "mean_dice": ck["best"]["mean_dice"]} if ck["best"] else None
    res["runs"][run]["train_seconds"] = sum(h["seconds"] for h in ck["history"])
    res["eval"][run] = {s: json.loads((work / "eval" / f"{run}_{s}.json").read_text()) for s in sets}
gan = torch.load(work / "gan.pt", map_location="cpu", weights_only=False)
res["gan"] = {"config": gan["config"], "step": gan["step"], "history": gan["history"], "domains": gan["domains"],
              "translate": json.loads((work / "translated" / "translate.json").read_text()),
              "domain_shift": {k: float(re.findall(r"([-0-9.eE+]+)\s*$", (work / f"shift_{k}.txt").read_text().strip())[0])
                               for k in ("sim", "translated")}}
rows = []
for run, label in (("r1", "R1 U-Net (train/*)"), ("r3", "R3 + fine-tune test5_ft"), ("r4", "R4 + fine-tune, replay 50%")):
    for s in sets:
        e = res["eval"][run][s]
        c, o = e["classes"], e["objects"]
        rows.append(f"| {label} | {s} | " + " | ".join(fmt(c[n]["iou"]) for n in names) + " | "
                    + " | ".join(fmt((c[n]["f1"] or {}).get("mean")) for n in ("pore", "inclusion")) + " | "
                    + " | ".join(fmt(o[n]["recall"]) for n in ("pore", "inclusion")) + " |")
delta = []
for run in ("r3", "r4"):
    for s in sets:
        d = [(res["eval"][run][s]["classes"][n]["iou"], res["eval"]["r1"][s]["classes"][n]["iou"]) for n in names]
        delta.append(f"| {run} - r1 | {s} | " + " | ".join("–" if a is None or b is None else f"{a - b:+.3f}" for a, b in d) + " |")
train_rows = [f"| {r} | {v['step']} | {v['train_seconds']:.0f} | {fmt(v['best']['mean_dice']) if v['best'] else '–'} | "
              + ", ".join(f"{w:.3f}" for w in v["class_weights"]) + " |" for r, v in res["runs"].items()]
t = res["gan"]["translate"]["defects"]
last = res["gan"]["history"][-1]["loss"] if res["gan"]["history"] else {}
gan_rows = [f"| {n} | {t[n]['components']} | {t[n]['scored']} | {fmt(t[n]['recall_sim'])} | {fmt(t[n]['recall_translated'])} | "
            f"{fmt(t[n]['survival'])} | {fmt(t[n]['median_cnr_sim'])} | {fmt(t[n]['median_cnr_translated'])} |" for n in ("pore", "inclusion")]
md = "\n".join([
    "| run | steps | train s | best val mean Dice | class weights air, material, pore, inclusion |", "|---|---|---|---|---|", *train_rows, "",
    "| model | set | IoU material | IoU pore | IoU inclusion | F1 pore (mean over slices) | F1 inclusion | 3D recall pore | 3D recall inclusion |",
    "|---|---|---|---|---|---|---|---|---|", *rows, "",
    "IoU change from R1 (R3: forgetting on test1/3/4, gain on test5; R4: with replay)", "",
    "| change | set | material | pore | inclusion |", "|---|---|---|---|---|", *delta, "",
    f"R2 CycleGAN: {res['gan']['step']} steps, last epoch losses " + ", ".join(f"{k} {v:.3f}" for k, v in last.items()),
    f"domain shift to the real volume: simulated {res['gan']['domain_shift']['sim']:.3f}, translated {res['gan']['domain_shift']['translated']:.3f}", "",
    f"| class | components | scored | visible in sim (recall) | visible after translation | survival | median CNR sim | median CNR translated |",
    "|---|---|---|---|---|---|---|---|", *gan_rows, "", f"wall time {seconds} s"])
(out / "results.json").write_text(json.dumps(res, indent=1, default=str))
(out / "summary.md").write_text(md + "\n")
print(md)
EOF
