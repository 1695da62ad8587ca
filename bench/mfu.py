"""Model FLOPs utilisation of Strata's training step: the transformer at several widths, fp32 and bf16, with
and without XLA (`train.jit_compile`), against the matmul peak measured in the same run.

    .venv/bin/python bench/mfu.py [--widths 256,512,1024] [--dtypes float32,bfloat16] [--xla off,on]
                                  [--per-call 1,10] [--batch 32] [--steps 10] [--warmup 2]
                                  [--dispatch-steps 200] [--dispatch-repeats 5] [--quick] [--gpu]

Method
------
For each dtype the peak is measured first, here, by trainer/peak.py's probe (chained square matmuls in one
compiled function, best of repeats; not read from the cache: same run, same load), and the step's largest
matmul alone at its own shapes (`ffn_matmul_rates`: what the model's matmuls can reach). Then for each width
(d_model D, ff 4D, D/64 heads, 2 encoder + 2 decoder blocks, 48 document + 8 summary tokens, vocabulary
1000) Strata's own step is built (trainer/experiment.py `prepare`, trainer/loop.py `make_train_step`, one
process, the default device) and timed over --steps steps after --warmup untimed ones (tracing, XLA
compilation), with train.steps_per_call 1 and 10 (--per-call). The probe runs again after the steps. MFU =
trainer/flops.py's training FLOPs per example x examples/s / peak, where the peak is the best matmul rate of
the run (either probe or the step's own shapes: a core's speed drifts, and a probe that caught a slow moment
would put MFU above what the step can reach). Then the dispatch-bound small models (the classifier and the GRU summarizer at
their configs' sizes, fp32): ms per step with 1 and 10 steps per call, in windows of --dispatch-steps steps
that take turns (--dispatch-repeats each, bench/dispatch.py `interleaved`), medians and minima compared.

--quick: width 256 only, 4 steps, 1 and 2 steps per call, 20 dispatch steps (a smoke test, e.g. on a busy
         machine: its figures are not for the README).
--gpu:   what a lent GPU machine runs (bench/gpu_check.sh): widths 512, 1024, 2048, batch 128, 512 + 64 tokens,
         bf16, XLA off and on; prints the TensorFlow build and the devices it found first.

Figures move with background load; read them against the peak printed beside them, measured in the same run.
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

import tensorflow as tf  # noqa: E402

import dispatch  # noqa: E402

from trainer.flops import run_training_flops  # noqa: E402
from trainer.loop import COMPUTE_DTYPE, make_train_step  # noqa: E402
from trainer.peak import best_time, measure  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "transformer_small.yaml"
PRECISION = {"float32": "off", "bfloat16": "bfloat16"}  # bench dtype -> train.mixed_precision


def overrides(width: int, dtype: str, xla: bool, batch: int, lengths: tuple[int, int]) -> list[str]:
    """The transformer's settings for one measurement (pure)."""
    return [f"model.d_model={width}", f"model.ff_dim={4 * width}",
            f"data.max_len={lengths[0]}", f"data.summary_len={lengths[1]}",
            f"model.num_heads={max(width // 64, 1)}", "model.dropout=0.1", f"data.batch_size={batch}",
            f"data.builtin.train_examples={max(4 * batch, 256)}", "data.builtin.val_examples=32",
            "data.builtin.test_examples=32", f"train.mixed_precision={PRECISION[dtype]}",
            f"train.jit_compile={str(xla).lower()}", "train.deterministic=false", "optimizer.warmup_steps=0"]


