#!/usr/bin/env bash
# Studies of RAT: trains every variant of a preset for several seeds, evaluates each run
# (eval.py, test split) at several resolutions, and writes one table: OUT/results.md and
# results.csv (tools/ablate_table.py, or tools/robust_table.py for the robust presets; run
# either alone to rebuild the table from the run folders).
#
#   bash ablate.sh                                              # preset cpu
#   PRESET=full DATA_DIR=/data/ISIC2018 NPROC=8 bash ablate.sh  # ISIC 2018 on GPUs
#   PRESET=robust bash ablate.sh                                # resolution robustness, seg
#   PRESET=robust_det bash ablate.sh                            # resolution robustness, det
#   PRESET=det bash ablate.sh                                   # component study, det
#   DATA=twins OUT=ablations/twins bash ablate.sh               # component study on --data twins
#   PRESET=tiny VARIANTS=default,pe_none SEEDS=0 bash ablate.sh # a smoke test
#
# Presets (PRESET=...):
#   cpu   (default) the component study: one change at a time from the default model
#         (variants default, scales_1_0.5, scales_1_0.5_0.25, pe_rope|absolute|none, sga_dense|
#         none, sga_iters_3, stem_patch, head_refine, grid_pixel, depth_2|6|8, dim_DIM/2, dim_3*DIM/2,
#         unet),
#         evaluated at 0.5x, 1x, 2x, 4x IMAGE_SIZE natively and resized to IMAGE_SIZE, the
#         default also with --ignore-spacing; the table pairs each variant with the default of
#         the same seed. Synthetic data, 64 px, 600 train / 100 val, 6 epochs, batch 16, dim 64,
#         depth 4, heads 4, patch 4.
#   full  the component study on DATA=isic, 256 px, all images, 10 epochs, batch 16, dim 128,
#         depth 4, heads 8, patch 4, lr 1e-4, dropout 0.1; one training at a time over NPROC
#         GPUs (torchrun).
#   tiny  the component study at 32 px, 16 train / 4 val, 1 epoch, dim 16.
#   robust  RAT with --pe rose|rope|absolute|none and the U-Net, each trained at IMAGE_SIZE
#         (<model>_single) and at TRAIN_SIZES (<model>_multi, default 0.5x,0.75x,1x,1.5x,2x
#         IMAGE_SIZE, one size per step), evaluated at 0.5x, 1x, 2x, 4x IMAGE_SIZE natively
#         and resized to IMAGE_SIZE (eval.py --resize-to-train). Synthetic data, 64 px, 1000
#         train / 100 val, 8 epochs, batch 16, dim 64, depth 4, heads 4, patch 4; writes
#         dice_vs_resolution.png too.
#   robust_det  the same for detection (--task det, AP50 and AP): models rat, cnn (CNN + FPN
#         of about RAT's parameter count), resnet (ResNet-18 + FPN); evaluated at 0.75x, 1x,
#         1.5x, 2x IMAGE_SIZE. 128 px, 1000 train / 100 val, 6 epochs, batch 16, dim 64, depth 4,
#         heads 4, patch 4, seed 0 only; DIM a multiple of 32; writes ap50_vs_resolution.png.
#   det   the component study for detection at the robust_det budget and sweep, seed 0: variants
#         default (scales 1,0.5), scales_1, pe_rope, pe_none, sga_none, cnn (the small CNN + FPN).
#   cpu, robust, robust_det and det run two trainings at a time, tiny one, one thread each.
# Any of these env vars overrides the preset's value:
#   DATA (train.py --data: synthetic, twins, isic, coco) DATA_DIR IMAGE_SIZE TRAIN_SIZE VAL_SIZE
#   TEST_LIMIT EPOCHS BATCH_SIZE LR DROPOUT DIM DEPTH HEADS PATCH SEEDS (comma-separated)
#   NPROC (processes per training) JOBS (trainings at a time) THREADS (OMP_NUM_THREADS per process) WORKERS
#   OUT (default ablations/<preset>) VARIANTS (comma-separated subset of the names above)
#   TRAIN_SIZES (robust, robust_det: the multi recipe's --train-sizes)
#
# Each run lives in OUT/runs/<variant>_s<seed>/ (train.py's run folder, plus eval/ and,
# for the default, eval_ignore_spacing/). Rerunning skips finished runs; an interrupted
# study resumes where it stopped (train.py resumes from ckpt_last.pt). A training that
# runs out of memory leaves does_not_fit.txt and is reported as such (delete the file to
# retry); any other failure leaves failed.txt, the study goes on, and the script exits 1
# at the end (failed runs are retried on the next call).
set -euo pipefail
cd "$(dirname "$0")"

