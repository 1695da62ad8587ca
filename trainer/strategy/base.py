"""The one interface every distribution backend implements.

The training loop talks only to this interface, so the same loop runs on one device, on several GPUs of a
process (tf.distribute), on many processes (MultiWorkerMirroredStrategy, Horovod), each replica with or
without pipeline stages. Only modules in this package import horovod or call tf.distribute.

Loss convention for every backend: each replica computes sum(per-example loss) / GLOBAL batch, and the
gradients of all replicas are SUMMED. The result equals the gradient of the mean loss over the global
batch, which is what makes N replicas x batch b train exactly like 1 replica x batch N*b.

Where the gradients of a step are summed, per backend (`make_update` returns the object that does it):
  single                   nothing to sum;
  horovod                  `Horovod.reduce_gradients`: one hvd.allreduce per gradient (horovod.py);
  mirrored, multi_worker   Keras's optimizer, inside `apply_gradients` (an all-reduce in tf.distribute's
                           merge_call), so `reduce_gradients` is the identity there (tf_distribute.py);
  multi_worker x pipeline  `MultiWorkerPipeline.reduce_gradients`: a collective all-reduce over workers
                           (multi_worker_pipeline.py; its variables live outside tf.distribute's scope).
"""
from __future__ import annotations

import abc
import contextlib
from typing import Any, Callable, Iterator

import tensorflow as tf

from trainer.nonfinite import poison
from trainer.optim import merge_duplicate_rows


class Strategy(abc.ABC):
    """How replicas are formed, fed, and kept in sync."""

    name: str = "base"
    # The sharded optimizer (ZeRO, trainer/strategy/zero.py) of the replica built last; None: replicated.
    zero_state: Any = None

    @property
    def num_replicas(self) -> int:
        """Replicas training in sync, over all processes."""
        return 1

    @property
    def rank(self) -> int:
        """This process's rank (0 when there is one process)."""
        return 0

    @property
    def world_size(self) -> int:
        """Number of processes."""
        return 1

    @property
    def local_rank(self) -> int:
        """This process's index among the processes on its host (selects its GPUs)."""
        return 0

    @property
    def is_chief(self) -> bool:
        """Only the chief writes checkpoints and TensorBoard events."""
        return self.rank == 0

    def scope(self) -> contextlib.AbstractContextManager:
        """Create model and optimizer variables inside this scope."""
        return contextlib.nullcontext()

    def distribute_dataset(self, dataset: tf.data.Dataset) -> Iterator:
        """Turn this process's batches into what `run` consumes."""
        return iter(dataset)

    @abc.abstractmethod
    def run(self, replica_fn: Callable[[Any], dict], batch: Any) -> dict[str, tf.Tensor]:
        """Run `replica_fn(batch)` on every replica; return its outputs SUMMED over replicas."""

    def reduce_gradients(self, grads: list[tf.Tensor]) -> list[tf.Tensor]:
        """Sum gradients over replicas where the optimizer does not (Horovod); identity otherwise."""
        return grads

    def make_update(self, optimizer: Any, variables: list, *, clip_norm: float | None,
                    loss_scaling: bool) -> "OptimizerUpdate":
        """What the step does with one replica's gradients: sum them over replicas, apply them if ok."""
        return OptimizerUpdate(self, optimizer, variables, merge_rows=clip_norm is not None, loss_scaling=loss_scaling)

    def shard_optimizer(self, variables: list, new_optimizer: Callable[[], Any], *, stage: int,
                        clip_norm: float | None, stages: list[int] | None = None,
                        devices: list[str] | None = None) -> Any:
        """ZeRO `stage`: this rank's slices of `variables` and an optimizer (`new_optimizer()`) over them,
        which `make_update` then uses; with a pipeline, `stages` (each variable's stage) and `devices` (each
        stage's device) keep every stage's slices on its device. Only Horovod shards (the layout refuses zero
        elsewhere)."""
        raise NotImplementedError(f"distribution.zero needs backend horovod, not {self.name}")

    def shard_levels(self, model: Any, new_optimizer: Callable[[], Any], *, clip_norm: float | None) -> Any:
        """ZeRO 3: this rank's slice of each level of the deferred `model` and an optimizer over them
        (trainer/strategy/zero3.py `Zero3State`), which `make_update` then uses. Horovod only."""
        raise NotImplementedError(f"distribution.zero 3 needs backend horovod, not {self.name}")

    def replica_sum(self, value: tf.Tensor) -> tf.Tensor:
        """Inside the compiled step: `value` summed over every replica (the same result on each)."""
        return value

    def run_agreed(self, replica_fn: Callable[[Any], dict], batch: Any) -> dict[str, tf.Tensor]:
        """Like `run`, for a `replica_fn` whose outputs are already summed over replicas (`sum_together`),
        so the same on every replica: they are returned as they are, with no collective of their own."""
        return replica_fn(batch)

    def apply_if(self, ok: tf.Tensor, apply_fn: Callable[[Any], None], grads: list) -> None:
        """Inside the compiled step: `apply_fn(grads)` (the optimizer update) when `ok`, else nothing.

        `ok` must be the same on every replica (see trainer/nonfinite.py), so all replicas apply or all skip.
        """
        tf.cond(ok, lambda: _no_value(apply_fn(grads)), lambda: None)

    def all_reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        """Sum host-side numbers (evaluation counts) over processes."""
        return values

    def broadcast_initial_state(self, variables: list) -> None:
        """Make every process start from the chief's variables (after restore or init)."""

    def describe(self) -> str:
        return f"{self.name}: {self.num_replicas} replica(s), rank {self.rank} of {self.world_size}"


