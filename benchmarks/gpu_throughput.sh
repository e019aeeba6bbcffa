#!/usr/bin/env bash
# GPU throughput (issue 5) in ONE call on a lent H100/H200 machine of <= 8 min wall (the issue's limit):
# set-up and the steps that measure first, the call's last minutes warm torch.compile's cache for a later
# one. Device time the session has left after it goes to more warm-up (4. below).
#
#   1. here, once: the wheels the machine's image lacks (segment-anything for the bench; onnx2torch for the
#      package step's torch backend: the image has onnx, torch and torchvision, not onnx2torch; tifffile in
#      case the image's is older than xctrt needs)
#          mkdir -p .whl-sam && pip download --no-deps segment-anything==1.0 onnx2torch==1.5.15 tifffile==2026.3.3 -d .whl-sam
#   2. the device call (tool `run`), exactly:
#          command:   bash benchmarks/gpu_throughput.sh
#          carry:     [".whl-sam"]
#          timeout_s: 540
#      results under $OUT: gpu_throughput.log, summary.md (the table, printed last), timeline.png
#      (benchmarks/timeline_figure.py: when each stage of ours and ours-host worked), results.tar.gz
#      (gpu_post.json, bench.json, bench_compiled.json, gpu_attention.json, gpu_parts.json,
#      label_writer.json, gpu_package.json) and torch.compile's tuning and cache (below); the log lists each run's stalls
#      (benchmarks/timeline_stalls.py; bench.json keeps them per run as "stalls")
#   3. here: commit the tuning the call brought back (cp inductor_tuning.tar.xz benchmarks/cache/)
#   4. while max-autotune's warm-up is unfinished ("tuning at the end" has no "max-autotune" among its
#      finished compiles) and the session has 3 min or more of device time left: commit the tuning (3.),
#      cat inductor_cache.tar.xz.* > .inductor-cache.tar.xz, then, on the still warm machine,
#          command:   STEPS=warm LIMIT=<seconds the session has left, less 60> bash benchmarks/gpu_throughput.sh
#          carry:     [".whl-sam", ".inductor-cache.tar.xz"]
#      and commit the tuning it brings back.
#   Afterwards, here, other runs' timelines as a picture (timeline.png has ours and ours-host):
#          python benchmarks/timeline_figure.py bench.json timeline.png [--runs naive ours ...]
#   Dry run here, on CPU (the same code with NumPy and torch CPU, tiny network and volume):
#          DRY_RUN=1 bash benchmarks/gpu_throughput.sh
#
# Steps, in this order (most wanted first), each under its own time limit (capped by what the measuring
# steps have left) so that one overrun leaves the others' numbers; a bench step that fails (not one that
# runs out of time: it keeps the modes it finished) ends the call at once instead, to leave device time
# for a rerun:
#   bench      xctrt bench --gpu (no compile): a generated 1000x1200x1200 uint16 TIFF, random ViT-B,
#              paper and shared mode, naive anchor (segment-anything eager fp32, bs 1, host post-processing)
#              and ours (bf16, fused attention, CUDA graphs, GPU pre/post-processing), stage by stage, and
#              the encoder's top kernels (--profile); ours twice on the same volume: components on the GPU
#              (CuPy, "ours") and on the host (the C++ labeller beside the GPU, "ours-host")
#   post       benchmarks/gpu_post_check.py: CuPy window/resize/aggregate/components vs the C++ kernels
#              (exact), aggregate + components + table of a 1000x1200x1200 volume, timed (met on
#              2026-11-26: a regression check), then the fused Triton pre/post kernels vs C++ and timed
#   compiled   xctrt bench --gpu --modes paper with the torch.compile anchor (bf16, bs 8, mode
#              $COMPILE_MODE): naive, compiled and ours again (components on the GPU), in one process, on
#              the same volume. Compiled from max-autotune's tuning alone (no kernels cached), the anchor
#              may take this step some 60-90 s longer (an estimate): the two short checks after it come
#              before the package step, which is the one that then runs short.
#   attention  benchmarks/gpu_attention_check.py: fused kernel vs SDPA vs float32 reference, launch sweep
#   parts      benchmarks/gpu_parts_check.py: encoder and decoder time per batch with each part of the fast
#              forward (attention, decoder attention, patch embedding, MLP epilogue, upscaling) left out in turn;
#              then the encoder with every part at batch 4 and 16 too (time per image, peak memory)
#   writer     benchmarks/label_writer.py: labels.tif (1000x1200x1200) handed to the writer in slabs of 32 at
#              250 slices/s, compressed per slab (what runs do) and in tifffile's own 512 MiB batch (what
#              they did until 2026-11-28): the writer's time after the last slab, and the longest gap of a
#              Python thread ticking beside it, on this host's cores (~15 s)
#   package    benchmarks/gpu_package_check.py: the shipped model (torch backend) with --device cuda vs the
#              host C++ pipeline around the same GPU engine, 16x768x768 phantom: identical labels/table, speed;
#              then bf16, and the Conv-LoRA experts routed (eager, dynamic shapes) against static in CUDA graphs
#   ours-compiled  (only when STEPS names it) the bench in shared mode with --compile-ours $OURS_COMPILE:
#              our encoder through torch.compile as well (pointwise fusion around the fused attention, one
#              operator), profiled; it gained nothing on 2026-11-27 (H200: 357 vs 349 TFLOP/s), bench_ours_compiled.json
#   warm       benchmarks/compile_warm.py: compiles the anchor with max-autotune, whatever time the call has
#              left, for a later call (not timed)
# Knobs (environment): SAMPLE (1: the bench step under benchmarks/sample_threads.py, thread_samples.json),
# STEPS ("bench post compiled attention parts writer package warm"; without package while max-autotune's warm-up
# has not finished), BENCH_MODES (the bench step's modes: "paper
# shared"; "shared" alone takes about half its time), SHAPE
# ("1000 1200 1200"), BATCH (8), COMPILE_MODE (max-autotune when the tuning or a carried cache holds a finished
# max-autotune warm-up, else default), OURS_COMPILE (default), WORK (/tmp/xctrt_gpu), PYTHON (python3), OUT (set by the device tool;
# default $WORK/out), LIMIT (480: seconds the call may use in all, the issue's 8 minutes), MEASURE_LIMIT
# (470: set-up and the steps before warm stop by then).
# The max-autotune anchor (the issue's) did not finish compiling in 305 s on an H200 (2026-11-26), so a
# call without its tuning measures the anchor compiled in torch.compile's default mode (no autotuning;
# the summary names the mode) and warms max-autotune's cache with the time left. torch.compile writes
# each GEMM's and convolution's autotuning timings to TORCHINDUCTOR_CACHE_DIR/cache/ as they are measured
# (a compile stopped by its time limit keeps those it finished), and the pointwise kernels' best launch
# configs beside their code (*.best_config). Those files (KiB, $OUT/inductor_tuning.tar.xz) are what
# spares a later compile its benchmarking: with every choice's timing cached inductor neither
# precompiles nor benchmarks the choices, it compiles the winner. Commit the file as
# benchmarks/cache/inductor_tuning.tar.xz (each session starts from a fresh checkout: the fourth
# measurement's 18 MiB full cache, kept outside git, was gone by the next session, and a full cache
# does not fit beside the ~42 MB checkout in the 64 MiB a call carries); every call unpacks it first,
# so each warm step goes on from where the last one stopped, and once one has finished max-autotune's
# compile (it marks the tuning so) the compiled step measures the max-autotune anchor. The full cache
# (kernels and graphs too) also comes back, as $OUT/inductor_cache.tar.xz.00, .01 (xz, 12 MiB parts,
# 24 MiB at most), for a later call of the same session: here, cat inductor_cache.tar.xz.* >
# .inductor-cache.tar.xz (in .git/info/exclude) and carry it; it is unpacked over the tuning.
# What is timed is the compiled program either way. Since at most 8 files come back, every result but
# summary.md, timeline.png, the log and the caches is packed into $OUT/results.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=${DRY_RUN:-0}
STEPS_ASKED=${STEPS:-}   # the default is chosen once the committed tuning is unpacked (below)
OURS_COMPILE=${OURS_COMPILE:-default}
WORK=${WORK:-/tmp/xctrt_gpu} LOG=gpu_throughput.log
left() { echo $(( ${LIMIT:-480} - SECONDS )); }   # seconds left of the call's budget
main_left() { echo $(( ${MEASURE_LIMIT:-470} - SECONDS )); }   # ... for set-up and the steps before warm
WHEELS=.whl-sam . benchmarks/device_env.sh "import segment_anything, onnx2torch"
export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor-cache
mkdir -p "$TORCHINDUCTOR_CACHE_DIR"
# the committed tuning (a session's checkout is fresh: only what git holds outlives it), then a full
# cache carried from an earlier call of this session over it
for CACHE in benchmarks/cache/inductor_tuning.tar.xz .inductor-cache.tar.xz; do
  [ -f "$CACHE" ] || continue
  tar -xJf "$CACHE" -C "$TORCHINDUCTOR_CACHE_DIR" \
    && echo "torch.compile cache from $CACHE: $(du -sh "$TORCHINDUCTOR_CACHE_DIR" | cut -f1)"