PRESET=${PRESET:-cpu}
TASK=seg  # train.py --task: det only for robust_det
case $PRESET in
  cpu)
    DATA=${DATA:-synthetic}; IMAGE_SIZE=${IMAGE_SIZE:-64}; TRAIN_SIZE=${TRAIN_SIZE:-600}
    VAL_SIZE=${VAL_SIZE:-100}; TEST_LIMIT=${TEST_LIMIT:-}; EPOCHS=${EPOCHS:-6}
    BATCH_SIZE=${BATCH_SIZE:-16}; LR=${LR:-1e-3}; DROPOUT=${DROPOUT:-0}; DIM=${DIM:-64}
    DEPTH=${DEPTH:-4}; HEADS=${HEADS:-4}; PATCH=${PATCH:-4}; NPROC=${NPROC:-1}
    JOBS=${JOBS:-2}; THREADS=${THREADS:-1}; WORKERS=${WORKERS:-0} ;;
  full)
    DATA=${DATA:-isic}; IMAGE_SIZE=${IMAGE_SIZE:-256}; TRAIN_SIZE=${TRAIN_SIZE:-}
    VAL_SIZE=${VAL_SIZE:-}; TEST_LIMIT=${TEST_LIMIT:-}; EPOCHS=${EPOCHS:-10}
    BATCH_SIZE=${BATCH_SIZE:-16}; LR=${LR:-1e-4}; DROPOUT=${DROPOUT:-0.1}; DIM=${DIM:-128}
    DEPTH=${DEPTH:-4}; HEADS=${HEADS:-8}; PATCH=${PATCH:-4}
    NPROC=${NPROC:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
    JOBS=${JOBS:-1}; THREADS=${THREADS:-}; WORKERS=${WORKERS:-4} ;;
  tiny)
    DATA=${DATA:-synthetic}; IMAGE_SIZE=${IMAGE_SIZE:-32}; TRAIN_SIZE=${TRAIN_SIZE:-16}
    VAL_SIZE=${VAL_SIZE:-4}; TEST_LIMIT=${TEST_LIMIT:-4}; EPOCHS=${EPOCHS:-1}
    BATCH_SIZE=${BATCH_SIZE:-8}; LR=${LR:-1e-3}; DROPOUT=${DROPOUT:-0}; DIM=${DIM:-16}
    DEPTH=${DEPTH:-4}; HEADS=${HEADS:-2}; PATCH=${PATCH:-4}; NPROC=${NPROC:-1}
    JOBS=${JOBS:-1}; THREADS=${THREADS:-1}; WORKERS=${WORKERS:-0} ;;
  robust)
    DATA=${DATA:-synthetic}; IMAGE_SIZE=${IMAGE_SIZE:-64}; TRAIN_SIZE=${TRAIN_SIZE:-1000}
    VAL_SIZE=${VAL_SIZE:-100}; TEST_LIMIT=${TEST_LIMIT:-}; EPOCHS=${EPOCHS:-8}
    BATCH_SIZE=${BATCH_SIZE:-16}; LR=${LR:-1e-3}; DROPOUT=${DROPOUT:-0}; DIM=${DIM:-64}
    DEPTH=${DEPTH:-4}; HEADS=${HEADS:-4}; PATCH=${PATCH:-4}; NPROC=${NPROC:-1}
    JOBS=${JOBS:-2}; THREADS=${THREADS:-1}; WORKERS=${WORKERS:-0} ;;
  robust_det|det)  # one seed by default: a det training takes minutes on this CPU
    TASK=det; DATA=${DATA:-synthetic}; IMAGE_SIZE=${IMAGE_SIZE:-128}; TRAIN_SIZE=${TRAIN_SIZE:-1000}
    VAL_SIZE=${VAL_SIZE:-100}; TEST_LIMIT=${TEST_LIMIT:-}; EPOCHS=${EPOCHS:-6}
    BATCH_SIZE=${BATCH_SIZE:-16}; LR=${LR:-1e-3}; DROPOUT=${DROPOUT:-0}; DIM=${DIM:-64}
    DEPTH=${DEPTH:-4}; HEADS=${HEADS:-4}; PATCH=${PATCH:-4}; NPROC=${NPROC:-1}
    JOBS=${JOBS:-2}; THREADS=${THREADS:-1}; WORKERS=${WORKERS:-0}; SEEDS=${SEEDS:-0} ;;
  *) echo "ablate.sh: unknown PRESET=$PRESET (cpu, full, tiny, robust, robust_det or det)" >&2; exit 2 ;;
