#!/usr/bin/env bash
# Every GPU check and figure of the docs in one call (about 9 minutes on an H100/H200):
#
#   scripts/gpu-session.sh OUT_DIR [TIME_LIMIT_S]
#
# Needs a CUDA GPU, hydra-core/omegaconf importable, and MNIST: data/MNIST/raw, or the four gzipped IDX files in
# .mnist-gz/ (unpacked here). Stages, each with its own time limit so that one that hangs cannot starve the rest:
#   1. whole-process times of `python train.py` (the default auto modes, compile=true with a cold and a warm
#      Inductor cache, eager), alone on the GPU;
#   2. the estimator tables with `python -m vae.study`, 8 cells at a time: the ReinMax protocol (experiment=reinmax,
#      160 epochs) at 10x30, 8x4, 4x24 and 64x8 for reinmax, st_gumbel, gumbel_rao and gumbel, seeds 0-2; the paper's
#      protocol (experiment=paper: 20x10, static binarization, learned prior, 100 epochs, IW bound k=1000) for every
#      estimator, seeds 0-2;
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
EXTRA=${EXTRA:-}   # overrides added to the timed train.py runs (a dry run on a CPU: EXTRA="debug=tiny data.root=...")
EXTRA_LIST=${EXTRA_LIST:-}  # the same for the study cells, as ',"key=value",...' (a dry run: ',"debug=tiny"')
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
(timeout $(( $(left) - 25 )) $py -m pytest -m gpu -q -p no:cacheprovider tests/ > "$out/pytest.log" 2>&1
 echo "pytest exit $?" >> "$out/pytest.log") &
pytest_pid=$!
# The tables through the study runner (python -m vae.study): one stable directory per cell, so a call cut short by
# its time limit is finished by the next call with the same command; results.json/.md and figures per protocol.
study() {  # study NAME EXTRA ARGS...: one grid, 8 cells at a time, compile + CUDA graph, EXTRA more overrides
  timeout "$(left)" $py -m vae.study dir="$runs/$1" jobs="${PARALLEL:-8}" threads=null "${@:3}" \
    "extra=[\"device=cuda\",\"compile=true\",\"cuda_graph=true\"$2${EXTRA_LIST:-}]" > "$runs/$1.log" 2>&1
  echo "$1: exit $? at $((SECONDS - start)) s"
}
study reinmax "" preset=reinmax "shapes=[10x30,8x4,4x24,64x8]" \
  "estimators=[reinmax,st_gumbel,gumbel_rao,gumbel]" "seeds=[0,1,2]"
study paper ',"eval.iw_samples=1000"' preset=paper \
  "estimators=[gumbel,st_gumbel,st,annealed_st,sf,rloo,muprop,gumbel_rao,reinmax]" "seeds=[0,1,2]"
wait $pytest_pid
tail -n 5 "$out/pytest.log"
for t in reinmax paper; do cp "$runs/$t/results.json" "$out/$t-results.json" 2>/dev/null
  cp "$runs/$t/results.md" "$out/$t-results.md" 2>/dev/null; cp "$runs/$t"/*.png "$out/" 2>/dev/null; done
tar czf "$out/runs.tar.gz" -C "$runs" --exclude='*.pt' --exclude='events.*' --exclude='inductor-cache' \
  --exclude='triton-cache' . 2>/dev/null
ls -la "$out"
echo "total $((SECONDS - start)) s"
