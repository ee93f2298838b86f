#!/usr/bin/env bash
# Copy a study's aggregate (results.json, results.md, figures) and each finished cell's metrics.json and train.log
# into docs/results/NAME/, where the docs' tables are checked against it (tests/project/test_docs.py).
#
#   scripts/publish-study.sh outputs/studies/reinmax reinmax-10x30-cpu
set -euo pipefail
src=${1:?usage: scripts/publish-study.sh STUDY_DIR NAME}
dest="$(dirname "$0")/../docs/results/${2:?usage: scripts/publish-study.sh STUDY_DIR NAME}"
mkdir -p "$dest"
cp "$src/results.json" "$src/results.md" "$dest/"
cp "$src"/*.png "$dest/" 2>/dev/null || true
( cd "$src" && find . -name metrics.json ) | while read -r f; do  # finished cells only
  d=$(dirname "$f")
  mkdir -p "$dest/runs/$d"
  cp "$src/$d/metrics.json" "$src/$d/train.log" "$dest/runs/$d/"
done
echo "published $src -> $dest"
