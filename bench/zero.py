"""ZeRO step time and bytes moved: zero 1, 2 and 3 against replicated data parallel (zero 0), 2 Horovod ranks.

    .venv/bin/python bench/zero.py [--quick] [--steps 20] [--controller gloo]

One horovodrun launch (2 ranks on this host); inside it every rank trains the transformer through the real
training step (trainer.loop.make_train_step) at zero 0, 1, 2 and 3 in turn, from the same weights, and times
`--steps` steps after 3 warm-up steps (the median step, rank 0's clock). The stages alternate in rounds
(0, 1, 2, 3, 0, 1, ...) so a load change on a shared machine hits them alike.

Bytes moved: each rank's `wchar` from /proc/self/io (bytes its write/send system calls passed on, which with
Gloo's TCP transport is what it sent to the other rank) per step, against the analytic figure for ring
collectives over N ranks and P float32 parameters (4P bytes):
  zero 0   all-reduce of the gradients                        2(N-1)/N x 4P
  zero 1   all-reduce of the gradient buckets + all-gather     3(N-1)/N x 4P
  zero 2   reduce-scatter + all-gather                         2(N-1)/N x 4P
  zero 3   all-gather (forward) + all-gather (recomputed backward) + reduce-scatter, per level
                                                               3(N-1)/N x 4P
(plus a few bytes of flags and metrics). Only meaningful with Gloo (MPI on one host uses shared memory,
which no system call counts). --quick: a small transformer and 8 steps. Prints a table and one JSON line.

    .venv/bin/python bench/zero.py --demo [--seq-len 256] [--demo-steps 3]

The ZeRO-3 demonstration (issue 13): configs/lm_1b.yaml (about 1B parameters) as 2 ZeRO-3 ranks on this host,
`--demo-steps` steps of one sequence per rank (data.batch_size 2, grad_accum 1, `--seq-len` tokens: the
model is the config's, the batch is cut so a CPU step takes minutes, not hours), through the real training
step; prints each step's loss and, per rank, the parameter elements it holds and its peak RSS.
It needs most of the machine's memory: run it alone. Each rank's RESULT also gives its resident set after
initialisation and after each step with the peak of each (/proc/self/status VmRSS, VmHWM reset between
phases), and after a final malloc_trim.

    .venv/bin/python bench/zero.py --demo-scaling [--demo-layers 2 6] [--max-bytes-per-param 20]

The memory regression check: the demo at two depths of the 1B config's width (a few minutes, a few GiB), the
growth of the peak RSS per parameter a rank holds (16 bytes is the floor), the 1B model's peak per rank
predicted from the two (linear in the depth), and exit 1 when the growth exceeds the bound.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {"quick": ["model.d_model=64", "model.ff_dim=128", "model.encoder_layers=2", "model.decoder_layers=2"],
         "full": ["model.d_model=256", "model.ff_dim=1024", "model.encoder_layers=4", "model.decoder_layers=4",
                  "model.num_heads=8"]}
COMMON = ["model.dropout=0.0", "data.builtin.train_examples=800", "data.builtin.val_examples=40",
          "data.builtin.test_examples=40", "data.batch_size=16", "logging.progress_bar=false",
          "distribution.backend=horovod", "optimizer.warmup_steps=0"]


def wchar() -> int:
    with open("/proc/self/io", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def worker(args: argparse.Namespace) -> None:
    """Every rank: each stage's prepared step, then rounds of timed steps."""
    from trainer.config import load_config
    from trainer.experiment import configure_runtime, prepare
    from trainer.loop import _batches, make_train_step
    from trainer.strategy import make_strategy

    overrides = [*COMMON, *SIZES[args.size]]
    strategy = make_strategy(load_config(REPO / "configs" / "transformer_small.yaml", overrides))
    out, steps = Path(args.out), {}
    for zero in (0, 1, 2, 3):
        cfg = load_config(REPO / "configs" / "transformer_small.yaml",
                          [*overrides, f"distribution.zero={zero}", f"run_dir={out / f'zero{zero}'}"])
        configure_runtime(cfg)
        exp = prepare(cfg, strategy, training=True)
        strategy.broadcast_initial_state(exp.model.variables + exp.optimizer.variables)
        step, iterator = make_train_step(exp, strategy), _batches(exp, strategy, 0)
        for _ in range(3):
            float(step(iterator)["loss"])  # trace and warm up
        steps[zero] = (step, iterator, sum(int(np.prod(v.shape)) for v in exp.model.trainable_variables))
    times: dict[int, list[float]] = {z: [] for z in steps}
    sent: dict[int, list[int]] = {z: [] for z in steps}
    for _ in range(args.steps):
        for zero, (step, iterator, _) in steps.items():
            began, wrote = time.perf_counter(), wchar()
            float(step(iterator)["loss"])
            times[zero].append(time.perf_counter() - began)
            sent[zero].append(wchar() - wrote)
    if strategy.is_chief:
        params, n = steps[0][2], strategy.world_size
        factor = {0: 2, 1: 3, 2: 2, 3: 3}
        print("RESULT " + json.dumps({
            "ranks": n, "params": params, "steps": args.steps,
            "step_ms": {z: 1e3 * statistics.median(t) for z, t in times.items()},
            "sent_bytes": {z: statistics.median(b) for z, b in sent.items()},
            "analytic_bytes": {z: factor[z] * (n - 1) / n * 4 * params for z in steps}}), flush=True)


