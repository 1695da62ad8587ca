"""Checkpointer in-process: a save that fails at any stage leaves the previous checkpoint the latest, for
Strata and for TensorFlow's `checkpoint` index alike; old checkpoints and crash leftovers are swept."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest
import tensorflow as tf

from trainer import checkpoint_manifest as files
from trainer.checkpoint import Checkpointer
from trainer.errors import StorageError


def _checkpointer(directory: Path, *, write: bool = True, keep: int = 2) -> tuple[Checkpointer, tf.Variable]:
    weights = tf.Variable(tf.zeros([64]))
    return Checkpointer(directory, keep=keep, write=write, weights=weights), weights


def _save(checkpointer: Checkpointer, weights: tf.Variable, step: int) -> None:
    weights.assign(tf.fill([64], float(step)))
    checkpointer.save(step)


def _disk_full(*_, **__):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("stage", ["write", "commit", "write_index"])
def test_a_failed_save_keeps_the_previous_checkpoint_latest(tmp_path: Path, monkeypatch, stage: str):
    checkpointer, weights = _checkpointer(tmp_path)
    _save(checkpointer, weights, 10)
    target = {"write": (checkpointer.checkpoint, "write"), "commit": (files, "commit"),
              "write_index": (files, "write_index")}[stage]
    monkeypatch.setattr(*target, _disk_full)
    with pytest.raises(StorageError, match=rf"^{tmp_path}: saving checkpoint ckpt-20 failed: the disk is full; "
                                           r"ckpt-10 is the latest checkpoint"):
        _save(checkpointer, weights, 20)
    monkeypatch.undo()
    assert files.committed_steps(tmp_path) == [10] and not list(tmp_path.glob("ckpt-20*"))
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-10")
    fresh, restored = _checkpointer(tmp_path, write=False)
    assert fresh.restore_latest() == 10 and float(restored[0]) == 10.0


def test_keeps_the_newest_and_sweeps_crash_leftovers(tmp_path: Path):
    checkpointer, weights = _checkpointer(tmp_path, keep=2)
    (tmp_path / "ckpt-7_temp").mkdir()  # as a save killed mid-way leaves them
    (tmp_path / "ckpt-7.data-00000-of-00001.tempstate1").write_bytes(b"x")
    for step in (1, 2, 3):
        _save(checkpointer, weights, step)
    assert files.committed_steps(tmp_path) == [3, 2]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(("ckpt-2", "ckpt-3"))) == ["checkpoint"]
    assert files.read_index(tmp_path)[0] == files.IndexState("ckpt-3", ("ckpt-2", "ckpt-3"))


def test_restore_skips_a_damaged_newest_and_says_why(tmp_path: Path, capsys):
    checkpointer, weights = _checkpointer(tmp_path)
    for step in (1, 2):
        _save(checkpointer, weights, step)
    data = tmp_path / "ckpt-2.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-8])
    fresh, restored = _checkpointer(tmp_path, write=False)
    assert fresh.restore_latest() == 1 and float(restored[0]) == 1.0 and fresh.latest_step == 1
    assert [name for name, _ in fresh.skipped] == ["ckpt-2"]
    assert "checkpoint " + str(tmp_path / "ckpt-2") + " skipped: ckpt-2.data-00000-of-00001 is" in capsys.readouterr().err


def test_checkpoints_written_before_manifests_still_restore(tmp_path: Path):
    weights = tf.Variable(tf.fill([64], 5.0))
    old = tf.train.Checkpoint(step=tf.Variable(5, dtype=tf.int64), weights=weights)
    tf.train.CheckpointManager(old, str(tmp_path), max_to_keep=3).save(checkpoint_number=5)
    fresh, restored = _checkpointer(tmp_path, write=False)
    assert fresh.restore_latest() == 5 and float(restored[0]) == 5.0 and fresh.skipped == []


def test_an_empty_directory_starts_at_step_0(tmp_path: Path):
    checkpointer, _ = _checkpointer(tmp_path / "none", write=False)
    assert checkpointer.restore_latest() == 0 and checkpointer.latest_step is None
