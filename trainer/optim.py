"""Optimizer and learning-rate schedule from the config."""
from __future__ import annotations

import math

import keras
import tensorflow as tf

from trainer.config import OptimizerConfig, effective_warmup


class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak`, then constant, cosine or linear decay to `peak * min_ratio` at `total_steps`."""

    def __init__(self, peak: float, *, warmup_steps: int, total_steps: int, decay: str, min_ratio: float):
        self.peak, self.warmup_steps, self.total_steps = peak, warmup_steps, total_steps
        self.decay, self.min_ratio = decay, min_ratio

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = tf.cast(self.warmup_steps, tf.float32)
        warmup_lr = self.peak * (step + 1.0) / tf.maximum(warm, 1.0)
        progress = tf.clip_by_value((step - warm) / tf.maximum(float(self.total_steps) - warm, 1.0), 0.0, 1.0)
        if self.decay == "cosine":
            factor = 0.5 * (1.0 + tf.cos(math.pi * progress))
        elif self.decay == "linear":
            factor = 1.0 - progress
        else:
            factor = tf.ones_like(progress)
        decayed = self.peak * (self.min_ratio + (1.0 - self.min_ratio) * factor)
        return tf.where(step < warm, warmup_lr, decayed)

    def get_config(self) -> dict:
        return dict(peak=self.peak, warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                    decay=self.decay, min_ratio=self.min_ratio)


def build_optimizer(cfg: OptimizerConfig, *, total_steps: int, num_replicas: int,
                    mixed_precision: str) -> keras.optimizers.Optimizer:
    """Adam/AdamW/SGD with the schedule; clipping by global norm; loss scaling for float16.

    Plain SGD moves each weight by lr x its gradient, so a wrong gradient scale (a mean where a sum is due)
    changes its steps in proportion; Adam cancels a constant scale except through epsilon."""
    peak = cfg.lr * (num_replicas if cfg.scale_lr_with_replicas else 1)
    warmup, _ = effective_warmup(cfg.warmup_steps, total_steps)  # capped for short runs (config.py says why)
    schedule = WarmupSchedule(peak, warmup_steps=warmup, total_steps=total_steps,
                              decay=cfg.schedule, min_ratio=cfg.min_lr_ratio)
    kwargs = dict(learning_rate=schedule, global_clipnorm=cfg.clip_norm)
    if cfg.name == "adamw":
        opt = keras.optimizers.AdamW(weight_decay=cfg.weight_decay, **kwargs)
    elif cfg.name == "sgd":
        opt = keras.optimizers.SGD(momentum=cfg.momentum, **kwargs)
    else:
        opt = keras.optimizers.Adam(**kwargs)
    if cfg.name != "sgd":  # (SGD is linear in the gradient: the slices as they are give the same step)
        _merge_rows_before_update(opt)
    if mixed_precision == "float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def _merge_rows_before_update(opt: keras.optimizers.Optimizer) -> None:
    """Sum a sparse gradient's duplicate rows just before each variable's update (`merge_duplicate_rows`):
    Keras' Adam squares an IndexedSlices slice by slice. Here, after any all-reduce, it covers every strategy:
    TensorFlow's distribution strategies all-reduce IndexedSlices by concatenating the replicas' slices, so
    one row touched on two replicas arrives as two slices even when each replica merged its own."""
    update_step = opt.update_step

    def merged_update_step(gradient, variable, learning_rate):
        if isinstance(gradient, tf.IndexedSlices):
            gradient = merge_duplicate_rows([gradient])[0]
        return update_step(gradient, variable, learning_rate)

    opt.update_step = merged_update_step


def uses_loss_scaling(opt: keras.optimizers.Optimizer, mixed_precision: str) -> bool:
    """Whether the step scales its loss (float16): the engine scales it, the update lets the optimizer
    unscale the gradients and skip a non-finite step itself."""
    return hasattr(opt, "scale_loss") and mixed_precision == "float16"


def merge_duplicate_rows(grads: list) -> list:
    """`grads` with every IndexedSlices gradient (an embedding's) summed per row: one slice per row it touches.

    A token that occurs twice in a batch gives its embedding row two slices, and Horovod's all-reduce of a
    sparse gradient gathers every rank's slices. Keras' `global_clipnorm` takes the norm of the slices as
    they are, not of the gradient they add up to ([1, 1] twice: sqrt(4) instead of sqrt(8)), so it clipped by
    the wrong factor. Adam's second moment likewise squares each slice, not the row's sum ([1, 2] on one row:
    1 + 4 instead of 9; Keras' `ops.square` of an IndexedSlices squares its values). Merged, the update is that
    of the dense gradient (what the pipeline and ZeRO, which densify, compute). Dense gradients pass unchanged.
    """
    merged = []
    for g in grads:
        if isinstance(g, tf.IndexedSlices):
            rows, position = tf.unique(g.indices)
            g = tf.IndexedSlices(tf.math.unsorted_segment_sum(g.values, position, tf.shape(rows)[0]), rows,
                                 g.dense_shape)
        merged.append(g)
    return merged


def rescale_lr_for_replicas(opt: keras.optimizers.Optimizer, cfg: OptimizerConfig, num_replicas: int) -> None:
    """With `scale_lr_with_replicas`, set the peak learning rate for a new replica count (elastic restarts).

    Takes effect in step functions traced afterwards (the schedule's peak is a constant of the trace).
    """
    schedule = getattr(getattr(opt, "inner_optimizer", opt), "_learning_rate", None)
    if cfg.scale_lr_with_replicas and isinstance(schedule, WarmupSchedule):
        schedule.peak = cfg.lr * num_replicas


def current_lr(opt: keras.optimizers.Optimizer) -> float:
    """The learning rate the next step will use."""
    inner = getattr(opt, "inner_optimizer", opt)
    lr = inner.learning_rate
    return float(lr(inner.iterations) if callable(lr) else lr)