esac
SEEDS=${SEEDS:-0,1,2}
OUT=${OUT:-ablations/$PRESET}
DATA_DIR=${DATA_DIR:-}
RUNS=$OUT/runs
[[ $DATA == synthetic || $DATA == twins || -n $DATA_DIR ]] || { echo "ablate.sh: DATA=$DATA needs DATA_DIR" >&2; exit 2; }
[[ -n $THREADS ]] && export OMP_NUM_THREADS=$THREADS

# The variants: name, what it changes (train.py flags appended to the default ones).
COMPONENT_VARIANTS=(
  "default|"
  "scales_1_0.5|--scales 1,0.5"
  "scales_1_0.5_0.25|--scales 1,0.5,0.25"
  "pe_rope|--pe rope"
  "pe_absolute|--pe absolute"
  "pe_none|--pe none"
  "sga_dense|--sga dense"
  "sga_none|--sga none"
  "sga_iters_3|--sga-iters 3"
  "stem_patch|--stem patch --head refine"
  "head_refine|--head refine"
  "grid_pixel|--token-grid pixel"
  "depth_2|--depth 2"
  "depth_6|--depth 6"
  "depth_8|--depth 8"
  "dim_$((DIM / 2))|--dim $((DIM / 2))"
  "dim_$((DIM * 3 / 2))|--dim $((DIM * 3 / 2))"
  "unet|--model unet"
)
DET_COMPONENT_VARIANTS=(
  "default|"
  "scales_1|--scales 1"
  "pe_rope|--pe rope"
  "pe_none|--pe none"
  "sga_none|--sga none"
  "cnn|--model cnn"
)
TABLE=(python tools/ablate_table.py)
if [[ $TASK == det ]]; then RESOLUTIONS=$((IMAGE_SIZE * 3 / 4)),$IMAGE_SIZE,$((IMAGE_SIZE * 3 / 2)),$((IMAGE_SIZE * 2))
else RESOLUTIONS=$((IMAGE_SIZE / 2)),$IMAGE_SIZE,$((IMAGE_SIZE * 2)),$((IMAGE_SIZE * 4)); fi
EVAL_FLAGS=(--resize-to-train)  # the baseline row at each resolution: resized to IMAGE_SIZE and back
if [[ $PRESET == robust || $PRESET == robust_det ]]; then
  # each model twice: <model>_single at IMAGE_SIZE, <model>_multi at sizes from 0.5x to 2x
  TRAIN_SIZES=${TRAIN_SIZES:-$((IMAGE_SIZE / 2)),$((IMAGE_SIZE * 3 / 4)),$IMAGE_SIZE,$((IMAGE_SIZE * 3 / 2)),$((IMAGE_SIZE * 2))}
  if [[ $TASK == det ]]; then
    # cnn is sized against the RAT of the default flags (--pe, --sga, --dim...); resnet ignores them
    MODELS=("rat|--model rat" "cnn|--model cnn" "resnet|--model resnet")
  else
    MODELS=("rose|--pe rose" "rope|--pe rope" "absolute|--pe absolute" "none|--pe none" "unet|--model unet")
  fi
  ALL_VARIANTS=()
  for entry in "${MODELS[@]}"; do
    ALL_VARIANTS+=("${entry%%|*}_single|${entry#*|}" "${entry%%|*}_multi|${entry#*|} --train-sizes $TRAIN_SIZES")
  done
  TABLE=(python tools/robust_table.py)
elif [[ $TASK == det ]]; then
  ALL_VARIANTS=("${DET_COMPONENT_VARIANTS[@]}")
else
  ALL_VARIANTS=("${COMPONENT_VARIANTS[@]}")
