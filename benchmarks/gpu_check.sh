#!/usr/bin/env bash
# The one GPU check, sized to end inside one 10-minute device call: build, run the CUDA parity
# tests (the Triton kernels on the card), then every GPU benchmark; the logs and tables land in
# $OUT (or ./gpu-results) for benchmarks/RESULTS.md, with summary.md saying how each step ended.
#   bash benchmarks/gpu_check.sh            (BUDGET_S=540 by default: the whole run's seconds)
#
# $OUT gets at most 8 files back, so steps of one topic share a log (appended): the schedule op
# and the ops' host cost per call in bench_ops.md, the training steps in bench_train.md.
#
# A step that fails or runs out of time is recorded and the next one still runs: one broken
# kernel must not cost the timings of the others on a card lent for minutes. Each step gets at
# most its own cap and never more than what is left of the budget.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
budget="${BUDGET_S:-540}"
py="${PYTHON:-python3}"  # the card's image holds torch in python3
export PYTHONUNBUFFERED=1
mkdir -p "$out"
start=$(date +%s)
printf '| step | exit | seconds |\n|---|---|---|\n' >"$out/summary.md"

step() {  # step NAME CAP_SECONDS LOG COMMAND...
    local name=$1 cap=$2 log=$3 left t0 rc
    shift 3
    left=$((budget - ($(date +%s) - start) - 5))
    ((left < cap)) && cap=$left
    if ((cap < 10)); then
        echo "| $name | skipped: budget spent | 0 |" >>"$out/summary.md"
        return
    fi
    echo "== $name (at most ${cap}s)"
    t0=$(date +%s)
    echo "== $name" >>"$out/$log"
    timeout --kill-after=5 "$cap" "$@" 2>&1 | tee -a "$out/$log" | tail -n 12
    rc=${PIPESTATUS[0]}
    ((rc == 124 || rc == 137)) && rc="$rc (timed out)"
    echo "| $name | $rc | $(($(date +%s) - t0)) |" >>"$out/summary.md"
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$py" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >"$out/device.txt" 2>&1
cat "$out/device.txt"

# The card's machine reaches no package index but has torch, triton, pybind11, setuptools and
# pytest: build against what is there (the C++ CPU kernels; the GPU kernels are Triton's).
step build 180 build.log bash -c "$py -m pip install -v --no-build-isolation --no-deps . \
    && $py -P -c 'import vdm_fast; print(vdm_fast.build_info())'"
# -P: import the installed package (with its compiled _C), not the source tree in the cwd.
# The users' self-test first: every op on the card against its reference, one table.
step self-test 60 cuda_tests.txt "$py" -P -m vdm_fast.check --device cuda
step cuda-tests 180 cuda_tests.txt "$py" -P -m pytest -q -m cuda -p no:cacheprovider
# Host microseconds per call of every op (the launch loop, synchronised outside the clock) beside
# plain torch and the reference, and the CIFAR-10 U-Net's forward + backward on a 1x3x2x2 input,
# fused against the reference (eager: compiling the 32-block U-Net twice would take the budget).
step bench_overhead 90 bench_ops.md "$py" benchmarks/bench_overhead.py --device cuda --rounds 9 --no-compile
# The driver's CIFAR-10 step (128 channels, 32 blocks, bf16, batch 128, dropout 0: random images
# of the shape), eager against --cuda-graphs; --compile last, as the most expensive.
step bench_step 90 bench_train.md "$py" benchmarks/bench_step.py --model cifar10 --device cuda \
    --variants eager cuda-graphs --steps 5 --rounds 3 --warmup 4
# The attention kernels' tile variants and SDPA side by side (kernels/attention_tiles.py): its
# last lines are the DEFAULT entries to write. In bench_unet.md (the U-Net's blocks' log): $OUT
# takes 8 files.
step bench_attention_tiles 120 bench_unet.md "$py" benchmarks/bench_attention_tiles.py --budget-s 80
step bench_schedule 60 bench_ops.md "$py" benchmarks/bench_schedule.py --device cuda
step bench_loss 150 bench_loss.md "$py" benchmarks/bench_loss.py --device cuda --ref-limit-gb 100
step bench_unet 150 bench_unet.md "$py" benchmarks/bench_unet.py
step bench_train 90 bench_train.md "$py" benchmarks/bench_train.py --device cuda --schedules nnet
step bench_step_compile 180 bench_train.md "$py" benchmarks/bench_step.py --model cifar10 --device cuda \
    --variants eager compile --steps 5 --rounds 3 --warmup 2
cat "$out/summary.md"
