#!/usr/bin/env bash
# Issue 15's GPU checks in one device call (about 9 minutes on one H100/H200; each part has its own timeout and
# the bench rewrites its results after every section, so a part cut short keeps what it measured):
#   1. the batch-size sweep, eager, with peak-memory ratios: DeiT-S, Swin-T, ResNet-50 pairs at batch 64-512
#      (`--sections sweep`; results: experiments/results/bench-<gpu>-sweep.md|json)
#   2. max-autotune against the reduce-overhead numbers already committed (bench-<gpu>-compile.md): compiled
#      Steps-DeiT-S and DeiT-S, training step and inference, interleaved
#      (results: experiments/results/bench-<gpu>-max-autotune.md|json)
#
# NOT RUN YET: the sessions that wrote it had no device. Sizes are guesses from the committed H200 runs (a
# pair's eager sections took ~50 s; compiling a pair with reduce-overhead took ~180 s).
#
#     bash experiments/configs/bench-gpu.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
timeout 240 "$PY" -m experiments.bench --device cuda --models steps_deit_s,steps_swin_t,steps_resnet50 \
    --sections sweep --budget-s 220 --tag sweep
timeout 330 "$PY" -m experiments.bench --device cuda --models steps_deit_s --sections compile --compile \
    --compile-models steps_deit_s --compile-mode max-autotune --budget-s 310 --tag max-autotune
