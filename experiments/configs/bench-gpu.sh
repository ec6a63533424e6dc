#!/usr/bin/env bash
# Issue 15's GPU checks in one device call (under 10 minutes on one H100/H200; each part has its own timeout and
# the bench rewrites its results after every section, so a part cut short keeps what it measured):
#   1. fused window attention for Swin (`--fused-window-attn`: timm's scaled_dot_product_attention path in both
#      models), Swin-T pair, eager, beside the same run without it (results: bench-<gpu>-swin-fused|swin-plain)
#   2. the batch-size sweep, eager, with peak-memory ratios: DeiT-S, Swin-T, ResNet-50 pairs at batch 64-512
#      (`--sections sweep`; results: bench-<gpu>-sweep)
#   3. max-autotune, compiled Steps-DeiT-S and DeiT-S, training step and inference, interleaved, against the
#      reduce-overhead run already committed (bench-nvidia-h200-compile; results: bench-<gpu>-max-autotune)
# Results go to experiments/results/ as .md and .json.
#
# NOT RUN YET: the sessions that wrote it had no device. Sizes are guesses from the committed H200 runs (a
# pair's eager sections took ~50 s; compiling a pair with reduce-overhead ~180 s).
#
#     bash experiments/configs/bench-gpu.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
for fused in "--fused-window-attn swin-fused" "--no-fused-window-attn swin-plain"; do
  read -r flag tag <<< "$fused"
  timeout 75 "$PY" -m experiments.bench --device cuda --models steps_swin_t --sections throughput "$flag" \
      --budget-s 60 --tag "$tag"
done
timeout 200 "$PY" -m experiments.bench --device cuda --models steps_deit_s,steps_swin_t,steps_resnet50 \
    --sections sweep --budget-s 185 --tag sweep
timeout 240 "$PY" -m experiments.bench --device cuda --models steps_deit_s --sections compile --compile \
    --compile-models steps_deit_s --compile-mode max-autotune --budget-s 225 --tag max-autotune
