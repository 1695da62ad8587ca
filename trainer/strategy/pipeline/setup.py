"""From `distribution.pipeline` to a running `PipelineEngine` (`build_pipeline`): devices, measured level
costs, the split, the report printed at the start.

    devices = stage_devices(cfg.distribution.pipeline, local_rank)    # devices.py
    costs = profile_levels(new_model(), example, task, devices[0])   # profile.py; partition: auto only
    partition = choose_partition(cfg, level_names, costs, memory)
    engine = PipelineEngine(model, task, partition, devices, ...).build(example)

`auto` partitioning measures each level's forward+backward time on a micro-batch on the stage device,
its parameter bytes (weights, gradients, Adam moments) and an activation-memory estimate, then picks the
contiguous split whose slowest stage is fastest within each device's memory (trainer/parallel/partition.py
`balanced_partition`). Every replica measures and the times are averaged over replicas, so all replicas
choose the same split.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import keras
import numpy as np
import tensorflow as tf

from trainer.config import ExperimentConfig
from trainer.errors import ConfigError
from trainer.models.levels import LevelModel
from trainer.parallel.layout import Layout
from trainer.parallel.partition import balanced_partition, explicit_partition, stage_costs
from trainer.parallel.report import PipelineReport, format_report
from trainer.parallel.zero import shard_bytes
from trainer.strategy.pipeline.devices import device_memory_bytes, stage_devices
from trainer.strategy.pipeline.engine import PipelineEngine
from trainer.strategy.pipeline.profile import LevelCost, describe_costs, profile_levels, static_costs

# Adam in fp32: weights + gradients + two moments.
BYTES_PER_PARAM = 16.0


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
                        bytes_per_param=shard_bytes(1, replicas, cfg.distribution.zero).total,
                        zero=cfg.distribution.zero)


def build_pipeline(cfg: ExperimentConfig, layout: Layout, strategy: Any, new_model: Callable[[], LevelModel],
                   train_arrays: Mapping[str, np.ndarray]) -> tuple[LevelModel, Any]:
    """Build the model with each stage's variables on its device, and the engine that trains it.

    With `partition: auto`, a throw-away copy of the model is profiled first (costs averaged over
    replicas so every replica picks the same split) and the random seed is reset afterwards, so the
    trained model starts from exactly the weights an unpipelined run would.
    """
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
