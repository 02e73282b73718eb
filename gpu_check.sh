#!/usr/bin/env bash
# The GPU check: one unattended script for a machine with one CUDA GPU (GPU time is scarce:
# nothing here waits for a person). Each item runs under its own time limit and prints one
# line, PASS <item> <detail> or FAIL <item> <reason>, then the next item runs; the last line
# is "N passed, M failed" and the exit status is non-zero if any item failed. Under 8 minutes
# on one GPU (--budget caps the whole run; an item that would start past it fails as not run).
#
#   bash gpu_check.sh                     # on the GPU machine; runs under a temporary folder
#   bash gpu_check.sh --out /tmp/gc       # keep the runs and logs (<out>/<item>.log)
#   bash gpu_check.sh --only seg,eval     # some items (eval reads seg's and det's checkpoints)
#   bash gpu_check.sh --dry-run           # every item on the CPU with tiny sizes (tests/test_gpu_check.py)
#   bash gpu_check.sh --budget 300        # seconds for all the items (default 440)
#
# Items: seg, det (a few dozen bf16 training steps each), channels_last, eval (the resolution
# sweep of seg's and det's checkpoints), ddp (2 ranks sharing the GPU with --dist-backend
# cuda:gloo, SIGTERM to one rank's process group, rerun resumes), bench (512 px training step, peak memory),
# compile (inductor; last, as its compile time is the least predictable).
# PYTHON (default python) is the interpreter to use.
set -u
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
PY=${PYTHON:-python}
ITEMS="seg det channels_last eval ddp bench compile"

usage() { sed -n '2,18p' "$SELF" | cut -c3-; }

# (an item run by the driver gets these two from its environment)
DRY=${GPU_CHECK_DRY:-0}
OUT=${GPU_CHECK_OUT:-}
ONLY=""
BUDGET=440      # seconds for all the items (with start-up and the last kill grace: under 8 min)
ITEM=""
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --out) OUT=$2; shift ;;
        --only) ONLY=$2; shift ;;
        --budget) BUDGET=$2; shift ;;
        --item) ITEM=$2; shift ;;          # internal: run one item (the driver calls this under `timeout`)
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for i in ${ONLY//,/ }; do
    case " $ITEMS " in *" $i "*) ;; *) echo "gpu_check.sh: unknown item $i (items: $ITEMS)" >&2; exit 2 ;; esac
done
if [ -z "$ITEM" ]; then   # the driver: --out relative to where it was called from
    if [ -z "$OUT" ]; then OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX"); fi
    mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
fi
cd "$(dirname "$SELF")"

# ---------------------------------------------------------------------------------------
# sizes: a GPU run of each item, or the same commands at tiny sizes on the CPU
if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    COMPILE=aot_eager             # inductor's code generation takes minutes on a CPU
    DIST=gloo
    SEG="--task seg --image-size 32 --dim 32 --depth 1 --heads 2 --train-size 16 --val-size 4 --batch-size 8
         --epochs 1 --workers 0"
    DET="--task det --image-size 64 --dim 32 --depth 2 --heads 2 --train-size 8 --val-size 4 --batch-size 4
         --epochs 1 --workers 0"
    # a loader worker per rank: the SIGTERM to a rank's process group reaches it too
    DDP="--task seg --image-size 32 --dim 32 --depth 2 --heads 2 --train-size 64 --val-size 4 --batch-size 8
         --epochs 2 --workers 1"
    SEG_RES=32,64; DET_RES=64,96; EVAL="--limit 4 --workers 0"
    BENCH="--size 64 --dim 32 --depth 2 --heads 2 --reps 1"
else
    DEVICE=cuda
    COMPILE=inductor
    DIST=cuda:gloo                # gloo for CUDA tensors only (NCCL's restriction): 2 ranks share one GPU
    # the README's GPU model (dim 128, 4 blocks, 8 heads, patch 4) at 256 px: 512 images, batch 16: 32 steps
    SEG="--task seg --image-size 256 --dim 128 --depth 4 --heads 8 --patch 4 --train-size 512 --val-size 64
         --batch-size 16 --epochs 1 --workers 6"
    DET="--task det --image-size 256 --dim 128 --depth 4 --heads 8 --train-size 512 --val-size 64
         --batch-size 16 --epochs 1 --workers 6"
    DDP="--task seg --image-size 128 --dim 128 --depth 4 --heads 8 --patch 4 --train-size 256 --val-size 32
         --batch-size 16 --epochs 2 --workers 3"
    SEG_RES=128,256,512; DET_RES=192,256,384; EVAL="--limit 64 --workers 6"
    BENCH="--size 512"
