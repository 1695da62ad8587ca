"""tf.distribute backends: MirroredStrategy (replicas in one process) and MultiWorkerMirroredStrategy
(replicas across processes, cluster from TF_CONFIG).

Input: every process reads its own shard of each global batch (data/batches.py) and splits it into one
batch per local replica, in replica order, with `distribute_datasets_from_function`. tf.distribute's own
auto-sharding is not used: it would shard by file or by element, and neither preserves "N replicas x b
== 1 replica x N*b" exactly.

Gradients: Keras 3's optimizer sums them over all replicas inside `apply_gradients` (all-reduce), which
matches the loss convention in base.py.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator

import tensorflow as tf

from launch.contract import ENV_TF_CONFIG
from trainer.strategy.base import Strategy


def use_logical_cpus(count: int) -> list[str]:
    """Split the CPU into `count` logical devices (no GPU here): one replica or stage each."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if not current or len(current) != count:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    return [f"/cpu:{i}" for i in range(count)]


def local_devices(requested: int | None) -> list[str]:
    """The GPUs of this process, or `requested` logical CPUs when there are none."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        count = requested or len(gpus)
        if count > len(gpus):
            raise ValueError(f"distribution.devices ({count}) exceeds the {len(gpus)} GPU(s) visible here")
        return [f"/gpu:{i}" for i in range(count)]
    return use_logical_cpus(requested or 1)


class _TFDistribute(Strategy):
    """Shared code of both tf.distribute backends."""

    strategy: tf.distribute.Strategy
    local_replicas: int = 1

    @property
    def num_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def scope(self):
        return self.strategy.scope()

    def distribute_dataset(self, dataset: tf.data.Dataset) -> Iterator:
        # `dataset` yields this process's rows of a global batch; cut them into one batch per local
        # replica, replica 0 first, so replica r always gets the same rows it would in any layout.
        n = self.local_replicas

        def per_replica(rows: dict) -> tf.data.Dataset:
            return tf.data.Dataset.from_tensor_slices(
                {k: tf.reshape(v, [n, -1, *v.shape[1:]]) for k, v in rows.items()}
            )

        split = dataset.flat_map(per_replica)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        split = split.with_options(options)
        return iter(self.strategy.distribute_datasets_from_function(lambda ctx: split))

    def replica_sum(self, value: tf.Tensor) -> tf.Tensor:
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, value)

    def apply_if(self, ok: tf.Tensor, apply_fn: Callable[[Any], None], grads: list) -> None:
        # The optimizer's update calls merge_call, which tf.distribute refuses inside a tf.cond in a replica
        # context; so the cond runs in the cross-replica context and the update per replica inside it (the
        # pattern Keras's LossScaleOptimizer uses). `ok` is agreed, so replica 0's value stands for all.
        if tf.__internal__.distribute.strategy_supports_no_merge_call():
            return super().apply_if(ok, apply_fn, grads)

        def cross_replica(distribution, ok, grads):
            def apply():
                distribution.extended.call_for_each_replica(apply_fn, args=(grads,))

            tf.cond(distribution.experimental_local_results(ok)[0], apply, lambda: None)

        tf.distribute.get_replica_context().merge_call(cross_replica, args=(ok, grads))

    def run(self, replica_fn: Callable[[Any], dict], batch: Any) -> dict[str, tf.Tensor]:
        per_replica = self.strategy.run(replica_fn, args=(batch,))
        return {k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in per_replica.items()}

    def run_agreed(self, replica_fn: Callable[[Any], dict], batch: Any) -> dict[str, tf.Tensor]:
        # Every replica holds the same (already summed) values: the first local replica's stand for all.
        per_replica = self.strategy.run(replica_fn, args=(batch,))
        return {k: self.strategy.experimental_local_results(v)[0] for k, v in per_replica.items()}


class Mirrored(_TFDistribute):
    """Synchronous replicas on the GPUs (or logical CPUs) of one process."""

    name = "mirrored"

    def __init__(self, devices: int | None):
        names = local_devices(devices)
        self.local_replicas = len(names)
        # Logical CPU devices have no NCCL; the reduction-to-one-device all-reduce works everywhere.
        cross = None if names[0].startswith("/gpu") else tf.distribute.ReductionToOneDevice()
        self.strategy = tf.distribute.MirroredStrategy(names, cross_device_ops=cross)


def mirrored(cfg: Any) -> Mirrored:
    """distribution.backend mirrored (trainer/strategy/__init__.py BACKENDS)."""
    return Mirrored(cfg.distribution.devices)


class MultiWorker(_TFDistribute):
    """One process per worker, cluster described by TF_CONFIG (set by `strata launch` or SLURM)."""

    name = "multi_worker"

    def __init__(self):
        spec = json.loads(os.environ.get(ENV_TF_CONFIG, "{}"))
        workers = spec.get("cluster", {}).get("worker", [])
        if not workers:
            raise ValueError("distribution.backend multi_worker needs TF_CONFIG; start it with "
                             "`strata launch --backend multi_worker -np N CONFIG`")
        self.worker_index = int(spec["task"]["index"])
        self.num_workers = len(workers)
        gpus = tf.config.list_physical_devices("GPU")
        self.local_replicas = max(len(gpus), 1)
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING)
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)

    @property
    def rank(self) -> int:
        return self.worker_index

    @property
    def world_size(self) -> int:
        return self.num_workers

    def all_reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        local = tf.constant([values[k] for k in keys], tf.float64)
        per_replica = self.strategy.run(lambda: local / self.local_replicas)
        total = self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()
        return dict(zip(keys, total.tolist()))
