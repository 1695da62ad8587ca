"""Horovod backend: one process per replica, started by horovodrun, mpirun or srun.

Gradients are all-reduced (summed) one tensor at a time inside the compiled step, exactly what
`hvd.DistributedGradientTape` does internally: because each all-reduce depends only on its own gradient,
TensorFlow starts it as soon as that gradient exists, while the backward pass continues on earlier
layers, and Horovod's background thread fuses the tensors that are ready within a cycle. We call
`hvd.allreduce` directly instead of wrapping the tape because (a) with gradient accumulation the
reduction must happen once per optimizer step, not once per micro-batch, and (b) Horovod 0.28's tape
wrapper fails on Keras 3 variables (horovod issue #4290); the underlying tf.Variables (`v.value`) work.

Horovod options from the config become Horovod's environment variables before `hvd.init()` (values
already set by horovodrun flags win).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from trainer.config import DistributionConfig
from trainer.strategy.base import OptimizerUpdate, Strategy


def horovod_env(dist: DistributionConfig) -> dict[str, str]:
    """Environment variables for the Horovod options in the config (pure)."""
    opts = dist.horovod
    env = {}
    if opts.fusion_threshold_mb is not None:
        env["HOROVOD_FUSION_THRESHOLD"] = str(int(opts.fusion_threshold_mb * 1024 * 1024))
    if opts.cycle_time_ms is not None:
        env["HOROVOD_CYCLE_TIME"] = str(opts.cycle_time_ms)
    if opts.hierarchical_allreduce:
        env["HOROVOD_HIERARCHICAL_ALLREDUCE"] = "1"
    if opts.timeline:
        env["HOROVOD_TIMELINE"] = opts.timeline
    return env


class Horovod(Strategy):
    name = "horovod"

    def __init__(self, dist: DistributionConfig):
        for key, value in horovod_env(dist).items():
            os.environ.setdefault(key, value)
        import horovod.tensorflow as hvd

        hvd.init()
        self.hvd = hvd
        gpus = tf.config.list_physical_devices("GPU")
        if gpus and dist.pipeline is None:  # one GPU per process, chosen by local rank
            tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
            tf.config.experimental.set_memory_growth(gpus[hvd.local_rank() % len(gpus)], True)
        elif gpus:  # a pipeline uses K GPUs per process; pipeline/devices.py stage_devices picks the block
            for gpu in gpus:
                tf.config.experimental.set_memory_growth(gpu, True)
        self.compression = hvd.Compression.fp16 if dist.horovod.compression == "fp16" else hvd.Compression.none

    @property
    def num_replicas(self) -> int:
        return self.hvd.size()

    @property
    def rank(self) -> int:
        return self.hvd.rank()

    @property
    def world_size(self) -> int:
        return self.hvd.size()

    @property
    def local_rank(self) -> int:
        return self.hvd.local_rank()

    def run(self, replica_fn: Callable[[Any], dict], batch: Any) -> dict[str, tf.Tensor]:
        outputs = replica_fn(batch)
        # Metrics summed over ranks (the global mean loss, total tokens), not rank 0's sample.
        return {k: self.hvd.allreduce(v, op=self.hvd.Sum, name=f"metric_{k}") for k, v in outputs.items()}

    def reduce_gradients(self, grads: list[tf.Tensor]) -> list[tf.Tensor]:
        return [
            self.hvd.allreduce(g, op=self.hvd.Sum, compression=self.compression, name=f"grad_{i}")
            for i, g in enumerate(grads)
        ]

    def replica_sum(self, value: tf.Tensor) -> tf.Tensor:
        # Independent of the gradients' all-reduces, so Horovod fuses it with the last of them. The training
        # step makes one per step (base.py sum_together), so no output needs `run`'s all-reduces after it.
        return self.hvd.allreduce(value, op=self.hvd.Sum, name="replica_sum")

    def all_reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        total = self.hvd.allreduce(tf.constant([values[k] for k in keys], tf.float64), op=self.hvd.Sum,
                                   name="host_sum")
        return dict(zip(keys, np.asarray(total).tolist()))

    def make_update(self, optimizer: Any, variables: list, *, clip_norm: float | None,
                    loss_scaling: bool) -> "OptimizerUpdate | Any":
        """Replicated: all-reduce and apply (base.py); ZeRO: the sharded optimizer's update (zero.py)."""
        if self.zero_state is not None:
            return self.zero_state
        return super().make_update(optimizer, variables, clip_norm=clip_norm, loss_scaling=loss_scaling)

    def shard_optimizer(self, variables: list, new_optimizer: Callable[[], Any], *, stage: int,
                        clip_norm: float | None, stages: list[int] | None = None,
                        devices: list[str] | None = None) -> Any:
        from trainer.strategy.zero import ShardedOptimizer

        self.zero_state = ShardedOptimizer(self.hvd, variables, new_optimizer, stage=stage, clip_norm=clip_norm,
                                           stages=stages, devices=devices)
        return self.zero_state

    def shard_levels(self, model: Any, new_optimizer: Callable[[], Any], *, clip_norm: float | None) -> Any:
        from trainer.strategy.zero3 import Zero3State

        self.zero_state = Zero3State(self.hvd, model, new_optimizer, clip_norm=clip_norm)
        return self.zero_state

    def broadcast_initial_state(self, variables: list) -> None:
        # Keras 3 variables wrap a tf.Variable in `.value`; Horovod needs the tf.Variable. A rank's ZeRO slices
        # are its own (never broadcast); they are re-cut from the broadcast weights.
        own = {id(v) for v in self.zero_state.owned_variables()} if self.zero_state is not None else set()
        self.hvd.broadcast_variables([getattr(v, "value", v) for v in variables if id(v) not in own], root_rank=0)
        if self.zero_state is not None:
            self.zero_state.refresh()
