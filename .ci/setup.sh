#!/usr/bin/env bash
# One-command set-up of everything Strata needs on a Debian machine (root or sudo):
#   Open MPI from Debian, a virtual environment with pinned dependencies, and
#   Horovod 0.28.1 built from source against TensorFlow 2.21 with Gloo and MPI.
# Idempotent: every step checks whether it is already done, so a second run takes seconds.
#
# Why the patch: TensorFlow >= 2.16 no longer ships the highwayhash headers that Horovod's
# xla_mpi_ops.cc includes. Dropping that one source file only removes Horovod ops *inside*
# XLA-compiled functions, which Strata does not use.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${STRATA_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
HOROVOD_VERSION=0.28.1
TF_TEXT_VERSION=2.21.1
STAMP="$VENV/.strata-setup-$(sha256sum "$ROOT/requirements.lock" "$0" | sha256sum | cut -c1-12)"

log() { printf '[setup] %s\n' "$*"; }

if [ -f "$STAMP" ]; then
  exit 0  # already set up with this exact lock file and script
fi

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# 1. System packages: MPI (for Horovod's MPI controller and mpi4py), compilers, cmake, and SLURM with munge
#    for the local test cluster (slurm/local-cluster.sh; srun's PMIx plugin comes with slurmd, libpmix with MPI).
need_apt=()
for pkg in openmpi-bin libopenmpi-dev g++ make cmake python3-venv slurmctld slurmd slurm-client munge; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt-get install ${need_apt[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# 2. Virtual environment with the pinned dependencies.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
log "installing pinned Python dependencies"
"$VENV/bin/python" -m pip install -q --upgrade pip==25.3 setuptools==80.9.0 wheel==0.45.1
"$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.lock"
# tensorflow-text (in-graph SentencePiece for exported models) declares a dependency on the `tensorflow`
# package, while Strata pins `tensorflow-cpu` (same modules, other wheel): with its dependencies pip would
# install a second TensorFlow over the first. --no-deps keeps the pinned one; the versions must match (2.21).
"$VENV/bin/python" -m pip install -q --no-deps "tensorflow-text==$TF_TEXT_VERSION"

# 3. Horovod built from source against the TensorFlow just installed.
if ! "$VENV/bin/python" -c "import horovod.tensorflow" >/dev/null 2>&1; then
  log "building Horovod $HOROVOD_VERSION (TensorFlow + Gloo + MPI); about 4-6 minutes on 2 cores"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  "$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: -d "$work" "horovod==$HOROVOD_VERSION"
  tar -xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
  src="$work/horovod-$HOROVOD_VERSION"
  sed -i '/xla_mpi_ops.cc/d' "$src/horovod/tensorflow/CMakeLists.txt"
  (
    cd "$src"
    export CMAKE_POLICY_VERSION_MINIMUM=3.5 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 \
      HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 MAKEFLAGS="-j$(nproc)"
    "$VENV/bin/python" -m pip install -q --no-build-isolation --no-cache-dir . >"$work/build.log" 2>&1 \
      || { tail -40 "$work/build.log"; echo "[setup] Horovod build failed (full log above)"; exit 1; }
  )
fi

# 4. Strata itself, editable, so `strata` is on the venv's PATH.
"$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"

touch "$STAMP"
log "done: $("$VENV/bin/python" -c 'import tensorflow as tf, horovod; print("tensorflow", tf.__version__, "horovod", horovod.__version__)' 2>/dev/null)"
