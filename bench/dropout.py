"""Strata's 16-bit dropout (trainer/models/dropout.py) against Keras' own, in the transformer's training step.

    .venv/bin/python bench/dropout.py [--width 1024] [--dtypes float32,bfloat16] [--batch 32] [--steps 4]
                                      [--repeats 5]

For each dtype, two copies of Strata's compiled step for bench/mfu.py's transformer (d_model --width, ff 4x,
dropout 0.1, 48 + 8 tokens) are built in one process: one traced with Strata's Dropout, one traced while the
layer's `call` is Keras' (`keras.layers.Dropout.call`: one 32-bit float per element). Windows of --steps steps
take turns (bench/dispatch.py `interleaved`), --repeats each; ms per step, medians and minima, and the ratio.
Both sides run the same model, data and optimizer; only the mask's random draws differ.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras  # noqa: E402

import dispatch  # noqa: E402
import mfu  # noqa: E402
from trainer.loop import make_train_step  # noqa: E402
from trainer.models.dropout import Dropout  # noqa: E402


@contextlib.contextmanager
def keras_dropout():
    """While active, Strata's Dropout layers draw their masks as Keras' Dropout does."""
    ours = Dropout.call
    Dropout.call = keras.layers.Dropout.call
    try:
        yield
    finally:
        Dropout.call = ours


def step(tmp: str, name: str, settings: list[str], traced_with) -> tuple:
    """(one compiled step of a fresh experiment, traced inside `traced_with`, 1 step per call)."""
    exp, strategy, batches = dispatch.single_process(mfu.CONFIG, [f"run_dir={tmp}/{name}", *settings])
    train_step = make_train_step(exp, strategy)
    with traced_with():
        train_step(batches)  # traces now; later calls run that one concrete function
    return (lambda: train_step(batches)), 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="steps per window")
    p.add_argument("--repeats", type=int, default=5, help="windows per side")
    args = p.parse_args()
    print(f"transformer d_model {args.width}, batch {args.batch}, dropout 0.1; ms per step, {args.repeats} "
          f"interleaved windows of {args.steps} steps; load average before {os.getloadavg()[0]:.2f}", flush=True)
    print(f"{'dtype':>9} | {'Keras median':>12} | {'Strata median':>13} | {'ratio':>5} | {'Keras min':>9} | "
          f"{'Strata min':>10} | {'ratio':>5}", flush=True)
    for dtype in args.dtypes.split(","):
        settings = mfu.overrides(args.width, dtype, False, args.batch, (48, 8))
        with tempfile.TemporaryDirectory() as tmp:
            runs = {"keras": step(tmp, "keras", settings, keras_dropout),
                    "strata": step(tmp, "strata", settings, contextlib.nullcontext)}
            times = dispatch.interleaved(runs, args.steps, args.repeats)
        k, s = times["keras"], times["strata"]
        print(f"{dtype:>9} | {statistics.median(k):>12.1f} | {statistics.median(s):>13.1f} | "
              f"{statistics.median(k) / statistics.median(s):>5.2f} | {min(k):>9.1f} | {min(s):>10.1f} | "
              f"{min(k) / min(s):>5.2f}", flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
