#!/usr/bin/env bash
# train.py's other paths on a CUDA GPU, in its default mode (compile + CUDA graph), and the seed spread of the
# default run with and without TF32 (about 3 minutes on an H100):
#
#   scripts/gpu-variants.sh OUT_DIR
#
# Needs a CUDA GPU and MNIST under data/MNIST/raw. Writes to OUT_DIR: variants.log (hard=true, prior=learned,
# data.binarize=dynamic; a run resumed at an epoch boundary against the same run uninterrupted; the evaluation
# command) and seeds.tsv (seed, tf32, final test loss). Timings are not taken here: runs share the GPU.
set -u
out=${1:?usage: scripts/gpu-variants.sh OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
dev=${DEVICE:-cuda}   # DEVICE=cpu EXTRA="data.root=... batch_size=50" try the script's plumbing on tiny data
extra=${EXTRA:-}
runs=$(mktemp -d)
log="$out/variants.log"

train() {  # train RUN_NAME OVERRIDES...  (its log goes to $runs/RUN_NAME.log)
  local name=$1; shift
  # shellcheck disable=SC2086  # $extra: several overrides
  timeout 150 $py train.py device="$dev" hydra.run.dir="$runs/$name" $extra "$@" > "$runs/$name.log" 2>&1
  echo "--- python train.py device=$dev $*: exit $?" >> "$log"
  grep -E "compiled/captured|epoch [0-9]+/|done:|rror|WARN|resumed" "$runs/$name.log" >> "$log"
}

echo "== seed 0 first (fills the compile cache for the runs side by side)"
train s0-tf32 seed=0
echo "== the other paths, side by side"
train hard epochs=2 hard=true &
train learned epochs=2 prior=learned &
train dynamic epochs=2 data.binarize=dynamic &
train straight epochs=3 seed=5 &
train part epochs=1 seed=5 &
wait
train part-resumed epochs=3 resume="$runs/part/checkpoints/last.pt"
$py - "$runs/straight/checkpoints/last.pt" "$runs/part/checkpoints/last.pt" >> "$log" 2>&1 <<'PY'
import sys, torch
a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in sys.argv[1:])
same = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
print(f"resumed at epoch 1 vs uninterrupted, after {a['step']} and {b['step']} steps: bitwise identical "
      f"parameters: {same}; test loss {a['test_loss']:.4f} vs {b['test_loss']:.4f}")
PY
timeout 100 $py -m vae.evaluate checkpoint="$runs/s0-tf32/checkpoints/last.pt" iw_samples=100 device="$dev" \
  >> "$log" 2>&1
echo "--- python -m vae.evaluate ... iw_samples=100 device=$dev: exit $?" >> "$log"

echo "== seeds 0-4 with and without TF32, side by side"
for seed in 1 2 3 4; do train s$seed-tf32 seed=$seed & done
for seed in 0 1 2 3 4; do train s$seed-fp32 seed=$seed tf32=false & done
wait
printf "seed\ttf32\ttest_loss\n" > "$out/seeds.tsv"
for seed in 0 1 2 3 4; do for t in tf32 fp32; do
  printf "%s\t%s\t%s\n" $seed $t "$($py -c "import json,sys; print(json.load(open(sys.argv[1]))['test_loss'])" \
    "$runs/s$seed-$t/metrics.json" 2>/dev/null)" >> "$out/seeds.tsv"
done; done
cat "$log" | grep -E "^---|bitwise|iw|done:|rror"
cat "$out/seeds.tsv"
