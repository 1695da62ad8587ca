"""From `distribution.pipeline` to a running `PipelineEngine`: devices, measured level costs, the split.

    devices = stage_devices(cfg.distribution.pipeline, local_rank)    # before TensorFlow's runtime starts
    costs = profile_levels(build_fn, example, task, devices[0], ...)  # partition: auto only
    partition = choose_partition(cfg, costs, strategy)
    engine = PipelineEngine(model, ..., partition, devices, ...).build(example)

`auto` partitioning measures each level's forward+backward time on a micro-batch on the stage device,
its parameter bytes (weights, gradients, Adam moments) and an activation-memory estimate, then picks the
contiguous split whose slowest stage is fastest within each device's memory
(`trainer/parallel/partition.py` `balanced_partition`). Every replica measures, the times are averaged over replicas, so all
replicas choose the same split.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import tensorflow as tf

from trainer.config import ExperimentConfig, PipelineConfig
from trainer.errors import ConfigError
from trainer.models.levels import LevelModel
from trainer.tasks import Task, resolve
from trainer.parallel.layout import Layout, stage_device_names
from trainer.parallel.partition import balanced_partition, explicit_partition, stage_costs
from trainer.parallel.report import PipelineReport, format_report

# Adam in fp32: weights + gradients + two moments.
BYTES_PER_PARAM = 16.0


def stage_devices(pipe: PipelineConfig, local_rank: int = 0) -> list[str]:
    """One device per stage for this process: explicit `devices`, else the local rank's block of K GPUs,
    else K logical CPU devices (created here: call before TensorFlow's runtime starts)."""
    k = pipe.stages
    if pipe.devices is not None:
        _check_devices_exist(pipe.devices)
        return list(pipe.devices)
    gpus = len(tf.config.list_physical_devices("GPU"))
    if gpus:
        names = stage_device_names(k, local_rank, gpus)
        if (local_rank + 1) * k > gpus:
            raise ConfigError(
                f"local rank {local_rank} needs GPUs {names[0]}..{names[-1]} for {k} pipeline stages but "
                f"{gpus} are visible; start fewer ranks per node or use fewer stages"
            )
        return names
    from trainer.strategy.tf_distribute import use_logical_cpus

    try:
        return use_logical_cpus(k)
    except RuntimeError as err:  # the runtime started before the devices were split
        raise RuntimeError(f"pipeline stages need {k} logical CPU devices: {err}") from None


def _check_devices_exist(devices: list[str]) -> None:
    """Explicit stage devices must be devices of this process (TensorFlow would silently place elsewhere)."""
    specs = (tf.DeviceSpec.from_string(d.name) for d in tf.config.list_logical_devices())
    have_short = {(d.device_type, d.device_index) for d in specs}
    for name in devices:
        spec = tf.DeviceSpec.from_string(name)
        if ((spec.device_type or "").upper(), spec.device_index or 0) not in have_short:
            shown = ", ".join(sorted(f"/{t.lower()}:{i}" for t, i in have_short))
            raise ConfigError(f"distribution.pipeline.devices: {name} is not a device of this process (it has "
                              f"{shown}); name existing devices, or leave devices unset to use the GPUs or "
                              "logical CPU devices")


def gpu_indices(devices: list[str]) -> list[int]:
    """Physical GPU indices named by stage devices (`/gpu:3` -> 3); empty for CPU stages."""
    out = []
    for d in devices:
        spec = tf.DeviceSpec.from_string(d)
        if (spec.device_type or "").upper() == "GPU":
            out.append(spec.device_index or 0)
    return out


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


def choose_partition(cfg: ExperimentConfig, level_names: list[str], costs: list[LevelCost] | None,
                     device_memory: float | None) -> list[tuple[int, int]]:
    """The explicit partition, or the balanced one for the measured costs (within `device_memory`)."""
    pipe = cfg.distribution.pipeline
    assert pipe is not None
    if pipe.partition != "auto":
        return explicit_partition(level_names, pipe.partition)
    assert costs is not None
    memory = None
    if device_memory is not None:
        memory = [c.params * BYTES_PER_PARAM + c.activation_bytes * pipe.micro_batches for c in costs]
    try:
        return balanced_partition([c.seconds for c in costs], pipe.stages, memory=memory,
                                  capacity=device_memory if memory is not None else None)
    except ValueError as err:
        raise ConfigError(f"distribution.pipeline.partition auto: {err}") from None


def device_memory_bytes(pipe: PipelineConfig, devices: list[str]) -> float | None:
    """Per-device memory: the config's `device_memory_gb`, else what the first GPU reports, else None."""
    if pipe.device_memory_gb is not None:
        return pipe.device_memory_gb * 2.0**30
    gpus = gpu_indices(devices)
    if gpus:
        try:
            details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[gpus[0]])
            limit = details.get("memory_limit") or details.get("device_memory_size")
            return float(limit) if limit else None
        except (IndexError, ValueError):
            return None
    return None


