#!/usr/bin/env bash
# Bit-identity check against a reference commit: the same command must give the same test losses and the same
# weights, bit for bit, on the same machine.
#
#   scripts/compare-with-reference.sh [REF=d1ad28c] [extra overrides...]
#
# Runs `python train.py epochs=2 seed=0 threads=1` (soft samples) and the same with `hard=true`, at REF (in a
# temporary git worktree) and at the working tree, with data.val_size=0 here (REF predates the validation split and
# trained on all 60,000 images). Compares metrics.json's test losses and every tensor of checkpoints/last.pt's
# weights.
# Needs the MNIST files in data/ (`python -m vae.data`). About 2 minutes per run on one core.
set -euo pipefail
cd "$(dirname "$0")/.."
REF=${1:-d1ad28c}
shift || true
PY=${PYTHON:-.venv/bin/python}
OUT=$(mktemp -d)
trap 'git worktree remove --force "$OUT/ref" >/dev/null 2>&1 || true; rm -rf "$OUT"' EXIT
git worktree add --detach -q "$OUT/ref" "$REF"
ln -s "$PWD/data/MNIST" "$OUT/ref/data/MNIST"

status=0
for variant in soft hard; do
  extra=(); [ "$variant" = hard ] && extra=(hard=true)
  (cd "$OUT/ref" && OMP_NUM_THREADS=1 "$OLDPWD/$PY" train.py epochs=2 seed=0 threads=1 "${extra[@]}" "$@" \
     hydra.run.dir="$OUT/ref-$variant" >"$OUT/ref-$variant.log" 2>&1)
  OMP_NUM_THREADS=1 "$PY" train.py epochs=2 seed=0 threads=1 data.val_size=0 "${extra[@]}" "$@" \
     hydra.run.dir="$OUT/new-$variant" >"$OUT/new-$variant.log" 2>&1
  "$PY" - "$OUT/ref-$variant" "$OUT/new-$variant" "$variant" <<'EOF' || status=1
import json, sys, torch
ref, new, variant = sys.argv[1:]
a, b = (json.load(open(f"{d}/metrics.json")) for d in (ref, new))
same = {k: a[k] == b[k] for k in ("test_loss", "test_elbo_discrete", "step", "tau")}
wa, wb = (torch.load(f"{d}/checkpoints/last.pt", weights_only=True)["model"] for d in (ref, new))
same["weights"] = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
print(f"{variant}: test loss {a['test_loss']!r} (ref) vs {b['test_loss']!r} (now); "
      + ", ".join(f"{k} {'identical' if v else 'DIFFERENT'}" for k, v in same.items()))
sys.exit(0 if all(same.values()) else 1)
EOF
done
[ "$status" = 0 ] && echo "bit-identical to $REF" || echo "NOT identical to $REF"
exit "$status"
