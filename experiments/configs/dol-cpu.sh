#!/usr/bin/env bash
# The CPU config of `probe study dol` (issue 14): Steps-DeiT-micro vs DeiT-micro, 3 seeds, on Fashion-MNIST
# (all 10000 test images; 2000-image training subsets, 2 epochs: a budget for 2 shared cores, far from
# convergence) and on the generated `hierarchy` dataset (4000 test images). Coarse and fine levels, final and
# merge sites, every third block; no detail level (the GPU config has it). The two studies run side by side,
# one torch thread each (about an hour on 2 cores shared with other work); reports land in
# experiments/results/dol-cpu-<dataset>/ and in each parent MLflow run.
#
#     bash experiments/configs/dol-cpu.sh            # from the repository root
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_WAIT_POLICY=PASSIVE
COMMON=(--seeds 0,1,2 --epochs 2 --train-limit 2000 --probe-pool 3000 --n-probe 1500 --fits 2
        --batch-size 32 --lr 1.5e-3 --random-splits 2 --no-detail --block-stride 3 --attr-limit 64 --ig-steps 8
        --planted-thetas 0,0.05,0.1,0.2 --planted-theta 0.2 --planted-reps 3 --threads 1)
pids=()
for ds in fashion_mnist hierarchy; do
  out=experiments/results/dol-cpu-$ds
  mkdir -p "$out"
  test=10000; [ "$ds" = hierarchy ] && test=4000
  cmd=(.venv/bin/probe study dol --model steps_deit_micro --dataset "$ds" --test-limit $test "${COMMON[@]}"
       --report-dir "$out")
  echo "${cmd[*]}" > "$out/command.txt"
  "${cmd[@]}" > "$out/stdout.txt" 2> "$out/stderr.log" &
  pids+=($!)
  sleep 30  # the first process creates a new MLflow store; two creating it at once collide in SQLite
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
