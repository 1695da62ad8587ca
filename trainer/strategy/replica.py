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
        else:
            model = new_model()
            model({k: tf.constant(v[:2]) for k, v in cfg.task.model_inputs(train_arrays).items()})  # variables
        strategy.zero_state = None
        if layout.zero:  # each rank builds the optimizer over its slices only (trainer/strategy/zero.py)
            optimizer = _sharded_optimizer(cfg, layout, strategy, model)
        else:
            optimizer = build_optimizer(cfg.optimizer, total_steps=cfg.train.steps,
                                        num_replicas=strategy.num_replicas, mixed_precision=cfg.train.mixed_precision)
            optimizer.build(model.trainable_variables)
    if engine is None:
        scale = optimizer.scale_loss if uses_loss_scaling(optimizer, cfg.train.mixed_precision) else None
        engine = AccumulatingEngine(model, cfg.task, global_batch=layout.global_batch, grad_accum=layout.grad_accum,
                                    scale_loss=scale)
    return Replica(model, optimizer, engine)


def _sharded_optimizer(cfg: ExperimentConfig, layout: Layout, strategy: Strategy, model: LevelModel):
    """ZeRO: the strategy's sharded optimizer over the model's trainable variables; its Keras optimizer
    (over this rank's slices) is the run's optimizer. The global norm is clipped by the sharded update, not by
    Keras (which would see only this rank's slices)."""
    unclipped = cfg.optimizer.model_copy(update={"clip_norm": None})

    def new_optimizer():
        return build_optimizer(unclipped, total_steps=cfg.train.steps, num_replicas=strategy.num_replicas,
                               mixed_precision=cfg.train.mixed_precision)

    state = strategy.shard_optimizer(model.trainable_variables, new_optimizer, stage=layout.zero,
                                     clip_norm=cfg.optimizer.clip_norm)
    return state.optimizer
