#!/usr/bin/env bash
# Build the Docker image and run it for real on this machine's Docker engine (CPU only):
#
#   scripts/docker-smoke.sh
#
# Checks, each reported as PASS or FAIL: the image builds; one epoch trains as the image's own non-root user
# (uid 1000) from a tiny MNIST-format dataset mounted read-only, leaving a checkpoint, TensorBoard events and
# metrics.json in a writable outputs mount; a longer run stopped with `docker stop -t 60` exits 143 with a last.pt
# that resumes; compile=true puts Inductor's cache in the outputs mount, where a second container finds it;
# TensorBoard started from the same image answers on 127.0.0.1. Exits 1 if a check failed, and 0 with a
# "skipped: <reason>" line when no Docker engine can run here (it starts dockerd itself when run as root, and stops
# it again at the end). docs/docker.md has the times it takes.
#
# The base image: the Dockerfile's own (its BASE_IMAGE default) when the engine has it or can pull it. Where Docker
# Hub is out of reach, a stand-in with the same Python layout is built once and kept as an image: a Debian rootfs
# (debootstrap, needs root) with torch, torchvision and numpy in /opt/conda, fetched with this machine's own pip
# settings (so local wheel files are reused), and this machine's own certificate authorities. The stand-in's tag is a
# hash of its recipe; a new recipe replaces it.
#
# Environment: SMOKE_BASE=<image> builds on that base instead; SMOKE_CACHE_DIR (default ~/.cache/gumbel-vae-smoke)
# keeps the Debian rootfs tarball, so that a lost stand-in image is rebuilt without debootstrap; SMOKE_KEEP=1 keeps
# the work directory (data, outputs, logs); PYTHON is the host Python whose pip fetches the stand-in's wheels;
# SMOKE_DEBIAN_MIRROR is the Debian mirror for debootstrap (default: its own).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

IMAGE=gumbel-vae:smoke
CACHE=${SMOKE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gumbel-vae-smoke}
NAME=gvae-smoke-$$
# What the stand-in holds: the versions of requirements.txt, Debian's Python 3.11 (cp311 wheels) with its headers (the
# real base's Python has them: Inductor needs Python.h for compile=true on the CPU).
SUITE=bookworm
MIRROR=${SMOKE_DEBIAN_MIRROR:-}  # empty: debootstrap's default mirror
DEBS=python3,python3-venv,python3-dev,ca-certificates
STANDIN_PINS="torch==2.14.1 torchvision==0.29.1 numpy==2.4.6"
# Small and quick: 12 steps per epoch, no importance-weighted bound, one thread (the machine may be shared).
TRAIN_ARGS=(hard=true latent_dim=4 batch_size=50 eval.batch_size=50 eval.iw_samples=0 data.verify=false data.val_size=0 threads=1)

t0=$SECONDS
passed=0
failed=0
started_engine=""
work=""

say() { printf '%s\n' "$*"; }
pass() { passed=$((passed + 1)); say "PASS  $1"; }
fail() { failed=$((failed + 1)); say "FAIL  $1${2:+: $2}"; }
check() {  # check NAME COMMAND...: PASS when the command succeeds
  local name=$1
  shift
  if "$@"; then pass "$name"; else fail "$name"; fi
}
skip() { say "skipped: $1"; exit 0; }
elapsed() { echo "$((SECONDS - t0)) s"; }

