"""The one interface every distribution backend implements.

The training loop talks only to this interface, so the same loop runs on one device, on several GPUs of a
process (tf.distribute), on many processes (MultiWorkerMirroredStrategy, Horovod), and later with pipeline
stages. Only modules in this package import horovod or call tf.distribute.

Loss convention for every backend: each replica computes sum(per-example loss) / GLOBAL batch, and the
gradients of all replicas are SUMMED. The result equals the gradient of the mean loss over the global
batch, which is what makes N replicas x batch b train exactly like 1 replica x batch N*b.
"""
from __future__ import annotations

import abc
import contextlib
from typing import Any, Callable, Iterator

import tensorflow as tf


class Strategy(abc.ABC):
    """How replicas are formed, fed, and kept in sync."""

    name: str = "base"

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

    def input_shard(self) -> tuple[int, int]:
        """(index, count): which shard of every global batch this process reads."""
        return self.rank, self.world_size

    def distribute_dataset(self, dataset: tf.data.Dataset) -> Iterator:
        """Turn this process's batches into what `run` consumes."""
        return iter(dataset)

    @abc.abstractmethod
    def run(self, replica_fn: Callable[[Any], dict], batch: Any) -> dict[str, tf.Tensor]:
        """Run `replica_fn(batch)` on every replica; return its outputs SUMMED over replicas."""

    def reduce_gradients(self, grads: list[tf.Tensor]) -> list[tf.Tensor]:
        """Sum gradients over replicas where the optimizer does not (Horovod); identity otherwise."""
        return grads

    def replica_sum(self, value: tf.Tensor) -> tf.Tensor:
        """Inside the compiled step: `value` summed over every replica (the same result on each)."""
        return value

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

    def barrier(self) -> None:
        """Wait for every process."""

    def describe(self) -> str:
        return f"{self.name}: {self.num_replicas} replica(s), rank {self.rank} of {self.world_size}"


def _no_value(_result: Any) -> None:
    """Both branches of the update's tf.cond return nothing (apply_gradients returns the step counter)."""
    return None