done
$PY benchmarks/inductor_tuning.py "$TORCHINDUCTOR_CACHE_DIR" --label "tuning at the start"
if [ -n "$STEPS_ASKED" ]; then STEPS=$STEPS_ASKED
elif [ -f "$TORCHINDUCTOR_CACHE_DIR/xctrt-warmed-max-autotune" ] || [ "$DRY_RUN" = 1 ]; then
  STEPS="bench post compiled attention parts writer package warm"
else
  # max-autotune's warm-up unfinished: its warm step gets the package check's time (74 s of the H200 call
  # of 2026-11-28, whose shipped model gave the host pipeline's labels and table exactly, as in the two
  # calls before it); the anchor it tunes is the issue's last unmeasured target
  STEPS="bench post compiled attention parts writer warm"
  echo "package step left out until max-autotune's warm-up has finished (STEPS=\"... package ...\" runs it)"
fi
$PY -c "import torch, tifffile, xctrt._core, segment_anything, onnx2torch; print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none', 'tifffile', tifffile.__version__)" || exit 1
$PY -c "import imagecodecs; print('imagecodecs', imagecodecs.__version__)" 2>/dev/null \
  || echo "no imagecodecs: tifffile compresses labels.tif with Python's zlib (slower than imagecodecs' libdeflate)"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv 2>/dev/null || true

