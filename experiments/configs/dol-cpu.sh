#!/usr/bin/env bash
# The CPU config of `probe study dol` (issue 14): a micro pair (default Steps-DeiT-micro vs DeiT-micro; also
# steps_resnet_micro, steps_swin_micro), 3 seeds, on Fashion-MNIST
# (all 10000 test images; 2000-image training subsets, 2 epochs: a budget for 2 shared cores, far from
# convergence) and on the generated `hierarchy` dataset (4000 test images). Coarse and fine levels, final and
# merge sites, every third block; no detail level (the GPU config has it). The two studies run side by side,
# one torch thread each (on 2 cores shared with other work: the ResNet pair 7 minutes, Swin 17, DeiT about an
# hour); reports land in
# experiments/results/dol-cpu-<dataset>-<model>/ (Steps-DeiT-micro's, which predate the model argument:
# dol-cpu-<dataset>/) and in each parent MLflow run. The planted model trains --planted-epochs (4: about 250
# steps; at the 125 steps of the other models it is barely planted).
#
#     bash experiments/configs/dol-cpu.sh [MODEL]    # from the repository root
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_WAIT_POLICY=PASSIVE
COMMON=(--seeds 0,1,2 --epochs 2 --train-limit 2000 --probe-pool 3000 --n-probe 1500 --fits 2
        --batch-size 32 --lr 1.5e-3 --random-splits 2 --no-detail --block-stride 3 --attr-limit 64 --ig-steps 8
        --planted-thetas 0,0.05,0.1,0.2 --planted-theta 0.2 --planted-reps 3 --threads 1)
model=${1:-steps_deit_micro}
# Steps-DeiT-micro's committed runs used the recipe's default planted epochs (= --epochs); keep them reusable.
[ "$model" = steps_deit_micro ] || COMMON+=(--planted-epochs 4)
pids=()
for ds in fashion_mnist hierarchy; do
  out=experiments/results/dol-cpu-$ds-$model
  [ "$model" = steps_deit_micro ] && out=experiments/results/dol-cpu-$ds
  mkdir -p "$out"
  test=10000; [ "$ds" = hierarchy ] && test=4000
  cmd=(.venv/bin/probe study dol --model "$model" --dataset "$ds" --test-limit $test "${COMMON[@]}"
       --report-dir "$out")
  echo "${cmd[*]}" > "$out/command.txt"
  "${cmd[@]}" > "$out/stdout.txt" 2> "$out/stderr.log" &
  pids+=($!)
  sleep 30  # the first process creates a new MLflow store; two creating it at once collide in SQLite
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