cleanup() {
  docker rm -f "$NAME-long" "$NAME-tb" >/dev/null 2>&1
  if [ -n "$work" ] && [ -d "$work" ]; then
    if [ "${SMOKE_KEEP:-0}" = 1 ] || [ "$failed" != 0 ]; then
      say "kept $work (data, outputs, logs)"
    else  # the outputs belong to uid 1000: remove them as the container's root if we are not root here
      rm -rf "$work" 2>/dev/null || {
        docker run --rm --network none --user 0 -v "$work:/w" --entrypoint sh "$IMAGE" -c 'rm -rf /w/*' >/dev/null 2>&1
        rm -rf "$work"
      }
    fi
  fi
  if [ -n "$started_engine" ]; then
    kill "$started_engine" 2>/dev/null && wait "$started_engine" 2>/dev/null
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the engine ------------------------------------------------------------------------------------------------

engine_up() { timeout 20 docker info >/dev/null 2>&1; }

start_engine() {
  command -v docker >/dev/null || skip "no docker command on this machine"
  engine_up && return 0
  if [ "$(id -u)" != 0 ] || ! command -v dockerd >/dev/null; then
    skip "the Docker engine is not running and cannot be started here (needs root and dockerd)"
  fi
  mkdir -p "$CACHE"
  local opts
  # Without iptables second: some sandboxes refuse the NAT rules, and the runs here need no network.
  for opts in "" "--iptables=false"; do
    # shellcheck disable=SC2086
    dockerd $opts >"$CACHE/dockerd.log" 2>&1 &
    started_engine=$!
    for _ in $(seq 30); do
      engine_up && { say "started dockerd $opts (pid $started_engine, log $CACHE/dockerd.log)"; return 0; }
      kill -0 "$started_engine" 2>/dev/null || break
      sleep 1
    done
    kill "$started_engine" 2>/dev/null
    wait "$started_engine" 2>/dev/null
    started_engine=""
  done
  skip "dockerd does not start here: $(grep -v '^$' "$CACHE/dockerd.log" | tail -n 1)"
}

# --- the base image --------------------------------------------------------------------------------------------

host_python() {
  local py
  for py in ${PYTHON:-} .venv/bin/python python3; do
    if command -v "$py" >/dev/null && "$py" -m pip --version >/dev/null 2>&1; then echo "$py"; return 0; fi
  done
  return 1
}

build_standin() {  # build_standin TAG: a Debian rootfs with Python in /opt/conda, imported as TAG
  local tag=$1 py rootfs tarball platforms=() v
  tarball="$CACHE/debian-$SUITE-$(echo "$MIRROR $DEBS" | sha256sum | cut -c1-8).tar.gz"
  py=$(host_python) || { say "no host Python with pip to fetch the stand-in's wheels"; return 1; }
  mkdir -p "$CACHE"
  rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  if [ -f "$tarball" ]; then
    say "stand-in: Debian $SUITE from $tarball"
    tar -xzf "$tarball" -C "$rootfs" || return 1
  else
    say "stand-in: debootstrap $SUITE (about 2 minutes) ..."
    # shellcheck disable=SC2086
    debootstrap --variant=minbase --include="$DEBS" "$SUITE" "$rootfs" $MIRROR \
      >"$CACHE/debootstrap.log" 2>&1 || { say "debootstrap failed, see $CACHE/debootstrap.log"; return 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb
    tar --numeric-owner -czf "$tarball.tmp" -C "$rootfs" . && mv "$tarball.tmp" "$tarball"
  fi
  # The wheels, fetched by this machine's pip (its index and local wheel files) for the stand-in's Python and glibc.
  for v in $(seq 28 -1 5); do platforms+=(--platform "manylinux_2_${v}_x86_64"); done
  say "stand-in: pip download $STANDIN_PINS ..."
  # shellcheck disable=SC2086
  "$py" -m pip download -q --disable-pip-version-check --only-binary=:all: --implementation cp --python-version 3.11 \
      --abi cp311 "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 \
      --platform manylinux1_x86_64 -d "$rootfs/tmp/wheels" $STANDIN_PINS 2>&1 | grep -v "^WARNING: Location" >&2
  [ "${PIPESTATUS[0]}" = 0 ] || return 1
  say "stand-in: pip install into /opt/conda ..."
  # shellcheck disable=SC2086
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 chroot "$rootfs" sh -c \
      "python3 -m venv /opt/conda && /opt/conda/bin/pip install -q --no-index --find-links /tmp/wheels $STANDIN_PINS" \
      || return 1
  # This machine's own certificate authorities (a TLS-inspecting proxy, say), so that pip inside the build reaches
  # the package index as the host's pip does.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
  fi
  rm -rf "$rootfs/tmp/wheels" "$rootfs/root/.cache" "$rootfs"/var/lib/apt/lists/*
  say "stand-in: docker import $tag ..."
  tar --numeric-owner -C "$rootfs" -c . | docker import \
      --change "ENV PATH=/opt/conda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
      --change "ENV LANG=C.UTF-8" --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" \
      --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
  local rc=$?
  rm -rf "$rootfs"
  return $rc
}

pick_base() {  # sets BASE
  local real recipe tag old
  real=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)
  if [ -n "${SMOKE_BASE:-}" ]; then BASE=$SMOKE_BASE; return 0; fi
  if docker image inspect "$real" >/dev/null 2>&1 || timeout 900 docker pull -q "$real" >/dev/null 2>&1; then
    BASE=$real
    return 0
  fi
  recipe=$(printf '%s\n' "$SUITE" "$MIRROR" "$DEBS" "$STANDIN_PINS" "$(declare -f build_standin)" \
    | sha256sum | cut -c1-12)
  tag=gumbel-vae-standin:$recipe
  BASE=$tag
  if docker image inspect "$tag" >/dev/null 2>&1; then
    say "base: $real cannot be pulled here; using the stand-in $tag (cached)"
    return 0
  fi
  say "base: $real cannot be pulled here; building the stand-in $tag"
  if [ "$(id -u)" != 0 ] || ! command -v debootstrap >/dev/null; then
    skip "$real cannot be pulled and the stand-in needs root and debootstrap (apt-get install debootstrap)"
  fi
  build_standin "$tag" || return 1
  say "stand-in: built ($(elapsed))"
  for old in $(docker images --format '{{.Repository}}:{{.Tag}}' gumbel-vae-standin); do
    [ "$old" = "$tag" ] || docker image rm "$old" >/dev/null 2>&1
  done
}

# --- checks ----------------------------------------------------------------------------------------------------

in_image() {  # in_image PYTHON_CODE: run Python in the image against the outputs (read-only)
  docker run --rm --network none -v "$work/outputs:/app/outputs:ro" --entrypoint python "$IMAGE" -c "$1"
}

ckpt_epoch() {  # ckpt_epoch RUN: the epochs done in RUN's last.pt (loaded as train.py's resume loads it)
  in_image "import torch; print(torch.load('/app/outputs/$1/checkpoints/last.pt', weights_only=True)['epoch'])" \
    2>/dev/null | tail -n 1
}

metrics_epochs() {
  in_image "import json; print(json.load(open('/app/outputs/$1/metrics.json'))['epochs'])" 2>/dev/null | tail -n 1
}

train() {  # train NAME ARGS...: one training container, output to logs/NAME.log
  local name=$1
  shift
  docker run --rm --name "$NAME-$name" --network none -v "$work/data:/app/data:ro" -v "$work/outputs:/app/outputs" \
    "$IMAGE" "${TRAIN_ARGS[@]}" "$@" >"$work/logs/$name.log" 2>&1
}

start_engine
say "engine: Docker $(docker version --format '{{.Server.Version}}' 2>/dev/null)," \
  "storage $(docker info --format '{{.Driver}}' 2>/dev/null) ($(elapsed))"
# A stand-in that cannot be built (no package registry from here, say) says nothing about this project's image:
# reported and skipped, like a machine without an engine. Everything after it is a real check.
pick_base || skip "the stand-in base image could not be built here (log in $CACHE)"

# The legacy builder: it reads the local stand-in as it is and fetches nothing for the Dockerfile's syntax line.
old_id=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null)
mkdir -p "$CACHE"
if DOCKER_BUILDKIT=0 docker build --network host --build-arg "BASE_IMAGE=$BASE" -t "$IMAGE" . \
    >"$CACHE/build.log" 2>&1; then
  pass "docker build on $BASE ($(elapsed))"
else
  fail "docker build on $BASE" "$(grep -v '^ --->' "$CACHE/build.log" | tail -n 3 | tr '\n' ' ')"
  exit 1
fi
new_id=$(docker image inspect -f '{{.Id}}' "$IMAGE")
[ -n "$old_id" ] && [ "$old_id" != "$new_id" ] && docker image rm "$old_id" >/dev/null 2>&1

work=$(mktemp -d /tmp/gumbel-vae-smoke.XXXXXX)
mkdir -p "$work/data" "$work/outputs" "$work/logs"
chmod 777 "$work/outputs"  # the image's user (uid 1000) writes here, whoever we are
# A tiny dataset in the real layout, written by the image's Python with the tests' own generator.
docker run --rm --network none --user "$(id -u):$(id -g)" -v "$work/data:/data" -v "$PWD/tests/idx.py:/tmp/idx.py:ro" \
  --entrypoint python "$IMAGE" -c "import sys; sys.path.insert(0, '/tmp'); from idx import make_tiny_dataset
make_tiny_dataset('/data', n_train=600, n_test=100)" >"$work/logs/data.log" 2>&1
chmod -R a+rX "$work/data"
data_snapshot() { find "$work/data" -printf '%p %s %T@ %C@\n' | sort; }
data_before=$(data_snapshot)
data_untouched() {
  grep -q 'served by local (read-only)' "$work/logs/one.log" && [ "$(data_snapshot)" = "$data_before" ]
}
outputs_present() {
  test -s "$work/outputs/one/checkpoints/last.pt" && test -s "$work/outputs/one/metrics.json" \
    && compgen -G "$work/outputs/one/events.out.tfevents.*" >/dev/null
}

# 1. One epoch as uid 1000, data read-only.
if train one epochs=1 hydra.run.dir=/app/outputs/one; then
  pass "train one epoch (read-only data mount, --network none) ($(elapsed))"
else
  fail "train one epoch" "$(tail -n 3 "$work/logs/one.log" | tr '\n' ' ')"
fi
check "the data mount was served read-only and left as it was" data_untouched
check "outputs written by the image's user, uid 1000" \
  test "$(stat -c %u "$work/outputs/one/checkpoints/last.pt" 2>/dev/null)" = 1000
check "checkpoint, TensorBoard events and metrics.json on the host" outputs_present
check "metrics.json says 1 epoch and last.pt loads with weights_only=True" \
  test "$(metrics_epochs one)/$(ckpt_epoch one)" = "1/1"

# 2. A long run stopped mid-run by `docker stop -t 60`, then resumed (a resumed run goes on in its own directory).
docker run -d --name "$NAME-long" --network none -v "$work/data:/app/data:ro" -v "$work/outputs:/app/outputs" \
  "$IMAGE" "${TRAIN_ARGS[@]}" epochs=100000 hydra.run.dir=/app/outputs/long >/dev/null
for _ in $(seq 120); do  # until its first checkpoint, then a little more so that the stop lands mid-epoch
  [ -s "$work/outputs/long/checkpoints/last.pt" ] && break
  sleep 1
done
sleep 2
docker stop -t 60 "$NAME-long" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME-long")
docker logs "$NAME-long" >"$work/logs/long.log" 2>&1
check "docker stop -t 60 ends the run with exit 143 (got $code) ($(elapsed))" test "$code" = 143
done_epochs=$(ckpt_epoch long)
if [[ "$done_epochs" =~ ^[0-9]+$ ]]; then
  pass "last.pt saved at the stop ($done_epochs epochs done)"
  if train resume "resume=/app/outputs/long/checkpoints/last.pt" "epochs=$((done_epochs + 1))" \
      hydra.run.dir=/app/outputs/resumed && [ "$(metrics_epochs long)" = "$((done_epochs + 1))" ]; then
    pass "resume from it finishes epoch $((done_epochs + 1)) ($(elapsed))"
  else
    fail "resume from last.pt" "$(tail -n 3 "$work/logs/resume.log" | tr '\n' ' ')"
  fi
else
  fail "last.pt saved at the stop" "$(tail -n 3 "$work/logs/long.log" | tr '\n' ' ')"
fi

# 3. compile=true on the CPU, twice: Inductor's cache goes to the outputs mount and a new container reuses it.
compile_seconds() {  # what train.py logs once the step is compiled; nothing if compile fell back to eager
  sed -n 's|.*training step compiled/captured in \([0-9.]*\) s.*|\1|p' "$work/logs/$1.log" | tail -n 1
}
cache_reused() {
  [ -n "$first" ] && [ -n "$second" ] && [ "$(stat -c %u "$work/outputs/.cache/inductor" 2>/dev/null)" = 1000 ] \
    && awk -v a="$first" -v b="$second" 'BEGIN { exit !(b < a / 2) }'
}
train compile1 epochs=1 compile=true hydra.run.dir=/app/outputs/compile1
first=$(compile_seconds compile1)
train compile2 epochs=1 compile=true hydra.run.dir=/app/outputs/compile2
second=$(compile_seconds compile2)
check "compile=true compiles in the image, and the second container reuses the cache in outputs/.cache/inductor \
(${first:-failed} s, then ${second:-failed} s) ($(elapsed))" cache_reused

# 4. TensorBoard from the same image, published on 127.0.0.1 only.
docker run -d --name "$NAME-tb" -p 127.0.0.1::6006 -v "$work/outputs:/app/outputs:ro" --entrypoint tensorboard \
  "$IMAGE" --logdir /app/outputs --bind_all --port 6006 >/dev/null
addr=$(docker port "$NAME-tb" 6006/tcp | grep '^127.0.0.1:' | head -n 1)
runs=""
for _ in $(seq 60); do
  runs=$(curl -fsS --max-time 5 "http://$addr/data/runs" 2>/dev/null) && break
  sleep 1
done
check "TensorBoard answers on $addr and lists the run ($(elapsed))" test "${runs/\"one\"/}" != "$runs"
docker logs "$NAME-tb" >"$work/logs/tensorboard.log" 2>&1

say "docker-smoke: $passed passed, $failed failed in $(elapsed) (base $BASE, build log $CACHE/build.log)"
[ "$failed" = 0 ]
