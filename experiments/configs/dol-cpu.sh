#!/usr/bin/env bash
# The CPU config of `probe study dol` (issue 14): Steps-DeiT-micro vs DeiT-micro, 3 seeds, on Fashion-MNIST
# (all 10000 test images; 5000-image training subsets, 2 epochs: a 2-core budget, not convergence) and on the
# generated `hierarchy` dataset. The two studies run side by side, one torch thread each (about an hour on
# 2 shared cores); reports land in experiments/results/dol-cpu-<dataset>/ and in each parent MLflow run.
#
#     bash experiments/configs/dol-cpu.sh            # from the repository root
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_WAIT_POLICY=PASSIVE
COMMON=(--seeds 0,1,2 --epochs 2 --train-limit 5000 --test-limit 10000 --probe-pool 4000 --n-probe 2000 --fits 3
        --batch-size 64 --lr 1.5e-3 --random-splits 3 --block-stride 2 --attr-limit 100 --ig-steps 8
        --planted-thetas 0,0.02,0.05,0.1,0.2 --planted-theta 0.2 --planted-reps 4 --threads 1)
pids=()
for ds in fashion_mnist hierarchy; do
  out=experiments/results/dol-cpu-$ds
  mkdir -p "$out"
  cmd=(.venv/bin/probe study dol --model steps_deit_micro --dataset "$ds" "${COMMON[@]}" --report-dir "$out")
  echo "${cmd[*]}" > "$out/command.txt"
  "${cmd[@]}" > "$out/stdout.txt" 2> "$out/stderr.log" &
  pids+=($!)
  sleep 30  # the first process creates a new MLflow store; two creating it at once collide in SQLite
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
