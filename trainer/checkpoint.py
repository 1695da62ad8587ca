"""Checkpoints: model, optimizer and step, with `tf.train.CheckpointManager`.

The data position needs no saving: the batch of step s is a pure function of (seed, s) (see
data/batches.py), so restoring the step restores where the data stream was.

Atomicity: TensorFlow writes a checkpoint's shards to temporary names and renames them when complete, and
the `checkpoint` index file that names the latest one is replaced atomically after that. A crash during a
save therefore leaves the previous checkpoint loadable and still named latest.
"""
from __future__ import annotations

from pathlib import Path

import tensorflow as tf


def random_state(model) -> tf.Module:
    """The model's random-number state (e.g. dropout seeds), as a trackable to checkpoint.

    Keras 3 layers draw dropout masks from SeedGenerator state variables that advance every step; they are
    not model weights, so without this a resumed run would draw different masks than an uninterrupted one.
    """
    holder = tf.Module()
    holder.states = [
        gen.state.value
        for layer in model._flatten_layers(include_self=True)
        for gen in getattr(layer, "_seed_generators", [])
    ]
    return holder


class Checkpointer:
    """Saves every `every` steps (and on demand), keeps the newest `keep`, restores the latest."""

    def __init__(self, directory: Path, *, keep: int, write: bool, **trackables):
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.checkpoint = tf.train.Checkpoint(step=self.step, **trackables)
        self.directory = Path(directory)
        self.write = write  # only the chief writes; every rank restores
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.directory), max_to_keep=keep)

    def restore_latest(self) -> int:
        """Restore the newest checkpoint if there is one; return the step to continue from."""
        latest = self.manager.latest_checkpoint
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
        return int(self.step.numpy())

    def save(self, step: int) -> str | None:
        """Record `step` (the number of optimizer steps done) and write a checkpoint (chief only)."""
        self.step.assign(step)
        if not self.write:
            return None
        return self.manager.save(checkpoint_number=step)

    @property
    def latest_step(self) -> int | None:
        latest = self.manager.latest_checkpoint
        return int(latest.rsplit("-", 1)[1]) if latest else None
