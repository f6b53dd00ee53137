#!/usr/bin/env bash
# GPU check: run on a CUDA machine from the repository root, with OUT set to a folder for the
# results (created if missing). Needs python3 with a CUDA build of torch and erde's
# dependencies; erde runs from this source tree (no install, no network).
#
#   cp ../shared/data/cifar10-jpeg.tar.gz data/    # data/ is git-ignored
#   OUT=/tmp/gpu bash scripts/gpu-check.sh         # REPRODUCE_SECONDS=300 by default
#
# Writes at most 8 files into $OUT (one folder down): gpu-check.log (everything printed),
# env.txt, pytest.txt (its CUDA tests include the no-sync check of batch building),
# training-bench.json (the defaults: bf16 autocast, NHWC) and training-bench-fp32.json (the same
# without autocast, which ran faster on an H200 for these models: docs/PERFORMANCE.md), and
# reproduce/results.json and tradeoff.png of `erde reproduce --schedule fast` for as many seeds
# as finish within REPRODUCE_SECONDS (interrupted seeds are not in the results; the run folder
# resumes with the same command), and reproduce/curves.png, the validation curves of every
# model so far (finished or not). The whole script takes about 3 minutes plus
# REPRODUCE_SECONDS; on an H200 the fast schedule's teacher alone takes about 440 s, so with
# the default budget the reproduce step gives its epoch times, not results.
#
# For a rehearsal on a machine without a GPU (tests/tools/test_gpu_check.py runs one with tiny models):
# DEVICE=cpu, TESTS=none (skip the test step), BENCH_ARGS and BENCH_FP32_ARGS (the benchmark's
# arguments, defaults "--preset cifar --rounds 3 --epoch-time" and "--preset cifar --rounds 3
# --no-amp"), EXTRA (more arguments for the torchrun training and reproduce).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to the folder for the results}"
DATA="${CIFAR10_JPEG:-data/cifar10-jpeg.tar.gz}"
REPRODUCE_SECONDS="${REPRODUCE_SECONDS:-300}"
DEVICE="${DEVICE:-cuda}"
TESTS="${TESTS:-tests/test_training.py tests/test_losses.py tests/test_models.py tests/test_side_by_side.py tests/test_inference.py}"
read -r -a BENCH <<< "${BENCH_ARGS:---preset cifar --rounds 3 --epoch-time}"
read -r -a BENCH_FP32 <<< "${BENCH_FP32_ARGS:---preset cifar --rounds 3 --no-amp}"
read -r -a EXTRA <<< "${EXTRA:-}"
RUNS="${RUNS:-/tmp/erde-gpu-runs}"
mkdir -p "$OUT/reproduce" "$RUNS"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu-check.log") 2>&1

step() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }

step "environment"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    python3 -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
    # GNU nproc honours OMP_NUM_THREADS and OMP_THREAD_LIMIT; the CPUs are what is asked here
    echo "cpus $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
} | tee "$OUT/env.txt"

step "CUDA-relevant tests (training loop, losses, models, distributed, inference, export)"
if [ "$TESTS" != none ]; then
    read -r -a tests <<< "$TESTS"
    python3 -m pytest -q -x -p no:cacheprovider "${tests[@]}" 2>&1 | tail -n 40 | tee "$OUT/pytest.txt"
fi

step "training throughput and epoch times (ResNet-56 teacher, ResNet-20 ERDE student)"
timeout 300 python3 benchmarks/training.py "${BENCH[@]}" --device "$DEVICE" \
    --json "$OUT/training-bench.json"
step "the same steps without bf16 autocast"
timeout 120 python3 benchmarks/training.py "${BENCH_FP32[@]}" --device "$DEVICE" \
    --json "$OUT/training-bench-fp32.json"

step "one short training under torchrun (NCCL)"
timeout 120 python3 -m torch.distributed.run --nnodes=1 --nproc_per_node=1 \
    --master_addr=127.0.0.1 --master_port=29533 -m erde.cli train-teacher --no-progress \
    --device "$DEVICE" --force --out "$RUNS/torchrun-teacher" \
    --set teacher_train.epochs=1 --set teacher_train.max_steps_per_epoch=20 "${EXTRA[@]}"
python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print('torchrun teacher:', r[-1]['images'], 'images,', round(r[-1]['images_per_second']), 'img/s')" \
    "$RUNS/torchrun-teacher/metrics.jsonl"

step "erde reproduce --schedule fast on CIFAR-10 ($DATA), ${REPRODUCE_SECONDS}s budget"
if [ -f "$DATA" ]; then
    timeout --signal=INT "$REPRODUCE_SECONDS" python3 -m erde.cli reproduce --dataset cifar10 \
        --data-dir "$DATA" --schedule fast --seeds 3 --teacher-seeds 1 --device "$DEVICE" \
        --no-progress --out "$RUNS/cifar10-fast" "${EXTRA[@]}"
    echo "reproduce exit status: $?"
    for f in results.json tradeoff.png; do
        [ -f "$RUNS/cifar10-fast/$f" ] && cp "$RUNS/cifar10-fast/$f" "$OUT/reproduce/"
    done
    python3 -m erde.cli status "$RUNS/cifar10-fast" --plot "$OUT/reproduce/curves.png"
    grep -h '"seconds"' "$RUNS"/cifar10-fast/seed_*/*/metrics.jsonl 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(r["model"], "epoch", r["epoch"], round(r["seconds"], 1), "s, val", r["val_exit_accuracy"][-1])'
else
    echo "no $DATA: copy ../shared/data/cifar10-jpeg.tar.gz there first"
fi
step "done"
