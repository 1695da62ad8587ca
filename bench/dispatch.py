"""Where a small model's step time goes between Python and the graph: Strata's compiled step (one process,
no collectives) called through tf.function's dispatch or as its one traced concrete function
(trainer/loop.py `TracedOnce`), at 1 and 10 steps per call, beside a compiled call that only takes the
next batch (the floor of any call). All variants run in one process, interleaved, --repeats times; the
minimum and the median of each are printed (a busy machine moves the medians; the minima less so).

    .venv/bin/python bench/dispatch.py [--model classifier|summarizer] [--steps 300] [--repeats 7]

Read: (tf.function - traced) per call = the argument matching that `TracedOnce` skips; the 1-step
figure minus the 10-step figure = what one more call costs beyond the steps it runs; `next batch only`
= running a compiled call at all (the runtime's per-call work and the input pipeline).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tensorflow as tf  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.experiment import Experiment, configure_runtime, prepare  # noqa: E402
from trainer.loop import _batches, make_train_step  # noqa: E402
from trainer.strategy.single import SingleDevice  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def single_process(config: Path, settings: list[str]) -> tuple[Experiment, SingleDevice, Any]:
    """(experiment, strategy, its batch iterator from step 0) for `config` + `settings` in this process, on the
    default device: what each benchmark builds Strata's compiled step from (`make_train_step`)."""
    cfg = load_config(config, settings)
    configure_runtime(cfg)
    strategy = SingleDevice()
    exp = prepare(cfg, strategy, training=True)
    return exp, strategy, _batches(exp, strategy, 0)


def variants(model: str, tmp: str) -> dict:
    """name -> (callable running one call, steps it runs)."""
    exp, strategy, batches = single_process(CONFIGS / f"{model}.yaml", [
        f"run_dir={tmp}/run", "data.builtin.train_examples=1000", "optimizer.warmup_steps=0",
        "train.deterministic=false"])
    one, ten, n = make_train_step(exp, strategy), make_train_step(exp, strategy, per_call=10), tf.constant(10)

    @tf.function
    def next_batch(iterator):
        return {"loss": tf.reduce_sum(tf.cast(next(iterator)[next(iter(batches.element_spec))], tf.float32))}

    return {"1 step/call, tf.function": (lambda: one.function(batches), 1),
            "1 step/call, traced once": (lambda: one(batches), 1),
            "10 steps/call, tf.function": (lambda: ten.function(batches, n), 10),
            "10 steps/call, traced once": (lambda: ten(batches, n), 10),
            "next batch only, tf.function": (lambda: next_batch(batches), 1)}


def interleaved(runs: dict, steps: int, repeats: int) -> dict[str, list[float]]:
    """ms per step of each variant, `repeats` windows of `steps` steps each, the variants taking turns."""
    for run, _ in runs.values():  # trace, warm up
        for _ in range(3):
            float(run()["loss"])
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (run, per_call) in runs.items():
            calls = max(steps // per_call, 1)
            started = time.perf_counter()
            for _ in range(calls):
                out = run()
            float(out["loss"])
            times[name].append((time.perf_counter() - started) / (calls * per_call) * 1e3)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="classifier", choices=["classifier", "summarizer"])
    p.add_argument("--steps", type=int, default=300, help="steps per timing")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        times = interleaved(variants(args.model, tmp), args.steps, args.repeats)
    print(f"{args.model}: ms per step over {args.steps} steps, {args.repeats} interleaved repeats"
          + (f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""))
    width = max(map(len, times))
    print(f"{'variant':<{width}} | {'min':>7} | {'median':>7}")
    for name, values in times.items():
        print(f"{name:<{width}} | {min(values):>7.3f} | {statistics.median(values):>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
