"""tf.data pipelines whose order is a pure function of (seed, step).

Why not `dataset.shuffle(...)`: a resumed run must see exactly the batches it would have seen, and N
replicas must together see exactly the global batch one replica would see. Here the order of epoch e is
`stateless_shuffle(range(n), seed=[seed, e])`, the global batch of step s is the s-th slice of that
stream, and replica r of R takes rows [r*b, (r+1)*b) of it (b = global_batch / R). So:
  * resuming at step k is `skip(k)` over cheap index batches (no example is materialised),
  * the R replicas' shards are disjoint and their union is the global batch,
  * R replicas x batch b and 1 replica x batch R*b train on the same examples in the same order.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full global batches in one pass (the remainder of each epoch is dropped, never padded)."""
    return num_examples // global_batch


def global_index_batches(num_examples: int, *, global_batch: int, seed: int, start_step: int = 0) -> tf.data.Dataset:
    """Endless stream of int64 [global_batch] index vectors; element k is the global batch of step start_step+k."""
    if global_batch > num_examples:
        raise ValueError(f"global batch ({global_batch}) exceeds the training examples ({num_examples})")
    per_epoch = steps_per_epoch(num_examples, global_batch)

    def epoch_order(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(
            tf.range(num_examples, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
        return tf.data.Dataset.from_tensor_slices(order[: per_epoch * global_batch])

    first_epoch, offset = divmod(start_step, per_epoch)
    stream = (
        tf.data.Dataset.range(first_epoch, 2**62)
        .flat_map(epoch_order)
        .batch(global_batch, drop_remainder=True)
    )
    return stream.skip(offset)


def _gather(arrays: dict[str, np.ndarray]):
    tensors = {k: tf.constant(v) for k, v in arrays.items()}

    def gather(indices: tf.Tensor) -> dict[str, tf.Tensor]:
        return {k: tf.gather(t, indices) for k, t in tensors.items()}

    return gather


def train_dataset(
    arrays: dict[str, np.ndarray],
    *,
    global_batch: int,
    seed: int,
    start_step: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
) -> tf.data.Dataset:
    """Endless training batches for one input shard (a rank, or a process of a multi-device strategy).

    Each element holds `global_batch // num_shards` examples: this shard's rows of the global batch.
    """
    if global_batch % num_shards:
        raise ValueError(f"global batch ({global_batch}) must be divisible by the shards ({num_shards})")
    n = len(next(iter(arrays.values())))
    local = global_batch // num_shards
    lo, hi = shard_index * local, (shard_index + 1) * local
    gather = _gather(arrays)
    return (
        global_index_batches(n, global_batch=global_batch, seed=seed, start_step=start_step)
        .map(lambda idx: gather(idx[lo:hi]), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def eval_dataset(
    arrays: dict[str, np.ndarray], *, batch_size: int, shard_index: int = 0, num_shards: int = 1
) -> tf.data.Dataset:
    """One pass over this shard's part of an evaluation split, in order, last batch kept (no drops).

    Shards take interleaved examples (i % num_shards == shard_index), so each example is scored once.
    """
    n = len(next(iter(arrays.values())))
    rows = np.arange(shard_index, n, num_shards)
    gather = _gather(arrays)
    return (
        tf.data.Dataset.from_tensor_slices(rows)
        .batch(batch_size)
        .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )
