#!/usr/bin/env bash
# The estimator tables' shortened CPU protocol: every estimator side by side, one thread each.
#
#   scripts/cpu-estimator-tables.sh RUNS_DIR [EPOCHS=20] [PARALLEL=2]
#
# Paper protocol, shortened (Jang et al. 2017 Table 1 setting: experiment=paper, i.e. 20 x 10 latents, static
# binarization, learned prior, then the IW bound with k=1000 on the test set), EPOCHS epochs instead of 100, seed 0,
# for every estimator but exact (10^20 codes); and the ReinMax paper's protocol (our default 30 x 10 model on
# grayscale MNIST, batch 100), EPOCHS epochs instead of 160, for reinmax, st_gumbel and gumbel_rao. Each run is
# `python train.py ... threads=1` in its own directory; scripts/export_runs.py then collects them into
# RUNS_DIR/runs.json, which scripts/estimator_tables.py turns into the docs' tables and figure.
set -u
runs=${1:?usage: scripts/cpu-estimator-tables.sh RUNS_DIR [EPOCHS] [PARALLEL]}
epochs=${2:-20}
parallel=${3:-2}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$runs"
jobs=$runs/jobs.txt
: > "$jobs"
for est in gumbel st_gumbel st annealed_st sf rloo muprop gumbel_rao reinmax; do
  echo "paper-$est experiment=paper estimator=$est epochs=$epochs eval.iw_samples=1000" >> "$jobs"
done
for est in reinmax st_gumbel gumbel_rao; do
  echo "reinmax-$est estimator=$est epochs=$epochs" >> "$jobs"
done
run_job() {
  local name=$1; shift
  [ -f "$runs/$name/metrics.json" ] && return   # done in an earlier call: rerunning the script resumes the set
  OMP_NUM_THREADS=1 $py train.py hydra.run.dir="$runs/$name" threads=1 device=cpu "$@" > "$runs/$name.log" 2>&1
  echo "$name: exit $? ($(date -u +%H:%M:%S))"
}
export -f run_job
export py runs
xargs -P "$parallel" -L 1 bash -c 'run_job "$@"' _ < "$jobs"
$py scripts/export_runs.py "$runs" "$runs/runs.json"