fi
DEFAULT_FLAGS=(--task "$TASK" --data "$DATA" --image-size "$IMAGE_SIZE" --pe rose --sga local
               --depth "$DEPTH" --dim "$DIM" --heads "$HEADS" --patch "$PATCH" --epochs "$EPOCHS"
               --batch-size "$BATCH_SIZE" --lr "$LR" --dropout "$DROPOUT" --workers "$WORKERS")
[[ -n $DATA_DIR ]] && DEFAULT_FLAGS+=(--data-dir "$DATA_DIR")
[[ -n $TRAIN_SIZE ]] && DEFAULT_FLAGS+=(--train-size "$TRAIN_SIZE")
[[ -n $VAL_SIZE ]] && DEFAULT_FLAGS+=(--val-size "$VAL_SIZE")
if [[ $NPROC -gt 1 ]]; then LAUNCH=(torchrun --standalone --nproc_per_node="$NPROC")
else LAUNCH=(python); fi

log() { echo "[$(date +%H:%M:%S)] $*"; }

flags_of() {  # variant name -> its extra train.py flags
  local entry
  for entry in "${ALL_VARIANTS[@]}"; do
    [[ ${entry%%|*} == "$1" ]] && { echo "${entry#*|}"; return 0; }
  done
  echo "ablate.sh: unknown variant $1 (known: ${ALL_VARIANTS[*]%%|*})" >&2; return 1
}

train_done() {  # metrics.jsonl holds the final epoch
  [[ -f $1/metrics.jsonl ]] && grep -q "^{\"epoch\": $EPOCHS," "$1/metrics.jsonl"
}

eval_dirs() {  # the eval folders a run needs
  echo eval
  [[ $2 == default && $TASK == seg ]] && echo eval_ignore_spacing
  return 0
}

run_done() {
  local dir=$1 name=$2 sub
  [[ -f $dir/does_not_fit.txt ]] && return 0
  train_done "$dir" || return 1
  for sub in $(eval_dirs "$dir" "$name"); do [[ -f $dir/$sub/results.json ]] || return 1; done
}

record_failure() {  # dir, log file, byte offset where this attempt's output starts, exit status
  local dir=$1 logfile=$2 from=$3 rc=$4 text
  [[ $rc -eq 130 || $rc -eq 143 ]] && return 0  # interrupted (Ctrl-C, SIGTERM): resumed by the next call
  text=$(tail -c +"$((from + 1))" "$logfile" | tr '\r' '\n' | grep -v '^ *$' | tail -n 5)
  if [[ $rc -eq 137 ]] || grep -qiE "out of memory|OutOfMemoryError|can't allocate memory|not enough memory" <<<"$text"; then
    printf 'exit status %s\n%s\n' "$rc" "$text" >"$dir/does_not_fit.txt"
    log "DOES NOT FIT $(basename "$dir"): $(tail -n 1 <<<"$text")"
  else
    printf 'exit status %s\n%s\n' "$rc" "$text" >"$dir/failed.txt"
    log "FAILED $(basename "$dir") (exit $rc): $(tail -n 1 <<<"$text")"
  fi
}

train_variant() {  # name seed -> 0 trained, 1 failed (recorded)
  local name=$1 seed=$2 dir=$RUNS/${1}_s$2 rc=0 from start
  train_done "$dir" && return 0
  local -a extra
  read -ra extra <<<"$(flags_of "$name")"
  touch "$dir/train.log"
  from=$(stat -c %s "$dir/train.log")
  start=$SECONDS
  log "train $name seed $seed: ${LAUNCH[*]} train.py ... ${extra[*]}"
  "${LAUNCH[@]}" train.py "${DEFAULT_FLAGS[@]}" "${extra[@]}" --seed "$seed" --out "$dir" \
    >>"$dir/train.log" 2>&1 || rc=$?
  if [[ $rc -ne 0 ]]; then record_failure "$dir" "$dir/train.log" "$from" "$rc"; return 1; fi
  log "trained $name seed $seed in $((SECONDS - start)) s"
}

