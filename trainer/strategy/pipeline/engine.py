"""Pipeline-parallel engine: one replica's forward/backward over K stages on K devices, M micro-batches.

A `LevelModel` is cut into K contiguous level slices (`partition`, see trainer/parallel/partition.py); stage s runs
`model.run_levels(carry, start, stop)` under `tf.device(devices[s])` and hands its output carry to stage
s+1. The replica's batch is split into M equal micro-batches, and each stage executes the forward ("F")
and backward ("B") ops of `trainer/parallel/schedule.py` `make_schedule(schedule, K, M)` in exactly that order:

    engine = PipelineEngine(model, "summarization", [(0, 2), (2, 5)], ["/cpu:0", "/cpu:1"],
                            micro_batches=4, schedule="1f1b", recompute=False, global_batch=64)
    engine.build()                       # eager, before anything else: creates each stage's variables on its device

    @tf.function
    def step(batch):
        loss, grads, extras = engine.gradients(batch)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

How it works inside ONE tf.function (static Python loops over stages and micro-batches):
  * F(s, m): the stage forward inside its own `tf.GradientTape`, watching the float tensors of the input
    carry (int/bool keys - token ids, masks - carry no gradient); the last stage also computes the
    micro-batch loss sum(per_example_loss) / global_batch (strategy/base.py's convention).
  * B(s, m): `tape.gradient(stage outputs, float inputs + stage variables, output_gradients=<gradients
    received from stage s+1>)`; the last stage differentiates its loss. Variable gradients are summed over
    micro-batches on the stage's device; input gradients go to stage s-1.
  * With `recompute=True`, F keeps only the stage's input carry (no tape) and B re-runs the stage forward
    under a tape first, so a stage holds boundary activations only (trading ~1 extra forward).
  * Per-stage order: every op of a stage carries control dependencies on the previous op of the SAME
    stage, so 1F1B really frees micro-batch m's activations before its next forward (at most K - s live
    on stage s) while GPipe holds all M. Ops of different stages have only data dependencies between
    them, so TensorFlow runs them concurrently - given inter-op threads >= K
    (`tf.config.threading.set_inter_op_parallelism_threads`).

The engine computes one replica's gradients; reducing them over data-parallel replicas stays the job of
the strategy (`Strategy.make_update`). step.py builds a step's graph.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from trainer.models.levels import Carry, LevelModel
from trainer.parallel.partition import stage_level_names
from trainer.parallel.schedule import make_schedule
from trainer.strategy.pipeline.step import StepGraph
from trainer.tasks import Task, resolve


def split_micro_batches(batch: Mapping[str, Any], micro_batches: int) -> list[dict[str, tf.Tensor]]:
    """Split every tensor of `batch` into `micro_batches` equal parts along axis 0, in order.

    Raises ValueError when the (static) batch size is not a multiple of `micro_batches` or the keys
    disagree on it; with an unknown static size the same check runs in the graph.
    """
    if not isinstance(micro_batches, int) or isinstance(micro_batches, bool) or micro_batches < 1:
        raise ValueError(f"micro_batches must be a positive integer, got {micro_batches!r}")
    if not batch:
        raise ValueError("the batch is empty; nothing to split into micro-batches")
    tensors = {k: tf.convert_to_tensor(v) for k, v in batch.items()}
    for key, value in tensors.items():
        if value.shape.rank == 0:
            raise ValueError(f"batch['{key}'] is a scalar; every batch value needs a leading batch axis")
    static = {k: v.shape[0] for k, v in tensors.items() if v.shape[0] is not None}
    if len(set(static.values())) > 1:
        raise ValueError(f"batch keys disagree on the batch size: {static}")
    checks = []
    if static:
        size = next(iter(static.values()))
        if size % micro_batches:
            raise ValueError(
                f"a batch of {size} examples does not split into {micro_batches} equal micro-batches; "
                f"make the per-replica batch a multiple of {micro_batches} (e.g. "
                f"{max(1, size // micro_batches) * micro_batches}) or change pipeline micro_batches"
            )
    else:
        size_t = tf.shape(next(iter(tensors.values())))[0]
        checks.append(tf.debugging.assert_equal(
            size_t % micro_batches, 0,
            message=f"the batch size is not a multiple of micro_batches={micro_batches}"))
    with tf.control_dependencies(checks):
        parts = {k: tf.split(v, micro_batches, axis=0) for k, v in tensors.items()}
    return [{k: parts[k][m] for k in tensors} for m in range(micro_batches)]


def _same_device(actual: str, wanted: str) -> bool:
    a, w = tf.DeviceSpec.from_string(actual), tf.DeviceSpec.from_string(wanted)
    return (a.device_type or "").upper() == (w.device_type or "").upper() and (a.device_index or 0) == (
        w.device_index or 0
    )


def _levels_with_dropout(model: LevelModel) -> list[str]:
    """Names of the levels that draw random numbers when training (any dropout with a rate > 0)."""
    found = []
    for level in model.levels:
        for layer in level._flatten_layers(include_self=True):
            rates = [getattr(layer, a, 0.0) for a in ("rate", "dropout", "recurrent_dropout")]
            if any(isinstance(r, (int, float)) and r > 0 for r in rates):
                found.append(level.name)
                break
    return found


class PipelineEngine:
    """Runs one replica's pipelined forward/backward; see the module docstring."""

    reported = ("stage_busy_s", "step_span_s")  # extras that join the step's outputs (see `logs`)

    def __init__(
        self,
        model: LevelModel,
        task: str | Task,
        partition: Sequence[tuple[int, int]],
        devices: Sequence[str],
        micro_batches: int,
        schedule: str = "1f1b",
        recompute: bool = False,
        global_batch: int | None = None,
    ) -> None:
        self.model = model
        self.task = resolve(task)
        self.partition = [(int(a), int(b)) for a, b in partition]
        self.stage_levels = stage_level_names(model.level_names, self.partition)  # validates the partition
        self.devices = list(devices)
        if len(self.devices) != len(self.partition):
            raise ValueError(f"{len(self.partition)} stages but {len(self.devices)} devices; give one device per stage")
        if self.task.name != model.task:
            raise ValueError(f"task {self.task.name!r} does not match the model's task {model.task!r}")
        self.micro_batches = micro_batches
        self.schedule_name = schedule
        self.schedule = make_schedule(schedule, len(self.partition), micro_batches)  # validates both
        if not isinstance(global_batch, numbers.Integral) or isinstance(global_batch, bool) or global_batch < 1:
            raise ValueError(
                f"global_batch must be a positive integer (the batch over ALL replicas), got {global_batch!r}"
            )
        self.global_batch = int(global_batch)
        self.recompute = recompute
        if recompute:
            # Keras dropout draws a fresh mask when a stage re-runs, so the backward would differentiate a
            # different function than the forward whose outputs the next stage consumed.
            random_levels = _levels_with_dropout(model)
            if random_levels:
                raise ValueError(
                    f"recompute needs a deterministic forward, but levels {', '.join(random_levels)} use dropout; "
                    "set model.dropout=0.0 or turn recompute off"
                )
        self._stage_variables: list[list[Any]] | None = None
        self._slot: dict[int, tuple[int, int]] = {}  # id(variable) -> (stage, index in that stage)
        # (stage, "F"|"B", micro-batch) -> the tensors that mark that op done, from the latest trace of
        # `gradients`: lets tests check the per-stage order in the graph (tf.function graphs only).
        self.op_markers: dict[tuple[int, str, int], list[tf.Tensor]] = {}
        # (stage, "F"|"B", micro-batch) of each row of the `op_intervals` extra, from the latest trace.
        self.op_labels: list[tuple[int, str, int]] = []

    @property
    def num_stages(self) -> int:
        return len(self.partition)

    @staticmethod
    def logs(outputs: dict, replicas: int) -> dict[str, float]:
        """Per-stage compute time and idle (bubble) fraction of the latest step, averaged over replicas (the
        step's outputs are summed over replicas)."""
        busy = np.asarray(outputs["stage_busy_s"], dtype=np.float64) / replicas
        span = max(float(outputs["step_span_s"]) / replicas, 1e-12)
        logs = {}
        for s, seconds in enumerate(busy):
            logs[f"pipeline/stage_{s}_compute_ms"] = 1000.0 * seconds
            logs[f"pipeline/stage_{s}_idle_fraction"] = max(0.0, 1.0 - seconds / span)
        logs["pipeline/bubble_fraction"] = float(np.mean([logs[f"pipeline/stage_{s}_idle_fraction"]
                                                          for s in range(len(busy))]))
        logs["pipeline/step_span_ms"] = 1000.0 * span
        # Stage-seconds of compute per second of step: 1.0 = the stages ran one after another, K = all at
        # once; compute time excludes waits for a core (step.py `compute_seconds`), so at most K*M/(M+K-1).
        logs["pipeline/overlap"] = float(np.sum(busy)) / span
        return logs

    # ------------------------------------------------------------------------------------------ build
    def build(self, example_inputs: Mapping[str, Any] | None = None) -> "PipelineEngine":
        """Create each stage's variables on its device (one eager forward, stage by stage) and check them.

        Variables are created at a level's first call, so this must run before anything else calls the
        model. Levels already built create nothing; the placement of every stage's variables is checked.
        Raises ValueError if a variable sits on the wrong device or is shared by two stages.
        """
        if not tf.executing_eagerly():
            raise RuntimeError("PipelineEngine.build() must run eagerly, outside tf.function")
        if not all(level.built for level in self.model.levels):
            inputs = example_inputs if example_inputs is not None else self.model.example_inputs()
            carry = self.model_carry(inputs)
            # Under the model's name scope, as `model(...)` would be, so variable paths do not change.
            with keras.name_scope(self.model.name):
                for (start, stop), device in zip(self.partition, self.devices):
                    with tf.device(device):
                        carry = self.model.run_levels(carry, start, stop, training=False)
        stage_vars: list[list[Any]] = []
        owner: dict[int, int] = {}
        for s, (start, stop) in enumerate(self.partition):
            own = []
            for level in self.model.levels[start:stop]:
                for v in level.trainable_variables:
                    if id(v) in owner and owner[id(v)] != s:
                        raise ValueError(
                            f"variable {v.path} is used by stage {owner[id(v)]} and stage {s}; levels on "
                            "different stages must not share weights"
                        )
                    if id(v) not in owner:
                        owner[id(v)] = s
                        own.append(v)
            stage_vars.append(own)
        missing = [v.path for v in self.model.trainable_variables if id(v) not in owner]
        if missing:
            raise ValueError(f"trainable variables outside every level cannot be pipelined: {missing[:3]}")
        misplaced = [
            f"{v.path} on {self._device_of(v)} (stage {s} is {self.devices[s]})"
            for s, own in enumerate(stage_vars) for v in own
            if not _same_device(self._device_of(v), self.devices[s])
        ]
        if misplaced:
            raise ValueError(
                "variables are not on their stage's device - the model was built before "
                f"PipelineEngine.build(): {'; '.join(misplaced[:3])}"
            )
        self._stage_variables = stage_vars
        self._slot = {id(v): (s, i) for s, own in enumerate(stage_vars) for i, v in enumerate(own)}
        return self

    @staticmethod
    def _device_of(variable: Any) -> str:
        """The device a (Keras or tf) variable lives on."""
        return getattr(variable, "value", variable).device

    def stage_of(self, variables: Sequence[Any]) -> list[int]:
        """The stage owning each of `variables` (trainable variables of the built model)."""
        return [self._slot[id(v)][0] for v in variables]

    def placement(self) -> list[list[str]]:
        """Per stage, the devices its variables live on (for checks and `strata plan`-style reports)."""
        return [[self._device_of(v) for v in own] for own in self._built()]

    def _built(self) -> list[list[Any]]:
        if self._stage_variables is None:
            raise RuntimeError("call PipelineEngine.build() first: it places each stage's variables")
        return self._stage_variables

    def model_carry(self, batch: Mapping[str, Any]) -> Carry:
        """The model's inputs from a (micro-)batch, cast to the model's input dtypes: stage 0's carry."""
        missing = sorted(set(self.model.input_specs) - set(batch))
        if missing:
            raise KeyError(f"batch lacks model inputs {missing}; expected {sorted(self.model.input_specs)}")
        return {k: tf.cast(batch[k], spec.dtype) for k, spec in self.model.input_specs.items()}

    # ---------------------------------------------------------------------------------------- running
    def stage_forward(self, s: int, carry: Carry, batch: Mapping[str, tf.Tensor]) -> tuple[Carry, tf.Tensor | None]:
        """Stage s's levels on `carry`; the last stage also returns the micro-batch's loss (None before)."""
        start, stop = self.partition[s]
        out = self.model.run_levels(carry, start, stop, training=True)
        if s < self.num_stages - 1:
            return out, None
        # Normalised by the GLOBAL batch so summed micro-batch (and replica) gradients are the mean's.
        loss = tf.reduce_sum(self.task.per_example_loss(batch, out)) / self.global_batch
        return out, loss

    def gradients(self, batch: Mapping[str, Any]) -> tuple[tf.Tensor, list[tf.Tensor | None], dict[str, tf.Tensor]]:
        """Loss and gradients of this replica's batch, pipelined; call inside a tf.function.

        Returns (loss = sum over micro-batches of sum(per-example loss) / global_batch, one gradient per
        `model.trainable_variables` entry (None where the loss does not depend on it, like tape.gradient),
        extras {"micro_batch_losses": float32 [M], "stage_busy_s": float32 [K] seconds each stage computed
        (see step.py `compute_seconds`), "stage_wall_s": float32 [K] seconds each stage had an op in flight,
        "step_span_s": seconds from the first op's start to the last op's end, "op_intervals": float64
        [ops, 2] wall-clock start/end of each op, labelled by `self.op_labels`}). A stage's idle (bubble)
        fraction is 1 - stage_busy_s / step_span_s.
        """
        stage_vars = self._built()
        graph = StepGraph(self, split_micro_batches(batch, self.micro_batches), stage_vars)
        self.op_markers, self.op_labels = graph.markers, graph.labels  # filled in as the graph is built
        graph.build()
        return graph.result([self._slot[id(v)] for v in self.model.trainable_variables])


__all__ = ["PipelineEngine", "split_micro_batches"]
