"""The checkpoint manifest logic on plain files (no TensorFlow): commit, verify, index file, cleanup."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from trainer import checkpoint_manifest as files


def _fake_checkpoint(directory: Path, step: int, payload: bytes = b"weights" * 100) -> str:
    """Files shaped like TensorFlow's for `ckpt-<step>` (their content does not matter here)."""
    name = files.checkpoint_name(step)
    (directory / f"{name}.index").write_bytes(b"index-of-" + name.encode())
    (directory / f"{name}.data-00000-of-00001").write_bytes(payload)
    return name


@pytest.fixture
def committed(tmp_path: Path) -> tuple[Path, str]:
    name = _fake_checkpoint(tmp_path, 7)
    files.commit(tmp_path, name, 7)
    return tmp_path, name


def test_commit_records_size_and_sha256_of_every_file(committed):
    directory, name = committed
    manifest = json.loads(files.manifest_path(directory, name).read_text())
    assert manifest["step"] == 7 and set(manifest["files"]) == {f"{name}.index", f"{name}.data-00000-of-00001"}
    assert manifest["files"][f"{name}.data-00000-of-00001"]["size"] == 700
    assert files.verify(directory, name) is None


def test_commit_ignores_temp_files_and_needs_an_index(tmp_path: Path):
    name = _fake_checkpoint(tmp_path, 3)
    (tmp_path / f"{name}.data-00000-of-00001.tempstate123").write_bytes(b"half")
    assert all("tempstate" not in f for f in files.commit(tmp_path, name, 3)["files"])
    (tmp_path / "ckpt-4.data-00000-of-00001").write_bytes(b"no index: the save never finished")
    with pytest.raises(FileNotFoundError, match="ckpt-4.index"):
        files.commit(tmp_path, "ckpt-4", 4)
    assert files.committed_steps(tmp_path) == [3]


@pytest.mark.parametrize("damage,reason", [
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "is 100 bytes, its manifest says 700 (truncated"),
    (lambda p: p.write_bytes(b"X" + p.read_bytes()[1:]), "does not match its sha256"),
    (lambda p: p.unlink(), "is missing"),
], ids=["truncated", "flipped-byte", "deleted"])
def test_verify_names_the_damaged_file_and_why(committed, damage, reason):
    directory, name = committed
    damage(directory / f"{name}.data-00000-of-00001")
    problem = files.verify(directory, name)
    assert problem and problem.startswith(f"{name}.data-00000-of-00001") and reason in problem


@pytest.mark.parametrize("text,reason", [
    ("{not json", "unreadable"), ('{"format": 99, "files": {"a": {}}}', "unknown format"), ("[]", "unreadable"),
])
def test_a_damaged_manifest_is_reported_not_trusted(committed, text, reason):
    directory, name = committed
    files.manifest_path(directory, name).write_text(text)
    assert reason in files.verify(directory, name)


def test_committed_steps_are_newest_first_and_only_those_with_a_manifest(tmp_path: Path):
    for step in (5, 30, 200):
        files.commit(tmp_path, _fake_checkpoint(tmp_path, step), step)
    _fake_checkpoint(tmp_path, 400)  # written but never committed
    assert files.committed_steps(tmp_path) == [200, 30, 5]
    assert files.indexed_steps(tmp_path) == [400, 200, 30, 5]
    assert files.committed_steps(tmp_path / "missing") == []


def test_index_file_round_trip_and_tensorflow_format(tmp_path: Path):
    files.write_index(tmp_path, ["ckpt-10", "ckpt-20"])
    text = (tmp_path / "checkpoint").read_text()
    assert text.splitlines()[0] == 'model_checkpoint_path: "ckpt-20"'
    state, problem = files.read_index(tmp_path)
    assert problem is None and state == files.IndexState("ckpt-20", ("ckpt-10", "ckpt-20"))
    # TensorFlow's own writer adds timestamps: still readable.
    (tmp_path / "checkpoint").write_text(text + "all_model_checkpoint_timestamps: 1700000000.5\n"
                                         "last_preserved_timestamp: 1699999999.25\n")
    assert files.read_index(tmp_path)[0].latest == "ckpt-20"


@pytest.mark.parametrize("content,reason", [
    ("garbage{{\n", "line 1 is not a CheckpointState entry"),
    ('model_checkpoint_path: "ckpt-2', "line 1 is not"),  # truncated mid-line
    ("", "names no checkpoint"),
    (b"\xff\xfe", "unreadable"),
])
def test_a_damaged_index_file_is_detected(tmp_path: Path, content, reason):
    path = tmp_path / "checkpoint"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    state, problem = files.read_index(tmp_path)
    assert state is None and reason in problem


def test_no_index_file_is_not_a_problem(tmp_path: Path):
    assert files.read_index(tmp_path) == (None, None)


def test_atomic_write_replaces_whole_and_leaves_no_temp_on_failure(tmp_path: Path, monkeypatch):
    target = tmp_path / "checkpoint"
    files.atomic_write_text(target, "old\n")
    files.atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["checkpoint"]

    def refuse(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        files.atomic_write_text(target, "never\n")
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["checkpoint"]


def test_discard_removes_the_manifest_before_the_files(committed, monkeypatch):
    directory, name = committed
    removed = []
    real_unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda self, **kw: (removed.append(self.name), real_unlink(self, **kw)))
    (directory / f"{name}_temp").mkdir()
    files.discard(directory, name)
    assert removed[0] == f"{name}{files.MANIFEST_SUFFIX}"
    assert not any(directory.iterdir())


def test_discard_does_not_touch_a_checkpoint_whose_step_shares_a_prefix(tmp_path: Path):
    files.commit(tmp_path, _fake_checkpoint(tmp_path, 1), 1)
    files.commit(tmp_path, _fake_checkpoint(tmp_path, 10), 10)
    files.discard(tmp_path, "ckpt-1")
    assert files.committed_steps(tmp_path) == [10] and files.verify(tmp_path, "ckpt-10") is None


def test_leftovers_are_crashed_or_superseded_checkpoints(tmp_path: Path):
    for step in (1, 2, 3):
        files.commit(tmp_path, _fake_checkpoint(tmp_path, step), step)
    (tmp_path / "ckpt-4_temp").mkdir()  # a sharded save killed before its merge
    (tmp_path / "ckpt-5.data-00000-of-00001.tempstate99").write_bytes(b"")
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "ckpt-3"\n')
    (tmp_path / "checkpoint.tmp123").write_text("half")
    assert files.leftovers(tmp_path, {"ckpt-2", "ckpt-3"}) == {"ckpt-1", "ckpt-4", "ckpt-5"}
    assert [p.name for p in files.stray_temp_files(tmp_path)] == ["checkpoint.tmp123"]


def test_step_of_names():
    assert files.step_of("ckpt-12") == 12 and files.checkpoint_name(12) == "ckpt-12"
    assert files.step_of("ckpt-x") is None and files.step_of("checkpoint") is None