eval_variant() {  # name seed -> 0 evaluated, 1 failed (recorded)
  local name=$1 seed=$2 dir=$RUNS/${1}_s$2 sub rc from
  local -a opts
  for sub in $(eval_dirs "$dir" "$name"); do
    [[ -f $dir/$sub/results.json ]] && continue
    opts=(--ckpt "$dir/ckpt_best.pt" --resolutions "$RESOLUTIONS" --split test --samples 2
          --workers "$WORKERS" --out "$dir/$sub.partial" "${EVAL_FLAGS[@]}")
    [[ -n $TEST_LIMIT ]] && opts+=(--limit "$TEST_LIMIT")
    [[ $sub == eval_ignore_spacing ]] && opts+=(--ignore-spacing)
    touch "$dir/eval.log"
    from=$(stat -c %s "$dir/eval.log")
    rm -rf "$dir/$sub.partial"
    rc=0
    python eval.py "${opts[@]}" >>"$dir/eval.log" 2>&1 || rc=$?
    if [[ $rc -ne 0 ]]; then
      record_failure "$dir" "$dir/eval.log" "$from" "$rc"
      # out of memory at a large resolution: keep the resolutions that fit, say so in the table
      [[ -f $dir/does_not_fit.txt && -f $dir/$sub.partial/results.json ]] || return 1
      mv "$dir/does_not_fit.txt" "$dir/$sub.partial/does_not_fit.txt"
    fi
    rm -rf "${dir:?}/$sub" && mv "$dir/$sub.partial" "$dir/$sub"  # results.json appears only when complete
    log "evaluated $name seed $seed ($sub) at $RESOLUTIONS px"
  done
}

run_one() {  # train then evaluate one (variant, seed); failures are recorded, not fatal
  local name=$1 seed=$2 dir=$RUNS/${1}_s$2
  if run_done "$dir" "$name"; then log "skip $name seed $seed (finished)"; return 0; fi
  mkdir -p "$dir"
  rm -f "$dir/failed.txt"
  train_variant "$name" "$seed" && eval_variant "$name" "$seed" || true
}

on_interrupt() {  # Ctrl-C / SIGTERM: train.py saves ckpt_last.pt on SIGTERM and exits
  local pid
  trap '' INT TERM
  log "interrupted: stopping the runs; run the same command again to resume" >&2
  for pid in $(jobs -p); do
    pkill -TERM -P "$pid" 2>/dev/null || true  # train.py / eval.py / torchrun of this job
    kill -TERM "$pid" 2>/dev/null || true
  done
  wait || true
  exit 130
}

main() {
  local names=() name seed entry i=0 total
  if [[ -n ${VARIANTS:-} ]]; then
    IFS=', ' read -ra names <<<"$VARIANTS"
    for name in "${names[@]}"; do flags_of "$name" >/dev/null; done
  else
    for entry in "${ALL_VARIANTS[@]}"; do names+=("${entry%%|*}"); done
  fi
  [[ $PRESET == robust* || ($((DIM / 2 % HEADS)) -eq 0 && $((DIM * 3 / 2 % HEADS)) -eq 0) ]] || {
    echo "ablate.sh: the width variants $((DIM / 2)), $((DIM * 3 / 2)) must be divisible by HEADS=$HEADS" >&2; exit 2; }
  IFS=', ' read -ra seeds <<<"$SEEDS"
  mkdir -p "$RUNS"
  # what the table needs to know: the requested variants, their flags, the seeds
  { echo -e "variant\tflags"; for name in "${names[@]}"; do echo -e "$name\t$(flags_of "$name")"; done; } >"$OUT/variants.tsv"
  total=$((${#names[@]} * ${#seeds[@]}))
  log "preset $PRESET: ${#names[@]} variants x ${#seeds[@]} seeds, $JOBS at a time, into $OUT"
  log "default: ${LAUNCH[*]} train.py ${DEFAULT_FLAGS[*]}; eval at $RESOLUTIONS px"
  trap on_interrupt INT TERM
  for seed in "${seeds[@]}"; do          # seed-major: an early stop still has every variant once
    for name in "${names[@]}"; do
      i=$((i + 1))
      log "[$i/$total] $name seed $seed"
      run_one "$name" "$seed" &
      while [[ $(jobs -rp | wc -l) -ge $JOBS ]]; do wait -n || true; done
    done
  done
  wait
  trap - INT TERM
  "${TABLE[@]}" --out "$OUT" --seeds "$SEEDS" --preset "$PRESET"
  local failed
  failed=$(find "$RUNS" -name failed.txt | sort)
  if [[ -n $failed ]]; then log "failed runs (rerun to retry):"; echo "$failed"; exit 1; fi
  log "done: $OUT/results.md"
}

main "$@"
