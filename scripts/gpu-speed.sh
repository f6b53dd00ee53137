#!/usr/bin/env bash
# The speed-schedule comparison on one CUDA GPU, in one call of at most 9 minutes. Run from the
# repository root with OUT set to a folder for the results; needs python3 with a CUDA build of
# torch and erde's dependencies; erde runs from this source tree (no install, no network).
#
#   cp ../shared/data/cifar10-jpeg.tar.gz data/    # data/ is git-ignored
#   OUT=/tmp/gpu bash scripts/gpu-speed.sh
#
# Steps, each under its own time budget (seconds, environment variables), in order of value:
#   env          env.txt: GPU, driver, torch
#   bench        BENCH_SECONDS (60) / COMPILE_SECONDS (90): bench.json / bench-compile.json, img/s
#                of the FastNet ERDE step in erde's loop and in a plain loop
#                (benchmarks/training.py --preset speed), eager and compiled
#   headline     HEADLINE_SECONDS (240): erde reproduce --schedule speed, one teacher, up to 10
#                half-width student seeds (ce, kd, erde side by side)
#   quarter      QUARTER_SECONDS (60): up to 5 seeds of quarter-width students, same teacher
#   ablation     ABLATION_SECONDS (90): up to 3 seeds of kd, erde and erde at gamma 0.25/0.5/2/4,
#                at tau 1, and with the "uncertain or incorrect" mask, same teacher
#   teachers     TEACHERS_SECONDS (0: skipped): TEACHER_SEEDS (3) teachers with a half-width
#                seed each, the block cifar10-speed-<N>teachers (what the teacher's draw does)
# The budgets add up to 540 s, under the device's 10 minutes per command. Every reproduce run
# publishes after each finished seed, so a budget that runs out leaves the seeds it finished
# (marked partial); the run folders resume with the same command. OUT gets env.txt, bench.json,
# bench-compile.json, gpu-speed.log and results.tar.gz (5 files; the device returns at most 8):
# per block results/<block>.json, <block>-records.npz (per-image records: `erde verify`
# re-derives every table from them) and <block>-seeds.json.gz (the seeds' reports and
# training logs: `erde reproduce --docs` continues the block elsewhere), and the released
# teacher (teacher/, float16).
#
# Rehearsal without a GPU (tests/tools/test_gpu_speed.py, tiny models): DEVICE=cpu, BENCH_ARGS (the
# benchmark's arguments), COMPILE=0 (skip the compiled benchmark), EXTRA (more arguments for
# every reproduce, before each step's own), SEEDS / QUARTER_SEEDS / ABLATION_SEEDS (10 / 5 / 3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to the folder for the results}"
DATA="${CIFAR10_JPEG:-data/cifar10-jpeg.tar.gz}"
DEVICE="${DEVICE:-cuda}"
RUNS="${RUNS:-/tmp/erde-gpu-speed}"
read -r -a BENCH <<< "${BENCH_ARGS:---preset speed --rounds 3}"
read -r -a EXTRA <<< "${EXTRA:-}"
SEEDS="${SEEDS:-10}" QUARTER_SEEDS="${QUARTER_SEEDS:-5}" ABLATION_SEEDS="${ABLATION_SEEDS:-3}"
TEACHER_SEEDS="${TEACHER_SEEDS:-3}"
ABLATION="kd,erde,erde_g0.25=erde:gamma=0.25,erde_g0.5=erde:gamma=0.5,erde_g2=erde:gamma=2,\
erde_g4=erde:gamma=4,kd_t1=kd:temperature=1,erde_t1=erde:temperature=1,\
erde_mask=erde:uncertain_above=0.5"
mkdir -p "$OUT" "$RUNS/publish/results"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu-speed.log") 2>&1

step() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }
reproduce() {  # budget, out folder, more arguments
    local budget=$1 out=$2
    shift 2
    timeout --signal=INT "$budget" python3 -m erde.cli reproduce --dataset cifar10 \
        --data-dir "$DATA" --schedule speed --teacher-seeds 1 --device "$DEVICE" --no-progress \
        --out "$out" --docs "$RUNS/docs" "${EXTRA[@]}" "$@"
    echo "reproduce exit status: $?"
}

step "environment"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    python3 -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
} | tee "$OUT/env.txt"

step "training throughput: FastNet -> half-width FastNet ERDE step, plain loop and erde's"
timeout "${BENCH_SECONDS:-60}" python3 benchmarks/training.py "${BENCH[@]}" --device "$DEVICE" \
    --json "$OUT/bench.json"
step "the same steps compiled"
if [ "${COMPILE:-1}" = 1 ]; then
    timeout "${COMPILE_SECONDS:-90}" python3 benchmarks/training.py "${BENCH[@]}" --compile --device "$DEVICE" \
        --json "$OUT/bench-compile.json"
else
    echo "skipped (COMPILE=0)"
fi

if [ ! -f "$DATA" ]; then
    echo "no $DATA: copy ../shared/data/cifar10-jpeg.tar.gz there first"
    step "done"
    exit 0
fi

step "headline: one teacher, up to $SEEDS half-width student seeds"
reproduce "${HEADLINE_SECONDS:-240}" "$RUNS/speed" --seeds "$SEEDS"
if [ -f "$RUNS/speed/seed_0/teacher/checkpoint.pt" ] \
    && python3 -m erde.cli release "$RUNS/speed/seed_0/teacher" --half \
        --out "$RUNS/teacher/checkpoint.pt"; then
    cp "$RUNS/speed/seed_0/teacher/config.yaml" "$RUNS/speed/seed_0/teacher/metrics.jsonl" "$RUNS/teacher/"
    mkdir -p "$RUNS/publish/teacher" && cp "$RUNS/teacher/"* "$RUNS/publish/teacher/"

    step "quarter width: up to $QUARTER_SEEDS seeds from the same teacher"
    reproduce "${QUARTER_SECONDS:-60}" "$RUNS/speed-x0.25" --seeds "$QUARTER_SEEDS" \
        --teacher "$RUNS/teacher" --set student.width=0.25

    step "ablation: gamma, tau and the mask, up to $ABLATION_SEEDS seeds from the same teacher"
    reproduce "${ABLATION_SECONDS:-90}" "$RUNS/speed-ablation" --seeds "$ABLATION_SEEDS" \
        --teacher "$RUNS/teacher" --students "$ABLATION"
fi

if [ "${TEACHERS_SECONDS:-0}" -gt 0 ]; then
    step "teachers: $TEACHER_SEEDS teachers, one half-width seed each"
    reproduce "$TEACHERS_SECONDS" "$RUNS/speed-teachers" --seeds "$TEACHER_SEEDS" \
        --teacher-seeds "$TEACHER_SEEDS" --block "cifar10-speed-${TEACHER_SEEDS}teachers"
fi

step "results"
for f in "$RUNS"/docs/results/*.json "$RUNS"/docs/results/*-records.npz "$RUNS"/docs/results/*-seeds.json.gz; do
    [ -f "$f" ] && cp "$f" "$RUNS/publish/results/"
done
for f in "$RUNS"/publish/results/*.json; do
    [ -f "$f" ] && python3 -m erde.cli verify "$f"
done
tar -czf "$OUT/results.tar.gz" -C "$RUNS/publish" . && tar -tzf "$OUT/results.tar.gz"
step "done"
