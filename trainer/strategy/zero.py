"""Sharded data parallel (ZeRO 1 and 2) on Horovod: each rank keeps the optimizer state of 1/N of the model.

The plan is pure (trainer/parallel/zero.py): the trainable variables flattened into padded buckets, rank r
owning slice r of each. Here, per rank:

  * `shards`: one fp32 variable per bucket holding this rank's slice of the parameters (the master copy
    that the optimizer updates), and `optimizer`, a Keras optimizer of the configured kind built over them,
    so its slots (Adam's moments, SGD's momentum) hold 1/N of the replicated figure;
  * the update (`__call__`, inside the compiled step): the gradients flattened into the buckets and summed
    over the ranks, by an all-reduce of which each rank keeps its slice (zero 1) or by a reduce-scatter that
    only ever gives it its slice (zero 2); clipped by the global norm (the sum of the slices' squared norms,
    all-reduced); applied to the shards (or skipped on every rank, as the NaN/Inf guard agreed); then the
    updated slices all-gathered and cut back into the model's variables, identical on every rank.

Checkpoints stay in the replicated format (layout-free: a ZeRO run resumes replicated and the other way
round, on any number of ranks): saving all-gathers the slots bucket by bucket into a throwaway optimizer of
the configured kind built over the model's variables, which the chief writes; restoring reads into such an
optimizer and keeps this rank's slice of each slot (`Checkpointer(sharded=...)`, trainer/checkpoint.py).
That optimizer lives only for the save or restore: the transient cost is the replicated optimizer state.

Elastic Horovod: a lost rank takes its slices with it, so each elastic commit keeps the whole optimizer state
(`host_copy`, all-gathered) in every rank's host memory, and after the world changed size every rank re-plans
the buckets and takes its new slices (`reshard`; trainer/strategy/horovod_elastic.py `ShardedState`).

With a pipeline (`stages`, `devices`: each variable's stage and each stage's device), ZeRO runs across the
data-parallel group of each stage, which is the ranks (a rank is one replica, its stages devices of it): each
stage's variables form their own buckets, whose shards and slots are created on the stage's device, and whose
flatten, reduce-scatter, all-gather, unflatten and optimizer arithmetic run there, so no stage's state passes
through another stage's device. Clipping still uses the one global norm, over every stage and rank.

ZeRO 3 (parameters sharded too, level by level) is trainer/strategy/zero3.py; it shares this module's
`optimizer_slots` and the bucket plan of trainer/parallel/zero.py.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import keras
import numpy as np
import tensorflow as tf

from trainer.parallel.zero import BUCKET_ELEMENTS, Bucket, plan_buckets, plan_stage_buckets

# Where Keras 3's optimizers keep their per-variable slots (one list entry per built variable, in order).
SLOT_LISTS = ("_momentums", "_velocities", "_velocity_hats", "momentums")


def optimizer_slots(optimizer: Any) -> dict[str, list]:
    """The optimizer's slot lists by attribute name (Adam: moments and velocities; SGD: momentums if any)."""
    return {name: list(getattr(optimizer, name)) for name in SLOT_LISTS
            if isinstance(getattr(optimizer, name, None), list) and getattr(optimizer, name)}