def describe_costs(costs: list[LevelCost]) -> str:
    """The measured per-level table printed before training (what `auto` balanced)."""
    lines = ["level costs (forward+backward per micro-batch, measured):"]
    width = max(len(c.name) for c in costs)
    for c in costs:
        lines.append(f"  {c.name.ljust(width)}  {c.seconds * 1e3:8.3f} ms  {c.params:>10,d} params  "
                     f"~{c.activation_bytes / 2**20:8.2f} MiB activations")
    return "\n".join(lines)


def make_report(cfg: ExperimentConfig, level_names: list[str], partition: list[tuple[int, int]],
              devices: list[str], replicas: int, costs: list[LevelCost] | None,
              device_memory: float | None, *, timed: bool = True) -> PipelineReport:
    """The `strata plan` view of this run (also printed at the start of training). Stage times (and the
    imbalance warning) only when `timed`, i.e. the costs were measured."""
    pipe = cfg.distribution.pipeline
    assert pipe is not None
    names = [level_names[a:b] for a, b in partition]
    per_stage = None if costs is None or not timed else stage_costs([c.seconds for c in costs], partition)
    params = None if costs is None else [sum(c.params for c in costs[a:b]) for a, b in partition]
    acts = None if costs is None else [sum(c.activation_bytes for c in costs[a:b]) for a, b in partition]
    boundary = None if costs is None else [costs[a].input_bytes for a, _ in partition]
    return PipelineReport(stages=pipe.stages, micro_batches=pipe.micro_batches, schedule=pipe.schedule,
                        stage_levels=names, global_batch=cfg.data.batch_size, replicas=replicas,
                        stage_params=params, stage_activation_bytes=acts, stage_costs=per_stage,
                        recompute=pipe.recompute, stage_boundary_bytes=boundary,
                        balanced=timed and pipe.partition == "auto",
                        devices=list(devices), device_memory_bytes=device_memory,
                        bytes_per_param=BYTES_PER_PARAM)


__all__ = ["LevelCost", "balanced_by_params", "build_pipeline", "choose_partition", "static_costs", "describe_costs", "device_memory_bytes", "format_report",
           "gpu_indices", "make_report", "profile_levels", "stage_devices"]


def build_pipeline(cfg: ExperimentConfig, layout: Layout, strategy: Any, new_model: Callable[[], LevelModel],
                   train_arrays: Mapping[str, np.ndarray]) -> tuple[LevelModel, Any]:
    """Build the model with each stage's variables on its device, and the engine that trains it.

    With `partition: auto`, a throw-away copy of the model is profiled first (costs averaged over
    replicas so every replica picks the same split) and the random seed is reset afterwards, so the
    trained model starts from exactly the weights an unpipelined run would.
    """
    import keras

    from trainer.strategy.pipeline import PipelineEngine

    pipe = cfg.distribution.pipeline
    assert pipe is not None
    devices = stage_devices(pipe, strategy.local_rank)
    example = {k: tf.constant(v[:layout.micro_batch_size]) for k, v in train_arrays.items()}
    memory = device_memory_bytes(pipe, devices)
    level_names = cfg.model.level_names()
    costs = None
    if pipe.partition == "auto":
        costs = profile_levels(new_model(), example, cfg.task, devices[0], repeats=pipe.profile_steps)
        mean = strategy.all_reduce_sum({c.name: c.seconds for c in costs})
        for c in costs:
            c.seconds = mean[c.name] / strategy.world_size
        keras.utils.set_random_seed(cfg.seed)  # the profiled copy drew from the RNG: start over
    partition = choose_partition(cfg, level_names, costs, memory)
    model = new_model()
    engine = PipelineEngine(model, cfg.task, partition, devices, micro_batches=pipe.micro_batches,
                            schedule=pipe.schedule, recompute=pipe.recompute, global_batch=cfg.data.batch_size)
    engine.build(cfg.task.model_inputs({k: v[:2] for k, v in example.items()}))
    if strategy.is_chief:
        timed = costs is not None
        if timed:
            print(describe_costs(costs), flush=True)
        else:  # explicit split: still show parameters and activation estimates per stage
            costs = static_costs(model, example)
        report = make_report(cfg, level_names, partition, devices, strategy.num_replicas, costs, memory, timed=timed)
        print(format_report(report), flush=True)
    return model, engine