fi

# train.py into a fresh run folder: on a reused --out, a finished run would "resume" and train nothing
train() { local out=$1; shift; rm -rf "$out" && $PY train.py "$@" --out "$out"; }
summary() { $PY tools/gpu_check.py summary "$@" --device $DEVICE; }

# ---------------------------------------------------------------------------------------
# the items: each prints its detail as its last line of output and returns non-zero on failure
item_seg() { train "$OUT/seg" $SEG && summary "$OUT/seg"; }

item_det() { train "$OUT/det" $DET && summary "$OUT/det"; }

item_channels_last() {
    train "$OUT/channels_last" $SEG --channels-last && summary "$OUT/channels_last" --like "$OUT/seg"
}

item_compile() {
    train "$OUT/compile" $SEG --compile $COMPILE && summary "$OUT/compile" --like "$OUT/seg"
}

item_eval() {
    for t in seg det; do
        [ -f "$OUT/$t/ckpt_best.pt" ] || { echo "no $OUT/$t/ckpt_best.pt (the $t item must pass first)"; return 1; }
    done
    $PY eval.py --ckpt "$OUT/seg/ckpt_best.pt" --resolutions $SEG_RES $EVAL --out "$OUT/eval_seg" &&
    $PY eval.py --ckpt "$OUT/det/ckpt_best.pt" --resolutions $DET_RES $EVAL --out "$OUT/eval_det" &&
    $PY tools/gpu_check.py eval-summary "$OUT/eval_seg" "$OUT/eval_det" --device $DEVICE
}

item_ddp() {
    rm -rf "$OUT/ddp"   # a leftover checkpoint would make the first run a resume
    $PY tools/gpu_check.py sigterm-resume --run "$OUT/ddp" --device $DEVICE -- \
        $PY -m torch.distributed.run --standalone --nproc_per_node=2 \
        train.py $DDP --dist-backend $DIST --ckpt-every 1 --out "$OUT/ddp"
}

item_bench() { $PY tools/gpu_check.py bench $BENCH; }

# seconds each item may take on the GPU (the budget may leave it less)
limit() {
    case $1 in
        seg|det|channels_last) echo 90 ;;
        eval) echo 90 ;;
        bench) echo 60 ;;
        ddp) echo 150 ;;
        compile) echo 300 ;;
    esac
}

if [ -n "$ITEM" ]; then   # one item, in this process (the driver's `timeout` wraps it)
    "item_$ITEM"
    exit $?
fi

# ---------------------------------------------------------------------------------------
# the driver
$PY tools/gpu_check.py header
if [ "$DRY" = 1 ]; then
    echo "# DRY RUN: every item on the CPU (CUDA_VISIBLE_DEVICES=''), tiny sizes, --compile $COMPILE," \
         "--dist-backend $DIST: it tests this script and the code paths, not the GPU"
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
elif ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check.sh: no CUDA device visible to torch; on a CPU machine use --dry-run" >&2
    exit 2
fi
echo "# runs and logs in $OUT, budget ${BUDGET} s"
export GPU_CHECK_DRY=$DRY GPU_CHECK_OUT=$OUT PYTHON=$PY

passed=0 failed=0
deadline=$(( $(date +%s) + BUDGET ))
for item in $ITEMS; do
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$item,"* ]]; then continue; fi
    log="$OUT/$item.log"
    secs=$(limit $item)
    left=$(( deadline - $(date +%s) ))
    if [ $left -lt 15 ]; then
        echo "FAIL $item not run: the ${BUDGET} s budget is spent"; failed=$((failed + 1)); continue
    fi
    [ $secs -gt $left ] && secs=$left
    start=$(date +%s)
    # its own process group, so that the time-out reaches every process the item started
    ITEM_LOG=$log timeout -k 15 $secs bash "$SELF" --item $item > "$log" 2>&1
    rc=$?
    took=$(( $(date +%s) - start ))
    # the detail: the item's last line of output, stripped of progress-bar clutter
    detail=$(tr '\r' '\n' < "$log" | grep -v '^\s*$' | tail -n 1 | cut -c1-300)
    if [ $rc -eq 0 ]; then
        echo "PASS $item $detail [${took} s]"; passed=$((passed + 1))
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "FAIL $item timed out after ${secs} s; last output: $detail (log: $log)"; failed=$((failed + 1))
    else
        echo "FAIL $item $detail (exit $rc, log: $log)"; failed=$((failed + 1))
    fi
done
echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
