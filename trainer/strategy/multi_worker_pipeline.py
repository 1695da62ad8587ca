"""multi_worker x pipeline: one pipelined replica per worker process, gradients summed over workers.

MultiWorkerMirroredStrategy mirrors every variable created in its scope onto its single replica
device, which would pull all pipeline stages onto one device. So here the model and optimizer live
outside the strategy's scope (plain variables on their stages' devices), the step runs in the ordinary
(default-strategy) context, and the strategy is used only for what it is good at: its collective
all-reduce between workers, called through `strategy.run` on the tensors to sum.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import tensorflow as tf

from trainer.errors import ConfigError
from trainer.strategy.base import Strategy
from trainer.strategy.tf_distribute import MultiWorker


def multi_worker(cfg: Any) -> MultiWorker:
    """distribution.backend multi_worker (trainer/strategy/__init__.py BACKENDS): with pipeline stages, the
    variant below, whose variables stay on their stages' devices."""
    try:
        return MultiWorkerPipeline() if cfg.distribution.pipeline is not None else MultiWorker()
    except ValueError as err:  # no TF_CONFIG: one line, exit 2
        raise ConfigError(str(err)) from None


class MultiWorkerPipeline(MultiWorker):
    name = "multi_worker"

    def scope(self):
        return Strategy.scope(self)  # no mirroring: stage variables stay on their devices

    def distribute_dataset(self, dataset: tf.data.Dataset) -> Iterator:
        return iter(dataset)  # this worker's shard of each global batch is its one replica's batch

    def _sum_over_workers(self, values: Any) -> Any:
        """`values` (a nest of tensors) summed over all workers, inside a compiled step."""
        flat = tf.nest.flatten(values)

        def all_reduce(*xs):
            # The copy puts each tensor on the strategy's replica device; the collective needs a placed input.
            local = [tf.identity(x) for x in xs]
            return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, local)

        summed = self.strategy.run(all_reduce, args=tuple(flat))
        local = [self.strategy.experimental_local_results(t)[0] for t in summed]
        return tf.nest.pack_sequence_as(values, local)

    def run(self, replica_fn: Callable[[Any], dict], batch: Any) -> dict[str, tf.Tensor]:
        return self._sum_over_workers(replica_fn(batch))

    def run_agreed(self, replica_fn: Callable[[Any], dict], batch: Any) -> dict[str, tf.Tensor]:
        return replica_fn(batch)  # its one replica runs here, outside tf.distribute's `run` (see `run`)

    def reduce_gradients(self, grads: list[tf.Tensor]) -> list[tf.Tensor]:
        present = [i for i, g in enumerate(grads) if g is not None]
        summed = self._sum_over_workers([tf.convert_to_tensor(grads[i]) for i in present])
        out = list(grads)
        for i, g in zip(present, summed):
            out[i] = g
        return out

    def replica_sum(self, value: tf.Tensor) -> tf.Tensor:
        return self._sum_over_workers(value)

    def apply_if(self, ok: tf.Tensor, apply_fn: Callable[[Any], None], grads: list) -> None:
        return Strategy.apply_if(self, ok, apply_fn, grads)  # plain tf.cond: no replica context here
