"""Checkpoints: model, optimizer, step and dropout RNG, saved so that a crash never costs more than the save
in progress, and restored from the newest checkpoint that is intact.

The data position needs no saving: the batch of step s is a pure function of (seed, s) (see
data/batches.py), so restoring the step restores where the data stream was.

Atomicity (see checkpoint_manifest.py for what TensorFlow does and does not guarantee): each save writes the
TensorFlow files of `ckpt-<step>`, fsyncs them, then commits a manifest (sizes and sha256s) with an atomic
rename; only then is the `checkpoint` index updated and are old checkpoints deleted. A process killed at any
moment leaves the previous checkpoint intact and committed. Restoring walks the committed checkpoints newest
first, skips (and says so) any whose files no longer match their manifest or that TensorFlow cannot load,
and uses the first good one. Only the chief writes; every rank restores.

The format does not depend on the parallel layout: with ZeRO (`sharded`, trainer/strategy/zero.py) the
optimizer state is gathered into the replicated optimizer's form to save, and each rank keeps its slice of
it on restore, so a run resumes sharded or replicated, on any number of ranks. With ZeRO 3 (parameters
sharded too) the same format is written and read a level at a time (trainer/checkpoint_zero3.py).
"""
from __future__ import annotations

import errno
import sys
from pathlib import Path

import tensorflow as tf

from trainer import checkpoint_manifest as files
from trainer.errors import StorageError, UserError


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


def _say(message: str) -> None:
    print(f"strata: {message}", file=sys.stderr, flush=True)


