#!/usr/bin/env bash
# The GPU checks and figures of the README's "Speed" section in one run (about 6 minutes on an H100/H200):
#
#   scripts/gpu-figures.sh OUT_DIR
#
# Needs a CUDA GPU and MNIST under data/MNIST/raw (`python -m vae.data`). Writes to OUT_DIR: gpu.txt (device and
# versions), bench.log and bench-gpu.json (`python -m vae.bench`, every mode and the textbook baseline),
# bench-adam-fused.log (the compiled rows with the fused Adam kernel), train.log (train.py's default 10 epochs:
# three seeds, and one eager run), pytest.log (`pytest -m gpu`) and profile.log (the eager and compiled steps'
# CUDA kernels). Each stage has its own time limit, so one that hangs cannot starve the others.
set -u
out=${1:?usage: scripts/gpu-figures.sh OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
runs=$(mktemp -d)

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $py -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda,
          'torchvision', torchvision.__version__)"
  echo "cpus: $(nproc)"; grep -m1 "model name" /proc/cpuinfo; } > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

echo "== python -m vae.bench device=cuda"
timeout 170 $py -m vae.bench device=cuda 'modes=[eager,compile,cuda_graph,compile+cuda_graph]' \
  out="$out/bench-gpu.json" > "$out/bench.log" 2>&1
echo "exit $?"; grep -v "^\[" "$out/bench.log" | tail -n 25
echo "== the same with the fused Adam kernel instead of the compiled foreach Adam (adam=fused)"
timeout 100 $py -m vae.bench device=cuda 'modes=[compile,compile+cuda_graph]' adam=fused baseline=false \
  out=null > "$out/bench-adam-fused.log" 2>&1
echo "exit $?"; grep "^| " "$out/bench-adam-fused.log"

echo "== python train.py device=cuda (defaults: 10 epochs, batch 100; compile + CUDA graph): seed 0 alone, timed;"
echo "   seeds 1 and 2 side by side (test loss only); seed 0 eager (compile=false cuda_graph=false)"
train() {  # train RUN_NAME OVERRIDES...
  local name=$1; shift
  timeout 100 $py train.py device=cuda hydra.run.dir="$runs/$name" "$@" > "$runs/$name.log" 2>&1
  echo "--- python train.py device=cuda $* : exit $?" >> "$out/train.log"
  cat "$runs/$name.log" >> "$out/train.log"
}
train seed0 seed=0
train seed1 seed=1 & train seed2 seed=2 & wait
train seed0-eager seed=0 compile=false cuda_graph=false
grep -E "^---|compiled/captured|epoch (1|10)/10|done:|rror|WARN" "$out/train.log"

echo "== pytest -m gpu"
timeout 200 $py -m pytest -m gpu -q -p no:cacheprovider tests/ > "$out/pytest.log" 2>&1
echo "exit $?"; tail -n 15 "$out/pytest.log"

echo "== profile of the eager and compiled steps"
timeout 80 $py -m vae.bench device=cuda "modes=[eager,compile]" baseline=false profile=true profile_rows=25 steps=50 \
  warmup_steps=5 rounds=1 out=null > "$out/profile.log" 2>&1
echo "exit $?"
