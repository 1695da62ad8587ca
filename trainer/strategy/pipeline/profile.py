"""What each level of a model costs on one micro-batch: measured forward+backward time (what `partition: auto`
balances), parameters, and an estimate of the activations its forward keeps."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import tensorflow as tf

from trainer.models.levels import LevelModel
from trainer.parallel.partition import balanced_partition
from trainer.tasks import Task, resolve


@dataclass
class LevelCost:
    """What one level costs on one micro-batch (measured time, counted parameters, estimated activations)."""

    name: str
    seconds: float  # forward + backward, median of the timed repeats
    params: int
    activation_bytes: float  # float tensors the level's forward creates, per micro-batch (an upper bound)
    input_bytes: float = 0.0  # the level's input carry per micro-batch (what recomputation keeps)


def profile_levels(model: LevelModel, example: Mapping[str, Any], task: str | Task, device: str,
                   repeats: int = 3) -> list[LevelCost]:
    """Time each level's forward+backward on `example` (one micro-batch) on `device`.

    The model is run level by level eagerly to get each level's input; each level is then compiled alone
    and timed (median of `repeats` runs of 3 calls, after a warm-up). Builds the model if needed.
    """
    def timed(i: int, carry: Mapping[str, tf.Tensor]) -> float:
        fb = _forward_backward(model, i, resolve(task), example if i == model.num_levels - 1 else None)
        fb(carry)  # trace + warm up
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            for _ in range(3):
                result = fb(carry)
            _ = [np.asarray(r) for r in tf.nest.flatten(result)]  # wait for the device
            times.append((time.perf_counter() - begin) / 3)
        return statistics.median(times)

    return _walk_levels(model, example, device, timed)


def static_costs(model: LevelModel, example: Mapping[str, Any]) -> list[LevelCost]:
    """Parameters and activation estimates per level, without timing anything (seconds = 0)."""
    return _walk_levels(model, example, None, lambda i, carry: 0.0)


def _walk_levels(model: LevelModel, example: Mapping[str, Any], device: str | None,
                 seconds: Callable[[int, Mapping[str, tf.Tensor]], float]) -> list[LevelCost]:
    costs = []
    with tf.device(device):
        carry = {k: tf.cast(example[k], spec.dtype) for k, spec in model.input_specs.items()}
        for i, level in enumerate(model.levels):
            out = model.run_levels(carry, i, i + 1, training=False)  # builds the level, gives next input
            params = int(sum(np.prod(v.shape) for v in level.trainable_variables))
            inputs = float(sum(v.shape.num_elements() * v.dtype.size for v in carry.values()))
            costs.append(LevelCost(level.name, seconds(i, carry), params, _activation_bytes(model, i, carry), inputs))
            carry = out
    return costs


def balanced_by_params(costs: list[LevelCost], stages: int) -> list[tuple[int, int]]:
    """The split that balances parameter counts (a stand-in for `auto` when nothing was timed)."""
    return balanced_partition([float(max(c.params, 1)) for c in costs], stages)


def _forward_backward(model: LevelModel, index: int, task: Task, batch: Mapping[str, Any] | None) -> Callable:
    """A compiled forward+backward of one level (the last level differentiates the loss)."""
    level = model.levels[index]

    @tf.function
    def fb(carry):
        inputs = [carry[k] for k in sorted(carry) if carry[k].dtype.is_floating]
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            out = model.run_levels(carry, index, index + 1, training=True)
            if batch is not None:
                target = tf.reduce_sum(task.per_example_loss(batch, out))
            else:
                target = tf.add_n([tf.reduce_sum(tf.cast(v, tf.float32)) for v in out.values()
                                   if v.dtype.is_floating])
        grads = tape.gradient(target, inputs + list(level.trainable_variables))
        return [g for g in grads if g is not None]

    return fb


def _activation_bytes(model: LevelModel, index: int, carry: Mapping[str, tf.Tensor]) -> float:
    """Bytes of every float tensor the level's forward graph produces for this micro-batch: what a tape
    may keep for the backward (an upper bound; the real figure depends on which the gradient needs)."""
    fn = tf.function(lambda c: model.run_levels(c, index, index + 1, training=True))
    graph = fn.get_concrete_function({k: tf.TensorSpec.from_tensor(v) for k, v in carry.items()}).graph
    total = 0.0
    for op in graph.get_operations():
        if op.type in ("Placeholder", "Const", "ReadVariableOp", "VarHandleOp", "NoOp", "Identity"):
            continue
        for t in op.outputs:
            if t.dtype.is_floating and t.shape.is_fully_defined():
                total += t.shape.num_elements() * t.dtype.size
    return total


def describe_costs(costs: list[LevelCost]) -> str:
    """The measured per-level table printed before training (what `auto` balanced)."""
    lines = ["level costs (forward+backward per micro-batch, measured):"]
    width = max(len(c.name) for c in costs)
    for c in costs:
        lines.append(f"  {c.name.ljust(width)}  {c.seconds * 1e3:8.3f} ms  {c.params:>10,d} params  "
                     f"~{c.activation_bytes / 2**20:8.2f} MiB activations")
    return "\n".join(lines)