def step_rate(config: Path, settings: list[str], *, steps: int, warmup: int, per_call: int = 1) -> tuple[float, float]:
    """(examples/s of Strata's compiled step under `config` + `settings`, its training FLOPs per example);
    with `per_call` > 1, `steps` rounded up to whole calls of that many steps (train.steps_per_call)."""
    with tempfile.TemporaryDirectory() as tmp:
        exp, strategy, batches = dispatch.single_process(
            config, [f"run_dir={Path(tmp) / 'run'}", *settings, f"train.steps_per_call={per_call}"])
        cfg, step = exp.cfg, make_train_step(exp, strategy, per_call=per_call)
        run = (lambda: step(batches)) if per_call == 1 else (lambda: step(batches, tf.constant(per_call)))
        for _ in range(warmup):
            float(run()["loss"])
        calls = -(-steps // per_call)
        started = time.perf_counter()
        for _ in range(calls):
            out = run()
        float(out["loss"])  # waits for the last step
        elapsed = time.perf_counter() - started
        flops = run_training_flops(cfg, vocab_size=exp.vocab.size, num_classes=exp.labels.num_classes)
    return calls * per_call * cfg.data.batch_size / elapsed, flops


def ffn_matmul_rates(rows: int, width: int, dtype: str, seconds: float = 1.0) -> list[float]:
    """FLOP/s of the step's largest matmuls in isolation: the feed-forward's inner product at the encoder's
    shape ([rows, D] x [D, 4D]), forward (x W), input gradient (dY W^T) and weight gradient (x^T dY), each
    timed as the peak probe is (trainer/peak.py `best_time`: the best compiled call over `seconds`). The
    probe's square matmuls are the peak; these say how much of it the model's own shapes can reach."""
    dt = tf.as_dtype(dtype)
    x, w = tf.cast(tf.random.normal([rows, width]), dt), tf.cast(tf.random.normal([width, 4 * width]), dt)
    dy = tf.cast(tf.random.normal([rows, 4 * width]), dt)
    products = [lambda: tf.matmul(x, w), lambda: tf.matmul(dy, w, transpose_b=True),
                lambda: tf.matmul(x, dy, transpose_a=True)]
    rates = []
    for product in products:
        run = tf.function(lambda product=product: tf.reduce_sum(tf.cast(product()[:1, :1], tf.float32)),
                          autograph=False)
        run()  # traces
        rates.append(2 * rows * width * 4 * width / best_time(lambda: run().numpy(), seconds))
    return rates


def dispatch_bound(steps: int, repeats: int) -> None:
    """The small models (a Python dispatch costs a large share of a step): ms per step of Strata's compiled
    step (the loop's `TracedOnce`) at train.steps_per_call 1 and 10, fp32, no XLA, their configs' own sizes,
    in one process, windows taking turns (bench/dispatch.py), so load moves both sides alike."""
    print(f"{'model':>10} {'ms/step, 1 step/call':>21} {'10 steps/call':>14} {'ratio (median)':>15} "
          f"{'ratio (min)':>12}   ({repeats} interleaved windows of {steps} steps)", flush=True)
    for model in ("classifier", "summarizer"):
        with tempfile.TemporaryDirectory() as tmp:
            runs = dispatch.variants(model, tmp)
            pair = {k: runs[k] for k in ("1 step/call, traced once", "10 steps/call, traced once")}
            times = dispatch.interleaved(pair, steps, repeats)
        one, ten = times.values()
        print(f"{model:>10} {statistics.median(one):>21.3f} {statistics.median(ten):>14.3f} "
              f"{statistics.median(one) / statistics.median(ten):>15.2f} {min(one) / min(ten):>12.2f}", flush=True)


def describe_platform() -> str:
    """What this process found: TensorFlow's version and build, and its devices."""
    build = tf.sysconfig.get_build_info()
    gpus = tf.config.list_physical_devices("GPU")
    names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
    return (f"TensorFlow {tf.__version__} (CUDA build: {build.get('is_cuda_build', False)}, CUDA "
            f"{build.get('cuda_version', '-')}, cuDNN {build.get('cudnn_version', '-')}); "
            f"GPUs: {', '.join(names) or 'none'}; CPU cores usable: {len(os.sched_getaffinity(0))}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="256,512,1024")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--xla", default="off,on")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-len", type=int, default=48, help="document tokens (built-in documents have <= 44)")
    p.add_argument("--summary-len", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="width 256, 4 steps: a smoke test")
    p.add_argument("--gpu", action="store_true", help="the GPU run: widths 512-2048, batch 128, bf16")
    p.add_argument("--per-call", default="1,10", help="train.steps_per_call values for the transformer rows")
    p.add_argument("--dispatch-steps", type=int, default=200,
                   help="timed steps per window of the classifier/summarizer steps_per_call comparison (0: skip it)")
    p.add_argument("--dispatch-repeats", type=int, default=5, help="windows per side of that comparison")
    args = p.parse_args()
    if args.quick:
        args.widths, args.steps, args.warmup, args.per_call, args.dispatch_steps = "256", 4, 1, "1,2", 20
    if args.gpu:
        # Long padded sequences and a large batch: a GPU needs big products (padding is computed, so counted).
        args.widths, args.batch, args.dtypes, args.max_len, args.summary_len = "512,1024,2048", 128, "bfloat16", 512, 64
        if not tf.config.list_physical_devices("GPU"):
            print(f"bench/mfu.py --gpu: no GPU visible to TensorFlow: {describe_platform()}", file=sys.stderr)
            return 2
    print(describe_platform(), flush=True)
    print(f"transformer 2+2 blocks, ff 4 x d_model, batch {args.batch}, {args.max_len} + {args.summary_len} tokens, "
          f"{args.steps} timed steps after {args.warmup}", flush=True)
    if hasattr(os, "getloadavg"):
        print(f"load average (1 min) before: {os.getloadavg()[0]:.2f}", flush=True)
    dtypes = args.dtypes.split(",")
    # A core's speed drifts during a run (up to 30% on the development VM): a probe that catches a slow moment
    # makes MFU too high. So the peak is probed at the start and again after the steps, the step's own largest
    # matmuls are timed too, and MFU is taken against the best matmul rate of the whole run.
    peaks = {d: measure(COMPUTE_DTYPE[PRECISION[d]]) for d in dtypes}
    for d in dtypes:
        print(f"peak {d}: {peaks[d] / 1e12:.3f} TFLOP/s (matmul probe, start of the run)", flush=True)
    print(f"the step's largest matmul alone (feed-forward, [{args.batch * args.max_len}, D] x [D, 4D]): TFLOP/s "
          "forward / input gradient / weight gradient, and the best of them over the start probe", flush=True)
    for width in map(int, args.widths.split(",")):
        for d in dtypes:
            rates = ffn_matmul_rates(args.batch * args.max_len, width, COMPUTE_DTYPE[PRECISION[d]])
            print(f"{width:>7} {d:>8} {' / '.join(f'{r / 1e12:.3f}' for r in rates)}  "
                  f"best {max(rates) / peaks[d]:.2f} of the probe", flush=True)
            peaks[d] = max(peaks[d], *rates)
    print(f"{'d_model':>7} {'dtype':>8} {'xla':>3} {'steps/call':>10} {'ex/s':>9} {'GFLOP/ex':>9} {'TFLOP/s':>8}",
          flush=True)
    lengths, rows = (args.max_len, args.summary_len), []
    for width in map(int, args.widths.split(",")):
        for d in dtypes:
            for xla in args.xla.split(","):
                for per_call in map(int, args.per_call.split(",")):
                    settings = overrides(width, d, xla == "on", args.batch, lengths)
                    rate, flops = step_rate(CONFIG, settings, steps=args.steps, warmup=args.warmup, per_call=per_call)
                    rows.append((width, d, xla, per_call, rate * flops))
                    print(f"{width:>7} {d:>8} {xla:>3} {per_call:>10} {rate:>9.1f} {flops / 1e9:>9.3f} "
                          f"{rate * flops / 1e12:>8.3f}", flush=True)
    for d in dtypes:
        again = measure(COMPUTE_DTYPE[PRECISION[d]])
        peaks[d] = max(peaks[d], again)
        print(f"peak {d}: {again / 1e12:.3f} TFLOP/s (matmul probe, after the steps); for MFU: "
              f"{peaks[d] / 1e12:.3f} TFLOP/s (the best matmul rate of this run)", flush=True)
    print(f"{'d_model':>7} {'dtype':>8} {'xla':>3} {'steps/call':>10} {'MFU':>6}", flush=True)
    for width, d, xla, per_call, achieved in rows:
        print(f"{width:>7} {d:>8} {xla:>3} {per_call:>10} {achieved / peaks[d]:>6.3f}", flush=True)
    if args.dispatch_steps and not args.gpu:
        dispatch_bound(args.dispatch_steps, args.dispatch_repeats)
    if hasattr(os, "getloadavg"):
        print(f"load average (1 min) after: {os.getloadavg()[0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