class ShardedOptimizer:
    """This rank's slices of the buckets and the optimizer over them; `__call__` is the step's update
    (the interface of trainer/strategy/base.py `OptimizerUpdate`)."""

    def __init__(self, hvd: Any, variables: list, new_optimizer: Callable[[], Any], *, stage: int,
                 clip_norm: float | None, cap: int = BUCKET_ELEMENTS, stages: list[int] | None = None,
                 devices: list[str] | None = None) -> None:
        """`stages` (one per variable) and `devices` (one per pipeline stage): a pipelined replica, whose
        buckets are planned and kept per stage device; None: one device, one plan."""
        self.hvd, self.variables, self.new_optimizer = hvd, list(variables), new_optimizer
        self.stage, self.clip_norm, self.cap = stage, clip_norm, cap
        self.stage_of = list(stages) if stages is not None else None  # each variable's pipeline stage
        self.devices = list(devices) if devices is not None else None
        self._plan()

    def _plan(self) -> None:
        """Buckets for the current number of ranks, this rank's shards cut from the model's variables, and a
        fresh optimizer over them (at the start, and after an elastic job changed size: `reshard`)."""
        self.rank, self.ranks = self.hvd.rank(), self.hvd.size()
        sizes = [int(np.prod(v.shape)) for v in self.variables]
        self.buckets: tuple[Bucket, ...] = (plan_buckets(sizes, self.ranks, self.cap) if self.stage_of is None
                                            else plan_stage_buckets(sizes, self.stage_of, self.ranks, self.cap))
        self.shards = []
        for i, b in enumerate(self.buckets):
            with self._on(b):
                self.shards.append(new_shard(b.shard, f"zero_shard_{i}"))
        self.optimizer = self.new_optimizer()  # configured without global_clipnorm: the norm is global here
        if self.devices is not None:
            _update_on_variable_device(self.optimizer)
        self.optimizer.build(self.shards)  # Keras creates each slot colocated with its shard
        self.refresh()

    def _on(self, bucket: Bucket) -> Any:
        """The device scope of a bucket's state and collectives: its stage's device (none without a pipeline)."""
        return tf.device(self.devices[bucket.stage]) if self.devices is not None else contextlib.nullcontext()

    # ---------------------------------------------------------------------------- host side
    def owned_variables(self) -> list:
        """Variables whose values differ by rank (never broadcast): the shards and their slots."""
        return [*self.shards, *(s for slots in optimizer_slots(self.optimizer).values() for s in slots)]

    def refresh(self) -> None:
        """Copy this rank's slices of the model's variables into the shards (after init, restore, broadcast)."""
        for bucket, shard in zip(self.buckets, self.shards):
            with self._on(bucket):
                shard.assign(self._mine(self._flatten([v.value for v in self.variables], bucket), bucket))

    def full_optimizer(self) -> Any:
        """A throwaway optimizer of the configured kind over the model's variables: the checkpoint format."""
        full = self.new_optimizer()
        full.build(self.variables)
        return full

    @contextlib.contextmanager
    def gathered(self, *, write: bool) -> Iterator[Any]:
        """Every rank: all-gather the slots bucket by bucket; the writer (`write`) gets them in a replicated
        optimizer to save, the others None."""
        full = self.full_optimizer() if write else None
        full_slots = optimizer_slots(full) if write else {}
        for name, index, part in self._gather_slots("zero_save"):
            if write:
                full_slots[name][index].assign(part)
        if write:
            full.iterations.assign(self.optimizer.iterations)
        yield full

    def _gather_slots(self, label: str) -> Iterator[tuple[str, int, tf.Tensor]]:
        """Every rank: (slot name, model variable index, that variable's whole slot), one all-gather per
        bucket and slot kind (named `label_...`: every rank must gather in the same order)."""
        for name, slots in optimizer_slots(self.optimizer).items():
            for i, (bucket, slot) in enumerate(zip(self.buckets, slots)):
                with self._on(bucket):
                    whole = self.hvd.allgather(slot.value, name=f"{label}_{name}_{i}")
                    parts = self._unflatten(whole, bucket)
                for piece, part in parts:
                    yield name, piece.index, part

    def load(self, full: Any) -> None:
        """Take this rank's slices of a replicated optimizer's slots (restored from a checkpoint)."""
        full_slots = optimizer_slots(full)
        self._load_slots(lambda name: [s.value for s in full_slots[name]], full.iterations)

    def _load_slots(self, whole: Callable[[str], list], iterations: Any) -> None:
        """This rank's slices of the slots `whole(slot name)` gives (one whole tensor per model variable)."""
        for name, slots in optimizer_slots(self.optimizer).items():
            values = whole(name)
            for bucket, slot in zip(self.buckets, slots):
                with self._on(bucket):
                    slot.assign(self._mine(self._flatten(values, bucket), bucket))
        self.optimizer.iterations.assign(iterations)

    # ---------------------------------------------------------------- elastic Horovod (re-sharding)
    # A lost rank takes its slices with it, so an elastic commit keeps the replicated form of the sharded
    # state in every rank's host memory (trainer/strategy/horovod_elastic.py), as a replicated elastic run
    # keeps its whole state; after the world changed size every rank re-plans and takes its new slices.
    def host_copy(self) -> dict[str, np.ndarray]:
        """Every rank: the optimizer's state whole, in host memory: {`host_key(slot, variable index)`: array,
        "iterations": array} (the model's variables are whole on every rank already)."""
        out = {host_key(name, index): part.numpy() for name, index, part in self._gather_slots("zero_commit")}
        out["iterations"] = np.asarray(self.optimizer.iterations.numpy())
        return out

    def host_shapes(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """The keys of `host_copy` with each array's (shape, dtype): what a worker that joins receives."""
        return host_shapes_of(optimizer_slots(self.optimizer), self.variables)

    def reshard(self, host: dict[str, np.ndarray]) -> None:
        """For the current number of ranks: new buckets, shards re-cut from the model's variables, a new
        optimizer (the run's: `self.optimizer`) holding this rank's slices of `host` (a `host_copy`)."""
        self._plan()
        self._load_slots(lambda name: [host[host_key(name, i)] for i in range(len(self.variables))], host["iterations"])

    # ------------------------------------------------------------------------ the step's update
    def __call__(self, grads: list, ok: tf.Tensor) -> None:
        """Sum the replica's gradients over the ranks into this rank's slices, clip, apply if `ok`, gather."""
        dense: list = [None] * len(self.variables)
        mine = []
        for i, bucket in enumerate(self.buckets):
            with self._on(bucket):
                for p in bucket.pieces:
                    dense[p.index] = _dense(grads[p.index], self.variables[p.index])
                flat = self._flatten(dense, bucket)
                if self.stage >= 2:  # only this rank's slice of the sum ever exists here
                    mine.append(self.hvd.reducescatter(flat, op=self.hvd.Sum, name=f"zero_rs_{i}"))
                else:
                    mine.append(self._mine(self.hvd.allreduce(flat, op=self.hvd.Sum, name=f"zero_ar_{i}"), bucket))
        if self.clip_norm is not None:
            mine = self._clip(mine)
        tf.cond(ok, lambda: self._apply(mine), lambda: None)  # ok agrees on every rank: all gather, or none

    def _clip(self, mine: list[tf.Tensor]) -> list[tf.Tensor]:
        """Clip by the global norm of the whole summed gradient: the slices' squared sums, all-reduced
        (Keras' `global_clipnorm` formula, so replicated and sharded runs scale alike)."""
        partial = []
        for bucket, g in zip(self.buckets, mine):
            with self._on(bucket):  # each stage's slices reduced on its device: one scalar leaves it
                partial.append(tf.reduce_sum(tf.square(g)))
        squares = self.hvd.allreduce(tf.add_n(partial), op=self.hvd.Sum, name="zero_norm")
        norm = tf.sqrt(squares)
        scale = self.clip_norm * tf.minimum(1.0 / norm, 1.0 / self.clip_norm)
        scaled = []
        for bucket, g in zip(self.buckets, mine):
            with self._on(bucket):
                scaled.append(g * scale)
        return scaled

    def _apply(self, mine: list[tf.Tensor]) -> None:
        self.optimizer.apply_gradients(zip(mine, self.shards))
        for i, (bucket, shard) in enumerate(zip(self.buckets, self.shards)):
            with self._on(bucket):
                whole = self.hvd.allgather(shard.value, name=f"zero_ag_{i}")
                for piece, part in self._unflatten(whole, bucket):
                    self.variables[piece.index].assign(part)

    # ---------------------------------------------------------------------------- buckets
    def _flatten(self, tensors: list, bucket: Bucket) -> tf.Tensor:
        return flatten_bucket(tensors, bucket)

    def _mine(self, flat: tf.Tensor, bucket: Bucket) -> tf.Tensor:
        start, stop = bucket.owned(self.rank)
        return flat[start:stop]

    def _unflatten(self, flat: tf.Tensor, bucket: Bucket) -> list[tuple[Any, tf.Tensor]]:
        """(piece, its values shaped as its variable) for every variable of the bucket; padding dropped."""
        return [(p, tf.cast(tf.reshape(flat[p.offset:p.offset + p.size], self.variables[p.index].shape),
                            self.variables[p.index].dtype)) for p in bucket.pieces]


def new_shard(size: int, name: str) -> Any:
    """A trainable float32 variable of `size` zeros: one rank's slice of a bucket (stages 1-3)."""
    return keras.Variable(np.zeros(size, np.float32), dtype="float32", trainable=True, name=name)


def host_key(slot: str | None, index: int) -> str:
    """The key of one array of a `host_copy` (an elastic commit): model variable `index`'s optimizer slot
    `slot`, or its parameter (`slot` None: zero 3, whose parameters are sharded too)."""
    return f"{slot or 'param'}/{index}"


def host_shapes_of(slots: Iterable[str | None], variables: list) -> dict[str, tuple[tuple[int, ...], Any]]:
    """(shape, dtype) of every array a `host_copy` of `slots` over `variables` holds, and of its "iterations":
    what a worker that joins an elastic job receives into."""
    out = {host_key(slot, i): (tuple(v.shape), np.float32) for slot in slots for i, v in enumerate(variables)}
    out["iterations"] = ((), np.int64)
    return out


def flatten_bucket(tensors: list, bucket: Bucket) -> tf.Tensor:
    """The bucket's tensors (values or gradients, indexed as its pieces say) end to end in float32,
    zero-padded to its padded size: the layout every ZeRO collective moves (stages 1-3)."""
    parts = [tf.reshape(tf.cast(tensors[p.index], tf.float32), [-1]) for p in bucket.pieces]
    if bucket.padded > bucket.size:
        parts.append(tf.zeros([bucket.padded - bucket.size], tf.float32))
    return tf.concat(parts, 0) if len(parts) > 1 else parts[0]


def _update_on_variable_device(optimizer: Any) -> None:
    """Make `optimizer` build each variable's update under that variable's device: Keras' TensorFlow backend
    places a slot with its variable but leaves the update's arithmetic unplaced (the first device would get
    it). Wrapped: `update_step(gradient, variable, learning_rate)`, Keras' per-variable hook for optimizers,
    and the TensorFlow backend's `_apply_weight_decay(variables)` (AdamW's decay, one variable at a time)."""
    update_step, decay = optimizer.update_step, getattr(optimizer, "_apply_weight_decay", None)

    def device_of(variable: Any) -> str:
        return (variable.value if isinstance(variable, keras.Variable) else variable).device

    def placed_update(gradient: Any, variable: Any, learning_rate: Any) -> Any:
        with tf.device(device_of(variable)):
            return update_step(gradient, variable, learning_rate)

    def placed_decay(variables: list) -> None:
        for variable in variables:
            with tf.device(device_of(variable)):
                decay([variable])

    optimizer.update_step = placed_update
    if decay is not None:
        optimizer._apply_weight_decay = placed_decay


def _dense(grad: Any, variable: Any) -> tf.Tensor:
    """A variable's gradient as a dense float32 tensor: zeros where the loss does not depend on it, an
    embedding's IndexedSlices summed per row (what the replicated update's dense equivalent is)."""
    if grad is None:
        return tf.zeros(variable.shape, tf.float32)
    if isinstance(grad, tf.IndexedSlices):
        grad = tf.math.unsorted_segment_sum(grad.values, grad.indices, variable.shape[0])
    return tf.cast(grad, tf.float32)
