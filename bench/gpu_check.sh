#!/usr/bin/env bash
# The GPU check (issue 14): bench/mfu.py --gpu in ONE process on a lent GPU machine, under 8 minutes.
#   bash bench/gpu_check.sh            (from the repository root; PYTHON=... to pick the interpreter)
# It needs only the repository and an importable TensorFlow with its GPU support (whatever the machine has:
# it says what it found first). Prints absolute figures: the bf16 and fp32 matmul peaks measured in the same
# run, then examples/s, TFLOP/s and MFU of the transformer step at d_model 512, 1024 and 2048, XLA off and on.
set -u
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."
echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -4
echo "== python: $("$PYTHON" --version 2>&1) ($PYTHON)"
if ! "$PYTHON" -c "import tensorflow as tf; print('tensorflow', tf.__version__, 'GPUs:', tf.config.list_physical_devices('GPU'))"; then
  echo "gpu_check: TensorFlow is not importable with $PYTHON; set PYTHON=/path/to/python" >&2; exit 2
fi
for mod in keras pydantic yaml numpy; do
  "$PYTHON" -c "import $mod" 2>/dev/null || echo "gpu_check: missing Python package '$mod' (pip install it; see requirements.lock)" >&2
done
echo "== bench/mfu.py --gpu"
exec timeout 450 "$PYTHON" bench/mfu.py --gpu "$@"