class Checkpointer:
    """Saves checkpoints (chief only), keeps the newest `keep`, restores the newest intact one.

    `skipped` lists (checkpoint name, reason) for every checkpoint the last restore had to pass over.
    """

    def __init__(self, directory: Path, *, keep: int, write: bool, sharded=None, **trackables):
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.trackables, self.sharded = trackables, sharded
        self.checkpoint = self._checkpoint(None) if sharded is None else None
        self.directory = Path(directory)
        self.keep = keep
        self.write = write  # only the chief writes; every rank restores
        self.skipped: list[tuple[str, str]] = []
        self._latest: int | None = None  # newest step this object restored or saved

    # ------------------------------------------------------------------------------------ restore
    def restore_latest(self) -> int:
        """Restore the newest intact checkpoint; return its step (0 when there is none yet).

        Raises UserError (one line, exit 2) when checkpoints exist but none of them can be loaded.
        """
        self.skipped = []
        candidates = self._candidates()
        for name in candidates:
            problem = self._try_restore(name)
            if problem is None:
                if self.skipped:
                    _say(f"restored {name} from {self.directory} after skipping {len(self.skipped)} newer "
                         f"checkpoint(s)")
                self._latest = files.step_of(name)
                return int(self.step.numpy())
            self.skipped.append((name, problem))
            _say(f"checkpoint {self.directory / name} skipped: {problem}; trying the previous one")
        if candidates:
            newest, why = self.skipped[0]
            raise UserError(f"{self.directory}: none of the {len(candidates)} checkpoints can be loaded "
                            f"(newest, {newest}: {why}); move the directory away to start afresh")
        return 0

    def _candidates(self) -> list[str]:
        """Checkpoint names to try, newest first: the committed ones (those with a manifest). A directory
        written before Strata kept manifests has none; then every `.index` is a candidate and TensorFlow's
        own checks decide. The `checkpoint` index file is only checked, to say when it is damaged."""
        _, problem = files.read_index(self.directory)
        if problem:
            _say(f"checkpoint index {self.directory / files.INDEX_FILE} ignored: {problem}; "
                 f"using the checkpoints' manifests")
        steps = files.committed_steps(self.directory) or files.indexed_steps(self.directory)
        return [files.checkpoint_name(s) for s in steps]

    def _checkpoint(self, optimizer) -> tf.train.Checkpoint:
        """The object graph saved: step and the trackables, with `optimizer` (if given) replacing theirs: the
        replicated form of a sharded optimizer's state."""
        trackables = self.trackables if optimizer is None else {**self.trackables, "optimizer": optimizer}
        checkpoint = tf.train.Checkpoint(step=self.step, **trackables)
        # `write` (unlike `save`) does not create the save counter, but `restore` does and then finds it
        # unmatched; creating it here keeps both sides, and checkpoints of earlier versions, matching.
        _ = checkpoint.save_counter
        return checkpoint

    def _try_restore(self, name: str) -> str | None:
        """Load checkpoint `name` into the trackables; return why not, or None on success."""
        if files.manifest_path(self.directory, name).is_file():
            problem = files.verify(self.directory, name)
            if problem:
                return problem
        elif not (self.directory / f"{name}.index").is_file():
            return f"{name}.index is missing"
        if self._levelwise:
            return self._try_restore_levelwise(name)
        full = self.sharded.full_optimizer() if self.sharded is not None else None  # ZeRO: this restore only
        try:
            checkpoint = self.checkpoint if full is None else self._checkpoint(full)
            checkpoint.restore(str(self.directory / name)).assert_existing_objects_matched()
        except (tf.errors.OpError, AssertionError, ValueError) as err:
            first_line = (getattr(err, "message", None) or str(err)).strip().splitlines()
            return f"TensorFlow cannot load it ({type(err).__name__}: {first_line[0] if first_line else ''})"
        if full is not None:
            self.sharded.load(full)  # this rank's slices of the replicated state
        return None

    @property
    def _levelwise(self) -> bool:
        """ZeRO 3: no rank holds the whole model; checkpoints go a level at a time (trainer/checkpoint_zero3.py)."""
        return getattr(self.sharded, "levelwise", False)

    def _try_restore_levelwise(self, name: str) -> str | None:
        from trainer import checkpoint_zero3

        try:
            return checkpoint_zero3.restore(self.sharded, self._checkpoint(self.sharded.full_optimizer()),
                                            str(self.directory / name))
        except (tf.errors.OpError, ValueError) as err:
            first_line = (getattr(err, "message", None) or str(err)).strip().splitlines()
            return f"TensorFlow cannot load it ({type(err).__name__}: {first_line[0] if first_line else ''})"

    # --------------------------------------------------------------------------------------- save
    def save(self, step: int) -> str | None:
        """Record `step` (the number of optimizer steps done) and write a checkpoint (chief only).

        Raises StorageError (one line, exit 2) if the disk refuses the files; the checkpoint being written
        is then removed, and the previous one stays the latest for Strata and TensorFlow's index alike.
        """
        self.step.assign(step)
        if self._levelwise:  # every rank gathers each level; the chief writes it as a part, then merges
            from trainer.checkpoint_zero3 import Zero3Writer

            writer = Zero3Writer(self.sharded, self._checkpoint(self.sharded.full_optimizer()))
            writer.write_parts(self.directory, files.checkpoint_name(step), chief=self.write)
            return self._write(step, writer if self.write else None, parts_written=True)
        if self.sharded is not None:  # every rank takes part in gathering the optimizer state
            with self.sharded.gathered(write=self.write) as full:
                return self._write(step, self._checkpoint(full) if self.write else None)
        return self._write(step, self.checkpoint)

    def _write(self, step: int, checkpoint: tf.train.Checkpoint | None, parts_written: bool = False) -> str | None:
        """The chief's part of `save`: write, commit, index, sweep. The other ranks only record the step: every
        rank must agree on the latest one (a ZeRO save is a collective: a rank saving again alone would hang)."""
        if not self.write:
            self._latest = step
            return None
        name = files.checkpoint_name(step)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if not parts_written:  # (ZeRO 3's writer discarded it before writing its parts)
                files.discard(self.directory, name)  # an older, failed save of this step must not be vouched for
            checkpoint.write(str(self.directory / name))
            files.commit(self.directory, name, step)
            kept = [files.checkpoint_name(s) for s in files.committed_steps(self.directory)[: self.keep]]
            files.write_index(self.directory, kept[::-1])
        except (OSError, tf.errors.OpError) as err:
            self._abandon(name)
            raise self._storage_error(f"saving checkpoint {name} failed", err) from None
        self._latest = step
        try:
            self._sweep(kept)
        except OSError as err:  # the new checkpoint is committed and named; only old files stay behind
            raise self._storage_error(f"{name} was saved but deleting old checkpoints failed", err) from None
        return str(self.directory / name)

    def _sweep(self, kept: list[str]) -> None:
        """Delete checkpoints beyond the newest `keep` and whatever crashed saves left behind."""
        for old in files.leftovers(self.directory, set(kept)):
            files.discard(self.directory, old)
        for stray in files.stray_temp_files(self.directory):
            stray.unlink(missing_ok=True)

    def _abandon(self, name: str) -> None:
        try:
            files.discard(self.directory, name)
        except OSError:
            pass  # best effort: without a manifest the files are never used, and the next save sweeps them

    def _storage_error(self, what: str, err: BaseException) -> StorageError:
        """One line: the directory, what failed and why (a full disk said plainly), what is still there."""
        detail = (getattr(err, "message", None) or str(err)).strip().splitlines()
        detail = detail[0] if detail else type(err).__name__
        full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in detail
        latest = (f"{files.checkpoint_name(self._latest)} is the latest checkpoint" if self._latest
                  else "there is no earlier checkpoint")
        return StorageError(f"{self.directory}: {what}: {'the disk is full' if full else detail}; {latest}; "
                            "free space (or lower checkpoint.keep) and run again to resume")

    @property
    def latest_step(self) -> int | None:
        """The newest step restored or saved by this object; before either, the newest committed step."""
        if self._latest is not None:
            return self._latest
        steps = files.committed_steps(self.directory)
        return steps[0] if steps else None
