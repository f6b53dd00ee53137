#!/usr/bin/env bash
# The CIFAR-10 fast-schedule runs behind docs/RESULTS.md, in order of priority; resumable: run
# it again after a stop or a crash (finished models are reused, interrupted ones resume from
# their last checkpoint, at most 100 steps back). Hours of CPU: start it in the background,
# outside the work tree, e.g.
#
#   RUNS=../erde-runs/reproduce setsid nohup bash scripts/cifar10-fast.sh >> ../erde-runs/queue.log 2>&1 &
#
#  1. one ResNet-56 teacher and ResNet-20 CE/KD/ERDE students, seed 0 (the first comparison)
#  2. seeds 1 and 2 of step 1's students, same teacher (the comparison over seeds; seed 0 reused)
#  3. a smaller student, ResNet-20 x0.5, 1 seed, same teacher          (where ~10x can come from)
#  4. cross-family: MobileNetV2 x0.5 students, exits paired by cost, 1 seed, same teacher
#     (last: its depthwise convolutions make it the slowest, ~2.5 s per step of three students
#     against ~0.7 s for ResNet-20 on a 2-core AVX-512 EPYC)
#
# A finished step-1 teacher from elsewhere (e.g. made portable with `erde release TEACHER_DIR --out
# DIR/checkpoint.pt`, its config.yaml beside it) counts as finished when copied to
# $RUNS/cifar10-fast/seed_0/teacher (same settings), so the script goes straight to the students.
#
# Steps 3 and 4 start from a copy of step 1's finished teacher (erde reproduce reuses a finished
# run whose settings match). With DOCS=docs each step publishes its results into docs/ (RESULTS.md
# blocks cifar10-fast, cifar10-fast-resnet56-resnet20_x0.5, cifar10-fast-resnet56-mobilenetv2_x0.5)
# as soon as it finishes; without, rerun the steps' commands with --docs docs later.
# LANES=2 runs steps 2-3 and step 4 at once, one thread each (see below; for a 2-core machine).
# OMP_NUM_THREADS (default 2) is the CPU threads; PYTHON the interpreter (default python3); DATA the JPEG copy of CIFAR-10; EXTRA more
# arguments for every step (the tests use it for tiny models: EXTRA="--set teacher.arch=resnet8 ...").
set -euo pipefail

# The whole script is one function, parsed before anything runs: editing this file while a run is
# going (a git pull, a checkout) cannot change the commands that run is about to read.
main() {
    # erde from this source tree, whatever `pip install -e` last pointed the installed one at: a
    # run of many hours must not pick up another checkout (or a deleted one) between its steps.
    local here
    here="$(cd "$(dirname "$0")/.." && pwd)"
    export PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
    local data="${DATA:-$here/../shared/data/cifar10-jpeg.tar.gz}"
    if [ ! -e "$data" ]; then
        echo "cifar10-fast.sh: no CIFAR-10 copy at $data (set DATA)" >&2
        return 2
    fi
    data="$(cd "$(dirname "$data")" && pwd)/$(basename "$data")"  # absolute, as configs record it
    local runs="${RUNS:?set RUNS to a folder outside the work tree for the run folders}"
    local extra common
    read -r -a extra <<< "${EXTRA:-}"
    common=(--dataset cifar10 --data-dir "$data" --schedule fast --no-progress "${extra[@]}")
    if [ -n "${DOCS:-}" ]; then common+=(--docs "$DOCS"); fi

    erde reproduce "${common[@]}" --seeds 1 --teacher-seeds 1 --out "$runs/cifar10-fast"

    local teacher="$runs/cifar10-fast/seed_0/teacher" variant
    for variant in r20x0.5 mobilenetv2x0.5; do
        mkdir -p "$runs/cifar10-fast-$variant/seed_0"
        [ -e "$runs/cifar10-fast-$variant/seed_0/teacher" ] ||
            cp -r "$teacher" "$runs/cifar10-fast-$variant/seed_0/teacher"
    done
    local seeds=(--seeds 3 --teacher-seeds 1 --out "$runs/cifar10-fast")
    local half=(--seeds 1 --set student.width=0.5 --out "$runs/cifar10-fast-r20x0.5")
    local mobile=(--seeds 1 --set student.arch=mobilenetv2_x0.5 --set distill.exit_mapping_by=cost
                  --out "$runs/cifar10-fast-mobilenetv2x0.5")
    if [ "${LANES:-1}" = 2 ]; then
        # Two processes of one thread each: steps 2-3 in one, step 4 in the other. On a 2-core
        # machine they get more done together than one 2-thread process does in turn: two
        # 1-thread runs of the ResNet-20 trio made 0.84 + 0.79 = 1.63 steps/s on the 2-core
        # AVX-512 EPYC VM, one 2-thread run 1.40 (1.16x). When steps 2-3 are done, step
        # 4 is stopped and resumed below with all threads (from its last checkpoint). Blocks
        # published by both lanes take turns on RESULTS.md.
        OMP_NUM_THREADS=1 "${PYTHON:-python3}" -m erde.cli reproduce "${common[@]}" "${mobile[@]}" &
        local lane=$!
        if ! (export OMP_NUM_THREADS=1 && erde reproduce "${common[@]}" "${seeds[@]}" &&
              erde reproduce "${common[@]}" "${half[@]}"); then
            kill -TERM "$lane" 2>/dev/null
            wait "$lane" || true
            return 1
        fi
        kill -TERM "$lane" 2>/dev/null || true  # already finished when the tiny runs of tests are
        wait "$lane" || true  # its failure, if any, shows again in the rerun below
    else
        erde reproduce "${common[@]}" "${seeds[@]}"
        erde reproduce "${common[@]}" "${half[@]}"
    fi
    erde reproduce "${common[@]}" "${mobile[@]}"
    echo "all CIFAR-10 fast-schedule runs finished"
}

erde() { "${PYTHON:-python3}" -m erde.cli "$@"; }

main "$@"
exit
