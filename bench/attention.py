"""Strata's attention layer against keras.layers.MultiHeadAttention: one forward+backward of self-attention,
compiled, same shapes and dtype policy, timed alternately in one process.

    .venv/bin/python bench/attention.py [--widths 512,1024] [--policies float32,mixed_bfloat16] [--repeats 15]

Why it exists: Keras' layer projects with EinsumDense, which its TensorFlow backend runs as a batch-broadcast
matmul whose kernel gradient is B small matmuls plus a sum; trainer/models/attention.py uses Dense layers
(one [B*T, D] matmul each way). Batch 32, 48 tokens, D/64 heads (bench/mfu.py's transformer shapes).
Prints the median milliseconds of each and keras/strata (> 1: Strata's layer is faster). What it does not
show: the whole step's gain, which depends on attention's share of it (see bench/mfu.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainer.models.attention import MultiHeadAttention  # noqa: E402

BATCH, TOKENS = 32, 48


def forward_backward(layer: keras.layers.Layer) -> tf.types.experimental.GenericFunction:
    """A compiled self-attention forward and its gradients w.r.t. the input and the layer's weights."""
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.cast(layer(x, x), tf.float32) ** 2)
        return tape.gradient(loss, [x, *layer.trainable_variables])
    return step


def compare(width: int, policy: str, repeats: int) -> tuple[float, float]:
    """(Strata ms, Keras ms): medians of `repeats` alternating timed calls after 3 warm-up calls each."""
    keras.mixed_precision.set_global_policy(policy)
    heads = max(width // 64, 1)
    ours = MultiHeadAttention(width, heads, dropout=0.0)
    ours.build((BATCH, TOKENS, width))
    theirs = keras.layers.MultiHeadAttention(heads, width // heads)
    theirs.build((BATCH, TOKENS, width), (BATCH, TOKENS, width))
    x = tf.random.normal([BATCH, TOKENS, width])
    steps = [forward_backward(ours), forward_backward(theirs)]
    for step in steps:
        for _ in range(3):
            step(x)[0].numpy()
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for step, acc in zip(steps, times):
            begin = time.perf_counter()
            step(x)[0].numpy()  # waits for the result
            acc.append(time.perf_counter() - begin)
    keras.mixed_precision.set_global_policy("float32")
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="512,1024")
    parser.add_argument("--policies", default="float32,mixed_bfloat16")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"{'policy':<16} {'d_model':>7} {'strata ms':>10} {'keras ms':>10} {'keras/strata':>13}")
    for policy in args.policies.split(","):
        for width in (int(w) for w in args.widths.split(",")):
            ours, theirs = compare(width, policy, args.repeats)
            print(f"{policy:<16} {width:>7} {ours:>10.1f} {theirs:>10.1f} {theirs / ours:>13.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