def rss_gib() -> tuple[float, float]:
    """(current, peak since the last `reset_peak`) resident set of this process, GiB (/proc/self/status)."""
    with open("/proc/self/status", encoding="ascii") as f:
        fields = {line.split(":")[0]: line.split()[1] for line in f if line.startswith(("VmRSS", "VmHWM"))}
    return round(int(fields["VmRSS"]) / 2**20, 2), round(int(fields["VmHWM"]) / 2**20, 2)


def trimmed_rss_gib() -> float:
    """The resident set after glibc's `malloc_trim(0)` returned the free memory it kept (what a step left
    allocated, against what malloc merely cached), GiB."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_gib()[0]


def reset_peak() -> None:
    """Restart the kernel's peak-RSS count (VmHWM) so the next phase's peak is its own (Linux clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


def demo_worker(args: argparse.Namespace) -> None:
    """Every rank: the 1B LM built deferred and sharded (zero 3), `--demo-steps` steps, its peak RSS."""
    from trainer.allocator import choose_allocator
    from trainer.config import load_config

    cfg = load_config(REPO / "configs" / "lm_1b.yaml", [
        "distribution.zero=3", "distribution.backend=horovod", "data.batch_size=2", "train.grad_accum=1",
        f"data.seq_len={args.seq_len}", f"train.steps={args.demo_steps}", "checkpoint.check_free_space=false",
        "optimizer.warmup_steps=0", f"run_dir={Path(args.out) / 'lm_1b_zero3'}", *args.demo_set])
    choose_allocator(cfg)  # as `strata train` does (trainer/cli.py), before TensorFlow is imported
    from trainer.experiment import configure_runtime, prepare
    from trainer.loop import _batches, make_train_step
    from trainer.strategy import make_strategy

    strategy = make_strategy(cfg)
    configure_runtime(cfg)
    exp = prepare(cfg, strategy, training=True)
    strategy.broadcast_initial_state(exp.model.variables + exp.optimizer.variables)
    phases = {"init": rss_gib()}  # (now, peak of the phase), GiB
    reset_peak()
    step, iterator = make_train_step(exp, strategy), _batches(exp, strategy, 0)
    params = sum(int(v.shape.num_elements()) for v in exp.model.trainable_variables)
    for i in range(args.demo_steps):
        began = time.perf_counter()
        loss = float(step(iterator)["loss"])
        phases[f"step{i + 1}"] = rss_gib()
        reset_peak()
        if strategy.is_chief:
            print(f"DEMO step {i + 1} loss {loss:.4f} ({time.perf_counter() - began:.0f} s)", flush=True)
    trimmed = trimmed_rss_gib()  # after the last step only: a trim between steps would change what they measure
    print("RESULT " + json.dumps({
        "rank": strategy.rank, "params": params, "params_held": strategy.zero_state.held_elements(),
        # The run's peak: the largest phase peak (ru_maxrss would miss the phases after a `reset_peak`).
        "peak_rss_GiB": max(peak for _, peak in phases.values()), "rss_now_peak_GiB": phases,
        "rss_trimmed_GiB": trimmed}), flush=True)


def demo(args: argparse.Namespace, extra: tuple[str, ...] = ()) -> tuple[int, list[dict]]:
    """Launch `demo_worker` on 2 ranks (with the config overrides `extra` after `--demo-set`'s); print its
    lines (the losses, then each rank's RESULT). Returns the exit status and the ranks' RESULTs."""
    from launch.horovod import horovodrun_argv
    from launch.hosts import parse_hosts

    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, __file__, "--demo-worker", "--seq-len", str(args.seq_len), "--demo-steps",
                   str(args.demo_steps), "--out", out, *(f"--demo-set={o}" for o in [*args.demo_set, *extra])]
        argv = horovodrun_argv(np=2, hosts=parse_hosts("localhost:2"), controller=args.controller,
                               as_root=os.geteuid() == 0, command=command,
                               program=str(Path(sys.executable).parent / "horovodrun"))
        env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=6 * 3600)
    lines = [line.split(">:", 1)[-1] for line in done.stdout.splitlines() if "DEMO " in line or "RESULT " in line]
    print("\n".join(lines) if lines else (done.stdout + done.stderr)[-4000:], flush=True)
    return done.returncode, [json.loads(line.split("RESULT ", 1)[1]) for line in lines if "RESULT " in line]


