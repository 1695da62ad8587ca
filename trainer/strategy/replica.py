"""One replica of the model, laid out as the layout says: the model, its optimizer and its gradient engine.

Without a pipeline, the model is built inside the strategy's scope (tf.distribute mirrors its variables
onto the replicas) and an `AccumulatingEngine` computes its gradients. With one, each stage's levels are
built on that stage's device (trainer/strategy/pipeline/setup.py) and a `PipelineEngine` runs the
micro-batches through them; every backend that allows a pipeline (single, horovod, multi_worker) has a
scope that leaves variables where they are created. Either way the optimizer is built in the same scope,
and the training step only ever sees `engine.gradients(batch)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import keras
import numpy as np
import tensorflow as tf

from trainer.config import ExperimentConfig
from trainer.models.levels import LevelModel
from trainer.optim import build_optimizer, uses_loss_scaling
from trainer.parallel.layout import Layout
from trainer.strategy.base import Strategy
from trainer.strategy.engine import AccumulatingEngine, GradientEngine


@dataclass
class Replica:
    model: LevelModel
    optimizer: keras.optimizers.Optimizer
    engine: GradientEngine


def build_replica(cfg: ExperimentConfig, layout: Layout, strategy: Strategy, new_model: Callable[[], LevelModel],
                  train_arrays: Mapping[str, np.ndarray]) -> Replica:
    """The model with its variables created (on their devices), its optimizer (built) and its engine."""
    engine: GradientEngine | None = None
    with strategy.scope():
        if layout.pipelined:
            from trainer.strategy.pipeline.setup import build_pipeline  # TensorFlow-heavy: only when used

            model, engine = build_pipeline(cfg, layout, strategy, new_model, train_arrays)
        elif layout.zero == 3:  # no rank ever holds the whole model (trainer/strategy/zero3.py)
            return _zero3_replica(cfg, layout, strategy, new_model, train_arrays)
        else:
            model = new_model()
            model({k: tf.constant(v[:2]) for k, v in cfg.task.model_inputs(train_arrays).items()})  # variables
        strategy.zero_state = None
        if layout.zero:  # each rank builds the optimizer over its slices only (trainer/strategy/zero.py)
            optimizer = _sharded_optimizer(cfg, layout, strategy, model, engine)
        else:
            optimizer = build_optimizer(cfg.optimizer, total_steps=cfg.train.steps,
                                        num_replicas=strategy.num_replicas, mixed_precision=cfg.train.mixed_precision)
            optimizer.build(model.trainable_variables)
    if engine is None:
        scale = optimizer.scale_loss if uses_loss_scaling(optimizer, cfg.train.mixed_precision) else None
        engine = AccumulatingEngine(model, cfg.task, global_batch=layout.global_batch, grad_accum=layout.grad_accum,
                                    scale_loss=scale)
    return Replica(model, optimizer, engine)


def _unclipped_optimizer(cfg: ExperimentConfig, strategy: Strategy) -> Callable[[], keras.optimizers.Optimizer]:
    """A factory of the configured optimizer without global_clipnorm: a sharded update clips by the global
    norm itself (Keras would see only this rank's slices)."""
    unclipped = cfg.optimizer.model_copy(update={"clip_norm": None})

    def new_optimizer():
        return build_optimizer(unclipped, total_steps=cfg.train.steps, num_replicas=strategy.num_replicas,
                               mixed_precision=cfg.train.mixed_precision)

    return new_optimizer


def _zero3_replica(cfg: ExperimentConfig, layout: Layout, strategy: Strategy, new_model: Callable[[], LevelModel],
                   train_arrays: Mapping[str, np.ndarray]) -> Replica:
    """ZeRO 3: the model built deferred (no variable allocated), each level's parameters initialised once and
    cut to this rank's slice; the optimizer over the slices; the level-by-level engine."""
    from trainer.errors import ConfigError
    from trainer.strategy.zero3 import Zero3Engine, build_deferred

    model = new_model()
    build_deferred(model, {k: tf.constant(v[:2]) for k, v in cfg.task.model_inputs(train_arrays).items()})
    try:
        state = strategy.shard_levels(model, _unclipped_optimizer(cfg, strategy), clip_norm=cfg.optimizer.clip_norm)
    except ValueError as err:  # a level the mechanism cannot shard (shared or non-trainable variables)
        raise ConfigError(f"distribution.zero 3: {err}") from None
    engine = Zero3Engine(state, cfg.task, global_batch=layout.global_batch, grad_accum=layout.grad_accum)
    if strategy.is_chief and _generates(cfg):
        print("strata: note: distribution.zero 3: evaluation during training omits what decodes text or draws "
              "from the whole model (ROUGE, the attention image); `strata evaluate RUN_DIR` computes them", flush=True)
    return Replica(model, state.optimizer, engine)


def _generates(cfg: ExperimentConfig) -> bool:
    """Whether the task's evaluation has parts beyond batch counts (which need the whole model at once)."""
    from trainer.tasks.base import Task

    kind = type(cfg.task)
    return kind.extra_metrics is not Task.extra_metrics or kind.eval_summaries is not Task.eval_summaries


def _sharded_optimizer(cfg: ExperimentConfig, layout: Layout, strategy: Strategy, model: LevelModel,
                       engine: GradientEngine | None):
    """ZeRO 1/2: the strategy's sharded optimizer over the model's trainable variables; its Keras optimizer
    (over this rank's slices) is the run's optimizer. A pipelined replica (`engine` a PipelineEngine) shards
    each stage's variables on that stage's device."""
    new_optimizer = _unclipped_optimizer(cfg, strategy)
    stages = engine.stage_of(model.trainable_variables) if engine is not None else None
    state = strategy.shard_optimizer(model.trainable_variables, new_optimizer, stage=layout.zero,
                                     clip_norm=cfg.optimizer.clip_norm, stages=stages,
                                     devices=engine.devices if engine is not None else None)
    return state.optimizer