if [ "$DRY_RUN" = 1 ]; then
  SHAPE=${SHAPE:-"12 96 96"}; BATCH=${BATCH:-2}
  POST="--xp numpy --z 16 --y 128 --x 128"; ATTN="--device cpu"; PARTS="--device cpu"
  PKG="--host-arrays -m untrained-tiny --shape 4 300 280 --batch-size 4 --slab 3"
  BENCH="--host-arrays --backbone tiny --naive-slices 4 --compiled-slices 4 --slab 4"
  WRITER="--shape 64 256 256 --slab 8 --repeat 1"
  COMPILE_MODE=${COMPILE_MODE:-default}; WARM_MODE=default
else
  SHAPE=${SHAPE:-"1000 1200 1200"}; BATCH=${BATCH:-8}
  POST=""; ATTN=""; PARTS=""; PKG=""; BENCH="--slab 32"
  WRITER="--shape 1000 1200 1200 --slab 32 --rate 250 --repeat 1"
  # max-autotune only where the tuning holds a finished warm-up of it (else its benchmarking outruns the call)
  [ -f "$TORCHINDUCTOR_CACHE_DIR/xctrt-warmed-max-autotune" ] && COMPILE_MODE=${COMPILE_MODE:-max-autotune} \
    || COMPILE_MODE=${COMPILE_MODE:-default}
  WARM_MODE=max-autotune
fi

want() { case " $STEPS " in *" $1 "*) return 0;; *) return 1;; esac; }

if want bench; then
  stage "bench: naive vs ours, paper and shared"
  # SAMPLE=1: under benchmarks/sample_threads.py, which notes where each thread's time goes
  [ "${SAMPLE:-0}" = 1 ] && RUN_BENCH="benchmarks/sample_threads.py --out $OUT -m xctrt" || RUN_BENCH="-m xctrt"
  timeout 200 $PY $RUN_BENCH bench --gpu --shape $SHAPE --batch-size $BATCH $BENCH --compile-mode none --profile \
    --modes ${BENCH_MODES:-paper shared} \
    --work "$WORK/bench" --json "$OUT/bench.json"
  rc=$?
  if [ "$rc" = 124 ]; then echo "bench step ran out of its 200 s: bench.json keeps the modes it finished; going on"
  elif [ "$rc" != 0 ]; then echo "bench step failed (rc $rc): stopping here to leave device time for a rerun"; exit $rc; fi
fi

# run_step NAME MAX_S CMD...: CMD under a limit of MAX_S seconds or what the measuring steps have left
# (less 15 s), whichever is less; skipped when that is under 30 s
run_step() {
  local name=$1 most=$2 t; shift 2
  t=$(( $(main_left) - 15 )); [ "$t" -gt "$most" ] && t=$most
  if [ "$t" -lt 30 ]; then echo "$name step skipped: $(main_left) s left"; return; fi
  timeout "$t" "$@" || echo "$name step failed or timed out (rc $?)"
}

if want post; then
  stage "post: GPU post-processing vs C++"
  run_step post 110 $PY benchmarks/gpu_post_check.py --out "$OUT" $POST
fi

if want compiled; then
  stage "compiled: naive vs torch.compile($COMPILE_MODE) vs ours, paper mode ($(main_left) s left)"
  run_step compiled 200 $PY -m xctrt bench --gpu --shape $SHAPE --batch-size $BATCH $BENCH --modes paper \
    --components device --compile-mode "$COMPILE_MODE" --work "$WORK/bench" --json "$OUT/bench_compiled.json"
fi

if want attention; then
  stage "attention: fused kernel vs SDPA vs reference"
  run_step attention 70 $PY benchmarks/gpu_attention_check.py --out "$OUT" $ATTN
