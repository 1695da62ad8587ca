"""Where the transformer step's time goes: TensorFlow's profiler over a few of Strata's compiled steps, summed
by op type (and, for matmuls and reductions, by op name).

    .venv/bin/python bench/op_profile.py [--width 512] [--dtype float32|bfloat16] [--dropout 0.1]

bench/mfu.py's transformer shapes (batch 32, 48 + 8 tokens), one process. Times are summed over the executor's
threads (the top-level `Process`/`ParallelFor` events contain the others), so read the shares, not the sums.
This is how the attention projections' batch-broadcast matmuls and their sums were found (README, Speed).
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tensorflow as tf  # noqa: E402
from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: E402

import dispatch  # noqa: E402
import mfu  # noqa: E402
from trainer.loop import make_train_step  # noqa: E402

DETAILED = ("_MklBatchMatMulV2", "_MklMatMul", "Sum", "Mul")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--dropout", default="0.1")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    tmp = tempfile.mkdtemp()
    settings = [*mfu.overrides(args.width, args.dtype, False, 32, (48, 8)), f"model.dropout={args.dropout}"]
    exp, strategy, batches = dispatch.single_process(mfu.CONFIG, [f"run_dir={tmp}/run", *settings])
    step = make_train_step(exp, strategy)
    for _ in range(2):
        float(step(batches)["loss"])
    began = time.perf_counter()
    for _ in range(args.steps):
        out = step(batches)
    float(out["loss"])
    print(f"step {(time.perf_counter() - began) / args.steps * 1e3:.1f} ms (unprofiled)")
    tf.profiler.experimental.start(f"{tmp}/profile")
    for _ in range(args.steps):
        out = step(batches)
    float(out["loss"])
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    space.ParseFromString(Path(glob.glob(f"{tmp}/profile/**/*.xplane.pb", recursive=True)[0]).read_bytes())
    by_type, by_name = collections.Counter(), collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith(("tf_Compute", "tf_numa")):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                kind = name.split(":")[-1] if ":" in name else re.sub(r"[_/0-9]+$", "", name.split("/")[-1])
                ms = event.duration_ps / 1e9 / args.steps
                by_type[kind] += ms
                if kind in DETAILED:
                    by_name[(kind, re.sub(r"_\d+", "", name.rsplit(":", 1)[0]))] += ms
    total = sum(v for k, v in by_type.items() if k not in ("Process", "ParallelFor"))
    print(f"op time summed over threads, per step: {total:.1f} ms (Process/ParallelFor events excluded)")
    for kind, ms in by_type.most_common(20):
        if kind not in ("Process", "ParallelFor"):
            print(f"  {kind:<32} {ms:8.1f} ms  {ms / total:6.1%}")
    print("largest matmuls and reductions by op:")
    for (kind, name), ms in by_name.most_common(15):
        print(f"  {kind:<18} {ms:7.1f} ms  {name[-100:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
