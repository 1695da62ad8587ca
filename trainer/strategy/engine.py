"""One replica's gradients, behind one interface the training step calls (inside the compiled step):

    loss, grads, extras = engine.gradients(batch)

`batch` is this replica's rows of the global batch; `loss` is sum(per-example loss) / GLOBAL batch (the
convention of trainer/strategy/base.py, so that summing over replicas gives the mean's gradient); `grads`
has one entry per `model.trainable_variables` (None where the loss does not depend on a variable);
`extras` are the engine's own measurements, of which the ones named in `reported` join the step's outputs
(summed over replicas) and `logs` turns them into logged scalars.

Two engines: `AccumulatingEngine` (below: the whole model on one device, `grad_accum` micro-steps, float16
loss scaling) and `PipelineEngine` (trainer/strategy/pipeline/: stages on their devices, micro-batches
flowing through them). `build_replica` (trainer/strategy/replica.py) picks one from the layout. What
happens to the gradients next, the sum over replicas and the optimizer update, is `Strategy.make_update`'s.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import tensorflow as tf

from trainer.models.levels import LevelModel
from trainer.tasks import Task


class GradientEngine(Protocol):
    """Computes one replica's loss and gradients (see the module docstring)."""

    reported: tuple[str, ...]  # extras that join the step's outputs

    def gradients(self, batch: dict) -> tuple[tf.Tensor, list, dict[str, tf.Tensor]]: ...

    def logs(self, outputs: dict, replicas: int) -> dict[str, float]: ...


class AccumulatingEngine:
    """The whole model on one device: the replica's batch in `grad_accum` equal micro-steps, their gradients
    summed; with `scale_loss` (float16) each micro-step's loss is scaled before differentiating (the
    loss-scale optimizer unscales the gradients it applies)."""

    reported: tuple[str, ...] = ()

    def __init__(self, model: LevelModel, task: Task, *, global_batch: int, grad_accum: int = 1,
                 scale_loss: Callable[[tf.Tensor], tf.Tensor] | None = None) -> None:
        self.model, self.task = model, task
        self.global_batch, self.grad_accum, self.scale_loss = global_batch, grad_accum, scale_loss

    def gradients(self, batch: dict) -> tuple[tf.Tensor, list, dict[str, tf.Tensor]]:
        variables = self.model.trainable_variables
        micro = tf.shape(next(iter(batch.values())))[0] // self.grad_accum  # the shape is this replica's share
        grads, loss = None, tf.constant(0.0)
        for i in range(self.grad_accum):  # a Python loop: unrolled in the compiled step
            part = {k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}
            with tf.GradientTape() as tape:
                outputs = self.model(self.task.model_inputs(part), training=True)
                # Normalise by the GLOBAL batch; replicas' gradients are then summed (strategy/base.py).
                part_loss = tf.reduce_sum(self.task.per_example_loss(part, outputs)) / self.global_batch
                scaled = self.scale_loss(part_loss) if self.scale_loss is not None else part_loss
            part_grads = tape.gradient(scaled, variables)
            grads = part_grads if grads is None else [_add(g, d) for g, d in zip(grads, part_grads)]
            loss += part_loss
        return loss, grads, {}

    def logs(self, outputs: dict, replicas: int) -> dict[str, float]:
        return {}


def _add(a: Any, b: Any) -> Any:
    """Sum two gradients; embedding gradients are IndexedSlices, whose sum is their concatenation."""
    if isinstance(a, tf.IndexedSlices) and isinstance(b, tf.IndexedSlices):
        return tf.IndexedSlices(tf.concat([a.values, b.values], 0), tf.concat([a.indices, b.indices], 0), a.dense_shape)
    return tf.convert_to_tensor(a) + tf.convert_to_tensor(b)