def demo_scaling(args: argparse.Namespace) -> int:
    """The demo at two depths (`--demo-layers`, the config's width): the growth of the ranks' peak RSS per
    parameter a rank holds, the 1B model's peak predicted from it (linear in the depth), and exit 1 when the
    growth exceeds `--max-bytes-per-param` (16 is the floor: the shard 4, Adam's moments 8, the gradient 4)."""
    from trainer.config import load_config

    layers = sorted(args.demo_layers)
    runs = {}
    for depth in layers:
        code, results = demo(args, (f"model.layers={depth}",))
        if code or len(results) != 2:
            print(f"bench/zero.py: the demo at model.layers={depth} failed (exit {code})", file=sys.stderr)
            return 1
        runs[depth] = (max(r["peak_rss_GiB"] for r in results) * 2**30, results[0]["params_held"])
    low, high = layers[0], layers[-1]
    (peak_low, held_low), (peak_high, held_high) = runs[low], runs[high]
    per_param = (peak_high - peak_low) / (held_high - held_low)
    full = load_config(REPO / "configs" / "lm_1b.yaml", args.demo_set).model.layers
    predicted = peak_high + (peak_high - peak_low) * (full - high) / (high - low)
    print(f"bench/zero.py: peak RSS per rank {peak_low / 2**30:.2f} GiB at model.layers={low}, "
          f"{peak_high / 2**30:.2f} GiB at {high}: {per_param:.1f} bytes per held parameter "
          f"(bound {args.max_bytes_per_param}); predicted at model.layers={full}: {predicted / 2**30:.2f} GiB")
    return 0 if per_param <= args.max_bytes_per_param else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small transformer, 8 steps")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--controller", choices=["gloo", "mpi"], default="gloo")
    parser.add_argument("--demo", action="store_true", help="configs/lm_1b.yaml as 2 ZeRO-3 ranks (see above)")
    parser.add_argument("--seq-len", type=int, default=256, help="--demo: tokens per sequence")
    parser.add_argument("--demo-steps", type=int, default=3, help="--demo: steps")
    parser.add_argument("--demo-set", action="append", default=[], help="--demo: a config override (a smaller "
                        "model to try the script: --demo-set model.layers=2)")
    parser.add_argument("--demo-scaling", action="store_true", help="the demo at two depths: peak RSS growth "
                        "per held parameter, the 1B model's peak predicted, exit 1 above --max-bytes-per-param")
    parser.add_argument("--demo-layers", type=int, nargs=2, default=[2, 6], help="--demo-scaling: the two depths")
    parser.add_argument("--max-bytes-per-param", type=float, default=20.0, help="--demo-scaling: the bound")
    parser.add_argument("--demo-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.demo_worker:
        demo_worker(args)
        return 0
    if (args.demo or args.demo_scaling) and not (Path("data/pydocs") / "index.json").is_file():
        print("bench/zero.py: data/pydocs: no prepared dataset here (configs/lm_1b.yaml reads it); run "
              "`strata data prepare --builtin pydocs --out data/pydocs --vocab-size 2000` first", file=sys.stderr)
        return 2
    if args.demo_scaling:
        return demo_scaling(args)
    if args.demo:
        return demo(args)[0]
    from launch.horovod import horovodrun_argv
    from launch.hosts import parse_hosts

    steps, size = (8, "quick") if args.quick else (args.steps, "full")
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, __file__, "--worker", "--steps", str(steps), "--size", size, "--out", out]
        argv = horovodrun_argv(np=2, hosts=parse_hosts("localhost:2"), controller=args.controller,
                               as_root=os.geteuid() == 0, command=command,
                               program=str(Path(sys.executable).parent / "horovodrun"))
        env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
        began = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if "RESULT " in line]
    if done.returncode or not lines:
        print((done.stdout + done.stderr)[-4000:], file=sys.stderr)
        return 1
    result = json.loads(lines[-1].split("RESULT ", 1)[1])
    base = result["step_ms"]["0"]
    print(f"bench/zero.py: transformer ({size}) {result['params']:,} parameters, {result['ranks']} ranks "
          f"({args.controller}), median of {steps} steps, {time.perf_counter() - began:.0f} s in all")
    print("zero  step ms  vs zero 0  sent/rank/step  analytic   (sent: /proc/self/io wchar; Gloo only)")
    for z in ("0", "1", "2", "3"):
        print(f"{z:<5} {result['step_ms'][z]:7.1f}  {result['step_ms'][z] / base:8.3f}x  "
              f"{result['sent_bytes'][z] / 2**20:10.2f} MiB  {result['analytic_bytes'][z] / 2**20:7.2f} MiB")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
