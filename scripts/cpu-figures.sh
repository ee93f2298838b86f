#!/usr/bin/env bash
# The CPU figures of the docs in one run (about 12 minutes on 2 cores; run it on a quiet machine):
#
#   scripts/cpu-figures.sh OUT_DIR
#
# 1. start-up: `python -c "import torch"` against `python train.py epochs=0`, three of each, the minimum counts;
# 2. `python train.py epochs=3 threads=1`: the training time of each epoch (does a later epoch slow down?);
# 3. the whole default command, `python train.py` (10 epochs, start-up and test passes included), against the
#    textbook port's 10 epochs as a whole process (`python -m vae.baseline epochs=10`), one after the other;
# 4. `python -m vae.bench modes=[eager]`: three epochs per row, round-robin, with the baseline.
# Writes OUT_DIR/cpu-figures.txt (the summary), the runs' logs and bench-cpu.json.
set -u
out=${1:?usage: scripts/cpu-figures.sh OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
sum=$out/cpu-figures.txt
wall() {  # wall NAME CMD...: seconds from launch to exit, appended to the summary
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local t1; t1=$(date +%s.%N)
  printf "%-22s exit %s  %7.2f s   %s\n" "$name" "$rc" "$(awk "BEGIN {print $t1 - $t0}")" "$*" | tee -a "$sum"
}
{ date -u; grep -m1 "model name" /proc/cpuinfo; echo "cpus: $(nproc)"; uptime
  $py -c "import torch; print('torch', torch.__version__)"; git rev-parse --short HEAD; } | tee "$sum"

echo "== 1. start-up" | tee -a "$sum"
for i in 1 2 3; do
  wall "import-torch-$i" $py -c "import torch"
  wall "epochs0-$i" $py train.py epochs=0 hydra.run.dir="$out/epochs0-$i"
done

echo "== 2. epochs=3 threads=1" | tee -a "$sum"
wall epochs3-threads1 $py train.py epochs=3 threads=1 hydra.run.dir="$out/epochs3"
grep -h "epoch [0-9]/3" "$out/epochs3/train.log" | sed 's/^.*\] - //' | tee -a "$sum"

echo "== 3. the whole default command against the textbook loop, whole process against whole process" | tee -a "$sum"
wall default-command $py train.py hydra.run.dir="$out/default"
grep -h "epoch\|done:" "$out/default/train.log" | sed 's/^.*\] - //' | tee -a "$sum"
wall baseline-10-epochs $py -m vae.baseline epochs=10
grep -h "baseline epoch" "$out/baseline-10-epochs.log" | sed 's/^.*\] - //' | tee -a "$sum"

echo "== 4. python -m vae.bench" | tee -a "$sum"
wall bench $py -m vae.bench "modes=[eager]" out="$out/bench-cpu.json"
grep "^|\|epochs of training" "$out/bench.log" | tee -a "$sum"
uptime | tee -a "$sum"
