"""The optimizer update, Keras' elementwise ops vs the fused kernels Strata uses (trainer/optim.py
`_fuse_dense_updates`), in one process: the transformer step of bench/mfu.py built twice, timed in
alternating windows (same clock, same batches, same load).

    .venv/bin/python bench/fused_update.py [--width 1024] [--dtype float32|bfloat16] [--rounds 6] [--steps 3]

Prints each window's ms per step and the medians; the ratio is what the fused update buys on the whole step.
Both sides run the same model and data; only the per-variable update differs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mfu  # noqa: E402
import trainer.optim  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.experiment import configure_runtime, prepare  # noqa: E402
from trainer.loop import _batches, make_train_step  # noqa: E402
from trainer.strategy.single import SingleDevice  # noqa: E402


def build(width: int, dtype: str, tmp: str, *, fused: bool):
    """A compiled training step and its batches; `fused=False` keeps Keras' own update step."""
    settings = [f"run_dir={tmp}/{'fused' if fused else 'keras'}", *mfu.overrides(width, dtype, False, 32, (48, 8))]
    cfg = load_config(mfu.CONFIG, settings)
    configure_runtime(cfg)
    original = trainer.optim._fuse_dense_updates
    if not fused:
        trainer.optim._fuse_dense_updates = lambda opt: None
    try:
        strategy = SingleDevice()
        exp = prepare(cfg, strategy, training=True)
        step, batches = make_train_step(exp, strategy), _batches(exp, strategy, 0)
    finally:
        trainer.optim._fuse_dense_updates = original
    params = sum(int(v.shape.num_elements()) for v in exp.model.trainable_variables)
    return step, batches, params


def window(step, batches, steps: int) -> float:
    """ms per step over `steps` steps (waits for the last)."""
    began = time.perf_counter()
    for _ in range(steps):
        out = step(batches)
    float(out["loss"])
    return (time.perf_counter() - began) / steps * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=3, help="steps per window")
    args = p.parse_args()
    tmp = tempfile.mkdtemp()
    sides = {name: build(args.width, args.dtype, tmp, fused=name == "fused") for name in ("keras", "fused")}
    print(f"transformer d_model {args.width}, {args.dtype}, batch 32, "
          f"{sides['fused'][2] / 1e6:.1f} M trainable parameters; load {os.getloadavg()[0]:.2f}")
    for step, batches, _ in sides.values():
        for _ in range(2):
            window(step, batches, 1)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.rounds):
        for name in (("keras", "fused") if r % 2 == 0 else ("fused", "keras")):
            times[name].append(window(sides[name][0], sides[name][1], args.steps))
        print(f"round {r}: keras {times['keras'][-1]:.0f} ms, fused {times['fused'][-1]:.0f} ms per step", flush=True)
    keras_ms, fused_ms = statistics.median(times["keras"]), statistics.median(times["fused"])
    print(f"median ms per step: Keras update {keras_ms:.0f}, fused update {fused_ms:.0f}: "
          f"step {keras_ms / fused_ms:.2f}x faster; load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