fi

if want parts; then
  stage "parts: each part of the fast forward on and off"
  run_step parts 90 $PY benchmarks/gpu_parts_check.py --out "$OUT" $PARTS
fi

if want writer; then
  # labels.tif's compression, per slab (runs since 2026-11-28) vs tifffile's 512 MiB batch, on this host's
  # cores, at shared mode's target pace: what the bench's runs no longer show side by side
  stage "writer: labels.tif compressed per slab vs in tifffile's batch, on this host"
  run_step writer 60 $PY benchmarks/label_writer.py $WRITER --json "$OUT/label_writer.json"
fi

if want package; then
  stage "package: the shipped model, --device cuda vs the host pipeline"
  run_step package 120 $PY benchmarks/gpu_package_check.py --out "$OUT" $PKG
fi

if want ours-compiled; then
  stage "ours-compiled: our encoder through torch.compile($OURS_COMPILE) too, shared mode ($(main_left) s left)"
  run_step ours-compiled 200 $PY -m xctrt bench --gpu --shape $SHAPE --batch-size $BATCH $BENCH --modes shared \
    --components device --compile-mode none --compile-ours "$OURS_COMPILE" --profile --work "$WORK/bench" --json "$OUT/bench_ours_compiled.json"
fi

if want warm && [ -f "$TORCHINDUCTOR_CACHE_DIR/xctrt-warmed-$WARM_MODE" ]; then
  echo "warm step skipped: the tuning holds a finished torch.compile($WARM_MODE) of the anchor"
elif want warm && [ "$(left)" -gt 80 ]; then
  stage "warm: torch.compile($WARM_MODE) of the anchor, for a later call, until $(( $(left) - 40 )) s from now"
  WARM=""; [ "$DRY_RUN" = 1 ] && WARM="--backbone tiny --device cpu"
  # a finished compile leaves a mark in the cache: only then does a call that carries it time max-autotune
  timeout $(( $(left) - 40 )) $PY benchmarks/compile_warm.py --batch $BATCH --compile-mode "$WARM_MODE" $WARM \
    && touch "$TORCHINDUCTOR_CACHE_DIR/xctrt-warmed-$WARM_MODE" \
    || echo "warm step stopped (rc $?): the cache keeps what it finished"
fi

if [ -f "$OUT/bench.json" ]; then
  # spans held up far past their kind's median, and what stretched beside them
  stage "stalls: spans of the bench's runs far past their kind's median"
  $PY benchmarks/timeline_stalls.py "$OUT/bench.json" --runs ours ours-host \
    || echo "timeline stalls failed (rc $?): run benchmarks/timeline_stalls.py on bench.json afterwards"
  # the bench's timelines as a picture: the fill, the gaps, the tail
  $PY benchmarks/timeline_figure.py "$OUT/bench.json" "$OUT/timeline.png" --runs ours ours-host \
    || echo "timeline figure failed (rc $?): draw it from bench.json afterwards"
fi

stage "keeping torch.compile's tuning and cache"
if want compiled || want warm; then
  $PY benchmarks/inductor_tuning.py "$TORCHINDUCTOR_CACHE_DIR" --label "tuning at the end" --pack "$OUT/inductor_tuning.tar.xz"
  rm -f "$WORK"/inductor_cache.tar.xz*
  if tar -C "$TORCHINDUCTOR_CACHE_DIR" -cf - . | xz -T0 -6 > "$WORK/inductor_cache.tar.xz"; then
    size=$(stat -c %s "$WORK/inductor_cache.tar.xz")
    # what a later call may carry: 64 MiB in all, of which the checkout takes ~42 MB (the shipped model)
    if [ "$size" -le $((24 * 1024 * 1024)) ]; then
      split -b 12M -d -a 2 "$WORK/inductor_cache.tar.xz" "$OUT/inductor_cache.tar.xz."
      echo "cache kept: $(du -h "$WORK/inductor_cache.tar.xz" | cut -f1) in $(ls "$OUT"/inductor_cache.tar.xz.* | wc -l) parts"
    else
      echo "cache $(du -h "$WORK/inductor_cache.tar.xz" | cut -f1) xz: over the 24 MiB a later call can carry, not kept"
    fi
  fi
fi
# the short table last (the issue's "prints a short table last"), then, quietly, at most 8 files come
# back: the rest goes in one archive
stage "summary"
$PY benchmarks/gpu_summary.py "$OUT" | tee "$OUT/summary.md"
(cd "$OUT" && find . -maxdepth 1 -type f ! -name summary.md ! -name "$LOG" ! -name timeline.png \
   ! -name results.tar.gz ! -name 'inductor_*' -printf '%P\n' | tar -czf results.tar.gz -T - --remove-files) \
  || echo "results not packed (rc $?): the files under $OUT are loose"
