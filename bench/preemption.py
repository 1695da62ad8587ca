"""What stopping on a signal costs (trainer/preemption.py): the same 2-rank Horovod (Gloo) job, tiny
classifier, run two ways in one invocation, alternating, and compared by throughput:

  off   STRATA_PREEMPTION=0: no signal handlers, no stop hook
  on    STRATA_PREEMPTION=1 (the default): each rank's stop votes ride in the step's all-reduce of the NaN/Inf
        flags (three more floats in a tensor reduced anyway) and the stop hook reads them every step

    .venv/bin/python bench/preemption.py [--steps 400] [--log-every 20] [--skip-windows 2] [--repeats 3]
    .venv/bin/python bench/preemption.py --quick      # 60 steps, 1 repeat: checks that it runs, measures little

Throughput is rank 0's `perf/examples_per_sec` from each run's TensorBoard events (the global rate: 64
examples per step over both ranks); the first --skip-windows windows (tracing) are dropped and the median of
the rest is taken, then the median over repeats. The runs of one repeat go in a rotating order so drift on a
shared machine does not always hit the same mode. Prints each mode's throughput and its ratio to `off`
(1.00 = free; 0.90 = stopping support costs 10% of the throughput). Run on a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
TAG = "perf/examples_per_sec"
MODES = {"off": {"STRATA_PREEMPTION": "0"}, "on": {"STRATA_PREEMPTION": "1"}}
TINY = ["data.builtin.train_examples=1200", "data.builtin.val_examples=200", "data.builtin.test_examples=200"]


def strata() -> str:
    found = Path(sys.executable).parent / "strata"
    return str(found) if found.exists() else (shutil.which("strata") or sys.exit("`strata` not found: run make setup"))


def one_run(mode: str, run_dir: Path, args) -> list[float]:
    """Train the job once in `mode`; the examples/s of every logged window, in step order."""
    sets = [*TINY, f"run_dir={run_dir}", f"train.steps={args.steps}", f"train.log_every={args.log_every}",
            f"eval.every={10**9}", f"checkpoint.every={10**9}", "logging.progress_bar=false",
            "optimizer.warmup_steps=0"]
    argv = [strata(), "launch", "-np", "2", "--backend", "horovod", str(REPO / "configs" / "classifier.yaml"),
            *[x for s in sets for x in ("--set", s)]]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STRATA_", "HOROVOD_", "OMPI_"))}
    env.update(MODES[mode], PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=args.timeout)
    if done.returncode != 0:
        sys.exit(f"bench/preemption.py: the {mode!r} run failed (exit {done.returncode}):\n"
                 f"{(done.stdout + done.stderr)[-3000:]}")
    from tensorboard.backend.event_processing import event_accumulator as ea
    import tensorflow as tf  # after the run: never competes with a measurement for the CPU

    acc = ea.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    return [float(tf.make_ndarray(e.tensor_proto)) for e in sorted(acc.Tensors(TAG), key=lambda e: e.step)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--skip-windows", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--quick", action="store_true", help="60 steps, log every 10, 1 repeat")
    args = p.parse_args()
    if args.quick:
        args.steps, args.log_every, args.skip_windows, args.repeats = 60, 10, 1, 1
    if args.steps // args.log_every <= args.skip_windows:
        sys.exit("bench/preemption.py: no window left after --skip-windows; raise --steps or lower --log-every")
    print(f"load average before: {os.getloadavg()[0]:.2f}; 2 Horovod (Gloo) ranks, tiny classifier, global batch "
          f"64, {args.steps} steps, {args.repeats} repeat(s)", flush=True)
    names = list(MODES)
    results: dict[str, list[float]] = {m: [] for m in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for mode in order:
                windows = one_run(mode, Path(tmp) / f"{mode.replace(' ', '')}-{r}", args)[args.skip_windows:]
                results[mode].append(statistics.median(windows))
                print(f"repeat {r + 1} {mode:8s}: {results[mode][-1]:8.0f} ex/s (windows "
                      f"{[round(w) for w in windows]})", flush=True)
    off = statistics.median(results["off"])
    for mode in names:
        value = statistics.median(results[mode])
        print(f"{mode:8s} {value:8.0f} ex/s  ratio to off {value / off:.3f}  (cost {100 * (1 - value / off):+.1f}%)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
