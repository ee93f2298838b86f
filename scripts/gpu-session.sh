#!/usr/bin/env bash
# Every GPU check and figure of the docs in one call (about 9 minutes on an H100/H200):
#
#   scripts/gpu-session.sh OUT_DIR [TIME_LIMIT_S]
#
# Needs a CUDA GPU, hydra-core/omegaconf importable, and MNIST: data/MNIST/raw, or the four gzipped IDX files in
# .mnist-gz/ (unpacked here). Stages, each with its own time limit so that one that hangs cannot starve the rest:
#   1. whole-process times of `python train.py` (the default auto modes, compile=true with a cold and a warm
#      Inductor cache, eager), alone on the GPU;
#   2. the estimator tables, several runs at a time: the paper's protocol (experiment=paper: 20x10, static
#      binarization, learned prior, 100 epochs, IW bound k=1000) for every estimator, seeds 0-2, and the
#      ReinMax paper's protocol (30x10, grayscale, batch 100, 160 epochs) for reinmax, st_gumbel and gumbel_rao;
#   3. `pytest -m gpu`, beside stage 2.
# Writes OUT_DIR/gpu.txt, times.txt, pytest.log, and runs.tar.gz (each run's metrics.json, train.log and its test
# curves exported from the TensorBoard events by scripts/export_runs.py, not the checkpoints or images).
set -u
out=${1:?usage: scripts/gpu-session.sh OUT_DIR [TIME_LIMIT_S]}
limit=${2:-560}
start=$SECONDS
deadline=$(( $(date +%s) + limit ))
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
runs=${RUNS_DIR:-/tmp/gpu-runs}
EXTRA=${EXTRA:-}   # overrides added to every train.py run (a dry run on a CPU: EXTRA="debug=tiny data.root=...")
mkdir -p "$runs" data/MNIST/raw
left() { echo $(( deadline - $(date +%s) )); }

for f in .mnist-gz/*.gz; do
  [ -e "$f" ] && [ ! -e "data/MNIST/raw/$(basename "$f" .gz)" ] && gunzip -c "$f" > "data/MNIST/raw/$(basename "$f" .gz)"
done
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import torch, torchvision, hydra; print('torch', torch.__version__, 'cuda', torch.version.cuda,
          'torchvision', torchvision.__version__, 'hydra', hydra.__version__)"
  echo "cpus: $(nproc)"; grep -m1 "model name" /proc/cpuinfo; date -u; } > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

echo "== 1. whole-process time of python train.py (launch to exit), alone on the GPU" | tee "$out/times.txt"
timed() {  # timed NAME OVERRIDES... : wall time of one whole train.py process
  local name=$1; shift
  local t0=$SECONDS; local s0; s0=$(date +%s.%N)
  timeout 150 $py train.py hydra.run.dir="$runs/time-$name" "$@" $EXTRA > "$runs/time-$name.log" 2>&1
  local rc=$?
  local s1; s1=$(date +%s.%N)
  printf "%-28s exit %s  %6.1f s  | %s\n" "$name" "$rc" "$(awk "BEGIN {print $s1 - $s0}")" \
    "$(grep -Eo 'compile=[A-Za-z]+ cuda_graph=[A-Za-z]+|compiled/captured in [0-9.]+ s|done: test loss [0-9.]+' \
       "$runs/time-$name.log" | paste -sd ';')" | tee -a "$out/times.txt"
}
export TORCHINDUCTOR_CACHE_DIR=$runs/inductor-cache TRITON_CACHE_DIR=$runs/triton-cache
rm -rf "$TORCHINDUCTOR_CACHE_DIR" "$TRITON_CACHE_DIR"
timed default-cold                       # auto: CUDA graph only for a 6,000-step run
timed compile-cold compile=true cuda_graph=true
timed compile-warm compile=true cuda_graph=true
timed default-warm
timed eager compile=false cuda_graph=false
grep -h "epoch 10/10\|epoch 1/10" "$runs"/time-*.log | sed 's/^.*\] - //' >> "$out/times.txt"

echo "== 2. estimator tables (background), 3. pytest -m gpu"
(timeout $(( $(left) - 25 )) $py -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py > "$out/pytest.log" 2>&1
 echo "pytest exit $?" >> "$out/pytest.log") &
pytest_pid=$!
jobs_file=$runs/jobs.txt
: > "$jobs_file"
for est in reinmax st_gumbel gumbel_rao; do   # the ReinMax paper's protocol first: one run each
  echo "reinmax-$est estimator=$est epochs=160 seed=0" >> "$jobs_file"
done
for seed in 0 1 2; do
  for est in gumbel st_gumbel st annealed_st sf rloo muprop gumbel_rao reinmax; do
    echo "paper-$est-s$seed experiment=paper estimator=$est seed=$seed eval.iw_samples=1000" >> "$jobs_file"
  done
done
run_job() {  # run_job NAME OVERRIDES...: compile + CUDA graph; if that fails, eager (and say so)
  local name=$1; shift
  timeout "$(left)" $py train.py hydra.run.dir="$runs/$name" compile=true cuda_graph=true "$@" $EXTRA \
    > "$runs/$name.log" 2>&1 && return
  grep -q "done:" "$runs/$name.log" && return
  echo "RETRY eager: $name" >> "$runs/retries.txt"
  timeout "$(left)" $py train.py hydra.run.dir="$runs/$name-eager" compile=false cuda_graph=false "$@" $EXTRA \
    > "$runs/$name-eager.log" 2>&1
}
export -f run_job left
export py runs deadline EXTRA
parallel_jobs=${PARALLEL:-8}
timeout $(( $(left) - 20 )) xargs -P "$parallel_jobs" -L 1 bash -c 'run_job "$@"' _ < "$jobs_file"
echo "tables: exit $? at $((SECONDS - start)) s"
wait $pytest_pid
tail -n 5 "$out/pytest.log"
$py scripts/export_runs.py "$runs" "$out/runs.json" || true
tar czf "$out/runs.tar.gz" -C "$runs" --exclude='*.pt' --exclude='events.*' --exclude='inductor-cache' \
  --exclude='triton-cache' . 2>/dev/null
ls -la "$out"
echo "total $((SECONDS - start)) s"
