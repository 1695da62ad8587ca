"""NaN/Inf guard: a step whose loss or gradient is non-finite on ANY rank is skipped by EVERY rank.

Inside the compiled step (`make_train_step`), each replica marks which of its values are non-finite
(`local_flags`: the loss, then one flag per gradient, before any all-reduce), the flags are summed over
replicas (`Strategy.replica_sum`, fused with the gradient all-reduce under Horovod), and the optimizer
update runs only when the sum is zero (`Strategy.apply_if`). Every replica sees the same sum, so they all
apply or all skip: weights stay identical. A skipped step leaves the weights and the optimizer's state,
including its own step counter (the learning-rate schedule and Adam's bias correction), untouched; the
loop's step and the data position still advance.

Float16 loss scaling: Keras's LossScaleOptimizer already skips a non-finite update and halves its scale.
The guard then feeds it a poisoned gradient whenever the agreed flags say "bad", so that its decision is
the agreed one even where only another rank (or only the loss) saw the non-finite value.

On the host, `NonFiniteGuard` prints every skipped step (on every rank), logs `train/skipped_steps` to
TensorBoard, and stops the run with one line naming the step and the first non-finite variable and its
level after `train.max_bad_steps` consecutive skips. Reading the step's flag costs one scalar host read
per step (free on CPU; on a GPU it waits for the step, which the loop's log points do anyway).
"""
from __future__ import annotations

import sys

import tensorflow as tf

from trainer.errors import UserError
from trainer.hooks import Hook, LoopState
from trainer.summaries import TensorBoard


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps: one line, exit code 1 (a failed run, not a bad command)."""

    exit_code = 1


def _values(g):
    """The dense values of a gradient (an embedding's IndexedSlices carry theirs in `.values`)."""
    return g.values if isinstance(g, tf.IndexedSlices) else g


def local_flags(loss: tf.Tensor, grads: list) -> tf.Tensor:
    """float32 [1 + len(grads)]: 1 where this replica's loss / gradient i holds a NaN or Inf, else 0."""
    checks = [tf.reduce_all(tf.math.is_finite(loss))]
    checks += [tf.reduce_all(tf.math.is_finite(_values(g))) for g in grads]
    return 1.0 - tf.cast(tf.stack(checks), tf.float32)


def first_bad(flags: tf.Tensor) -> tf.Tensor:
    """0 when every flag is clear; else 1 + the index of the first set flag (1: the loss, 2: gradient 0...)."""
    set_flags = tf.cast(flags > 0, tf.int32)
    position = tf.cast(tf.argmax(set_flags), tf.int32) + 1
    return tf.where(tf.reduce_any(flags > 0), position, 0)


def poison(grads: list, ok: tf.Tensor) -> list:
    """`grads` unchanged when `ok`; else with the first gradient replaced by NaNs (for the loss-scale optimizer)."""
    g = grads[0]
    nan = tf.constant(float("nan"), _values(g).dtype)
    if isinstance(g, tf.IndexedSlices):
        g = tf.IndexedSlices(tf.where(ok, g.values, nan), g.indices, g.dense_shape)
    else:
        g = tf.where(ok, g, nan)
    return [g, *grads[1:]]


def describe(position: int, variable_paths: list[str], level_names: list[str]) -> str:
    """`loss` or `gradient of classifier/output/dense/bias (level output)` for a `first_bad` value."""
    if position <= 1:
        return "loss"
    path = variable_paths[position - 2]
    level = next((part for part in path.split("/") if part in level_names), None)
    return f"gradient of {path}" + (f" (level {level})" if level else "")


class NonFiniteGuard(Hook):
    """Counts skipped steps (every rank sees the same agreed flag), reports them, stops after too many in a row."""

    def __init__(self, *, rank: int, max_bad_steps: int, tb: TensorBoard, variable_paths: list[str],
                 level_names: list[str]):
        self.rank, self.max_bad_steps, self.tb = rank, max_bad_steps, tb
        self.variable_paths, self.level_names = variable_paths, level_names
        self.consecutive = 0
        self.total = 0

    def on_step_end(self, state: LoopState) -> None:
        if not state.nonfinite or state.steps_in_call > 1:  # a call ends at its first skipped step: the rest were good
            self.consecutive = 0
        if not state.nonfinite:
            return
        self.consecutive += 1
        self.total += 1
        what = describe(state.nonfinite, self.variable_paths, self.level_names)
        print(f"strata: rank {self.rank}: step {state.step} skipped on all ranks: non-finite {what} "
              f"({self.consecutive} in a row, {self.total} in total)", file=sys.stderr, flush=True)
        self.tb.scalars(state.step, {"skipped_steps": float(self.total)}, prefix="train")
        if self.consecutive >= self.max_bad_steps:
            self.tb.flush()
            raise TrainingDiverged(
                f"training diverged: {self.consecutive} consecutive steps up to step {state.step} skipped for a "
                f"non-finite value (first non-finite: {what}); stopped at train.max_bad_steps="
                f"{self.max_bad_steps}; lower optimizer.lr, set optimizer.clip_norm, or check the data")

    def on_log(self, state: LoopState) -> None:
        self.tb.scalars(state.step, {"skipped_steps": float(self.total)}, prefix="train")
