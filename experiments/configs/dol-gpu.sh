#!/usr/bin/env bash
# The GPU config of `probe study dol` (issue 14): Steps-DeiT-T and -S against DeiT-T and -S, 3 seeds, trained
# to convergence, at 28 px (Fashion-MNIST, all 60000 / 10000 images, patch 4: 7x7 tokens) and at 64 px (the
# generated `hierarchy` dataset, 24000 / 10000 images, patch 8: 8x8 tokens). Everything the CPU config drops is
# on: the detail level, every block, 5 random matched splits, 5 probe fits per seed, 500 attributed images, a
# finer power curve with 20 simulated studies per strength.
#
# NOT RUN YET: the session that wrote it had no GPU. Estimate on one H200 (from the bench's compiled
# Steps-DeiT-S rate, ~6300 img/s): training dominates, 4 studies x 3 seeds x 3 models x 30 epochs x 60000 images
# (hierarchy: 24000) ~ 2-3 hours; probes run on the GPU (torch backend) and take minutes per study. Each study
# is one MLflow parent run; a re-run resumes from the finished children, so it can be split over sessions.
#
#     bash experiments/configs/dol-gpu.sh [steps_deit_t|steps_deit_s ...]    # default: both
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_WAIT_POLICY=PASSIVE
models=("${@:-steps_deit_t steps_deit_s}")
COMMON=(--seeds 0,1,2 --epochs 30 --batch-size 256 --lr 1e-3 --probe-pool 10000 --n-probe 5000 --fits 5
        --random-splits 5 --detail --merge --block-stride 1 --attr-limit 500 --ig-steps 32
        --planted-thetas 0,0.01,0.02,0.05,0.1,0.2 --planted-theta 0.1 --planted-reps 20 --device cuda --threads 0)
for model in ${models[*]}; do
  for setting in "fashion_mnist 60000 10000 patch_size=4 -" "hierarchy 24000 10000 patch_size=8 img_size=64"; do
    read -r ds train test mopt dopt <<< "$setting"
    out=experiments/results/dol-gpu-$model-$ds
    mkdir -p "$out"
    cmd=(.venv/bin/probe study dol --model "$model" --dataset "$ds" --train-limit "$train" --test-limit "$test"
         --model-options "$mopt" "${COMMON[@]}" --report-dir "$out")
    [ "$dopt" != - ] && cmd+=(--data-options "$dopt")
    echo "${cmd[*]}" > "$out/command.txt"
    "${cmd[@]}" > "$out/stdout.txt" 2> "$out/stderr.log"
  done
done