class OptimizerUpdate:
    """Inside the compiled step: sum a replica's gradients over the replicas and apply the optimizer update,
    or skip it on every replica when the agreed `ok` is false (trainer/nonfinite.py).

    Every rank ends with the full summed gradient and updates every variable. A sharded update (ZeRO: a
    reduce-scatter, each rank updating its shard, an all-gather) is another object with this interface,
    made by `Strategy.make_update`; the step calls `update(grads, ok)` either way.
    """

    def __init__(self, strategy: Strategy, optimizer: Any, variables: list, *, merge_rows: bool,
                 loss_scaling: bool) -> None:
        self.strategy, self.optimizer, self.variables = strategy, optimizer, variables
        self.merge_rows, self.loss_scaling = merge_rows, loss_scaling

    def __call__(self, grads: list, ok: tf.Tensor) -> None:
        grads = self.strategy.reduce_gradients(grads)
        if self.merge_rows:  # the global norm of a sparse gradient counts a row once (trainer/optim.py; Adam's
            grads = merge_duplicate_rows(grads)  # second moment too, merged in its update step: build_optimizer)
        if self.loss_scaling:  # it skips a non-finite update itself (and lowers its scale): make it see ours
            self.optimizer.apply_gradients(zip(poison(grads, ok), self.variables))
        else:
            self.strategy.apply_if(ok, self._apply, grads)

    def _apply(self, grads: list) -> Any:
        return self.optimizer.apply_gradients(zip(grads, self.variables))


def sum_together(strategy: Strategy, values: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Inside the compiled step: every tensor of `values` summed over replicas in ONE `replica_sum`.

    A step's small per-replica numbers (NaN/Inf flags, stop votes, loss, tokens, an engine's extras) ride in
    one float32 vector, so they cost one collective, which Horovod fuses with the last gradients' all-reduce,
    instead of one each. Each comes back in its own shape and dtype (float32 sums: int counts stay exact up
    to 2**24 per step)."""
    keys = list(values)
    tensors = [tf.convert_to_tensor(values[k]) for k in keys]
    flat = [tf.reshape(tf.cast(t, tf.float32), [-1]) for t in tensors]
    summed = tf.split(strategy.replica_sum(tf.concat(flat, 0)), [int(f.shape[0]) for f in flat])
    return {k: tf.cast(tf.reshape(s, tf.shape(t)), t.dtype) for k, s, t in zip(keys, summed, tensors)}


def _no_value(_result: Any) -> None:
    """Both branches of the update's tf.cond return nothing (apply_gradients returns the step counter)."""
    return None
