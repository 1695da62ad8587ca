"""Crash-safe bookkeeping for the files of TensorFlow checkpoints (pure Python: no TensorFlow import).

Why this exists. TensorFlow writes a checkpoint `ckpt-N` as `ckpt-N.data-*` shards and a `ckpt-N.index`
table. Its `BundleWriter` writes each file under a `.tempstate<random>` name and renames it when complete,
and `CheckpointManager` replaces the `checkpoint` index file with an atomic rename; but nothing is fsynced,
and a sharded save (several devices) merges the shards' tables into `ckpt-N.index` by writing that file in
place (`MergeBundles` in tensor_bundle.cc), so a crash can leave a truncated `.index`. Nor does anything
detect a checkpoint damaged later (a truncated copy, a bad disk).

So every checkpoint gets a manifest, `ckpt-N.manifest.json`: the size and sha256 of each of its files. The
manifest is written only after the files are complete and fsynced, and it is itself committed with
write-to-temp + fsync + os.replace + fsync of the directory. A checkpoint exists when, and only when, its
manifest does: that rename is the commit point of a save. Restoring walks the manifests newest to oldest
and uses the first checkpoint whose files still match.

The `checkpoint` index file is still written (after the commit), so TensorFlow's own tools
(`tf.train.latest_checkpoint`, `tf.train.load_checkpoint`) keep working; Strata does not rely on it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

# Names launch/stopping.py reads too, so they live in the launcher-to-worker contract.
from launch.contract import CHECKPOINT_PREFIX as PREFIX, MANIFEST_SUFFIX, manifest_step
INDEX_FILE = "checkpoint"  # TensorFlow's CheckpointState file naming the latest checkpoint
FORMAT = 1
_NAME = re.compile(rf"^{PREFIX}-(\d+)$")
_TEMP_MARKERS = (".tempstate", ".tmp")  # TensorFlow's and ours: files of a save that never finished
_CHUNK = 1 << 20


def checkpoint_name(step: int) -> str:
    """`ckpt-<step>`: the prefix TensorFlow's files of that checkpoint start with."""
    return f"{PREFIX}-{step}"


def step_of(name: str) -> int | None:
    """The step in a `ckpt-<step>` name, or None if `name` is not one."""
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


# ------------------------------------------------------------------------------------- durable files
def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk, not just to the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader (or a crash) sees the old file or the new, never a part.

    Temp file in the same directory (rename is atomic only within a filesystem), fsync it, rename it over
    the target, fsync the directory so the rename itself survives a power loss.
    """
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in chunks (checkpoints can be gigabytes)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


# ---------------------------------------------------------------------------------------- manifests
def manifest_path(directory: Path, name: str) -> Path:
    return directory / f"{name}{MANIFEST_SUFFIX}"


def checkpoint_files(directory: Path, name: str) -> list[Path]:
    """The finished files of checkpoint `name`: its `.index` and `.data-*` shards (no temp files)."""
    files = [directory / f"{name}.index", *sorted(directory.glob(f"{name}.data-*"))]
    return [f for f in files if f.is_file() and not any(m in f.name for m in _TEMP_MARKERS)]


def commit(directory: Path, name: str, step: int) -> dict:
    """Make checkpoint `name` durable and record it: fsync its files, then atomically write its manifest.

    Raises FileNotFoundError if TensorFlow left no `.index` (the save did not finish).
    """
    files = checkpoint_files(directory, name)
    if not any(f.suffix == ".index" for f in files):
        raise FileNotFoundError(f"{directory / name}.index was not written")
    for f in files:
        fsync_path(f)
    fsync_path(directory)  # the renames TensorFlow did, before the manifest that vouches for them
    entries = {}
    for f in files:
        size, sha = file_digest(f)
        entries[f.name] = {"size": size, "sha256": sha}
    manifest = {"format": FORMAT, "step": step, "name": name, "files": entries}
    atomic_write_text(manifest_path(directory, name), json.dumps(manifest, indent=1) + "\n")
    return manifest


def committed_steps(directory: Path) -> list[int]:
    """Steps that have a manifest file, newest first (whether the files still verify is `verify`'s job)."""
    if not directory.is_dir():
        return []
    steps = (manifest_step(p.name) for p in directory.iterdir())
    return sorted((step for step in steps if step is not None), reverse=True)


def indexed_steps(directory: Path) -> list[int]:
    """Steps that have a `.index` file, newest first (for directories written before manifests existed)."""
    if not directory.is_dir():
        return []
    steps = (step_of(p.name.removesuffix(".index")) for p in directory.glob(f"{PREFIX}-*.index"))
    return sorted((s for s in steps if s is not None), reverse=True)


def verify(directory: Path, name: str) -> str | None:
    """Why checkpoint `name` cannot be trusted, or None if every file matches its manifest."""
    path = manifest_path(directory, name)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict) or not files:
            return f"{path.name} has an unknown format"
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        return f"{path.name} is unreadable ({type(err).__name__})"
    for file_name, expected in files.items():
        problem = _check_file(directory / file_name, expected)
        if problem:
            return problem
    return None


def _check_file(path: Path, expected: dict) -> str | None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path.name} is missing"
    if size != expected.get("size"):
        return f"{path.name} is {size} bytes, its manifest says {expected.get('size')} (truncated or overwritten)"
    if file_digest(path)[1] != expected.get("sha256"):
        return f"{path.name} does not match its sha256 in the manifest (corrupted)"
    return None


# --------------------------------------------------------------------------------- index and cleanup
@dataclass(frozen=True)
class IndexState:
    """What TensorFlow's `checkpoint` file says: the latest name and every name it lists (oldest first)."""

    latest: str
    all_names: tuple[str, ...]


_INDEX_LINE = re.compile(r'^(model_checkpoint_path|all_model_checkpoint_paths): "([^"\\]*)"$')
_INDEX_NUMBER = re.compile(r"^(all_model_checkpoint_timestamps|last_preserved_timestamp): [0-9.eE+-]+$")


def read_index(directory: Path) -> tuple[IndexState | None, str | None]:
    """(state, None) from the `checkpoint` file, (None, None) if there is none, (None, why) if it is bad."""
    path = directory / INDEX_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as err:
        return None, f"unreadable ({type(err).__name__})"
    latest, names = None, []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or _INDEX_NUMBER.match(line):
            continue
        match = _INDEX_LINE.match(line)
        if not match:
            return None, f"line {number} is not a CheckpointState entry"
        if match.group(1) == "model_checkpoint_path":
            latest = match.group(2)
        else:
            names.append(match.group(2))
    if latest is None:
        return None, "it names no checkpoint"
    return IndexState(latest, tuple(names)), None


def write_index(directory: Path, names: list[str]) -> None:
    """Point TensorFlow's `checkpoint` file at `names` (oldest first; the last is the latest)."""
    lines = [f'model_checkpoint_path: "{names[-1]}"'] + [f'all_model_checkpoint_paths: "{n}"' for n in names]
    atomic_write_text(directory / INDEX_FILE, "\n".join(lines) + "\n")


def discard(directory: Path, name: str) -> None:
    """Delete checkpoint `name`: its manifest FIRST, so a crash midway never leaves a manifest vouching
    for files that are gone. Temp files and TensorFlow's `<name>_temp/` shard folder go too."""
    manifest_path(directory, name).unlink(missing_ok=True)
    for path in directory.glob(f"{name}.*"):
        path.unlink(missing_ok=True)
    shutil.rmtree(directory / f"{name}_temp", ignore_errors=True)


def leftovers(directory: Path, keep: set[str]) -> set[str]:
    """Names of checkpoints with files on disk but not in `keep`: saves that crashed or were superseded."""
    found = set()
    for path in directory.iterdir():
        base = path.name.split(".", 1)[0].removesuffix("_temp")
        if step_of(base) is not None and base not in keep:
            found.add(base)
    return found


def stray_temp_files(directory: Path) -> list[Path]:
    """Temp files of index/manifest writes that never reached their rename (not tied to a checkpoint)."""
    return [p for p in directory.iterdir() if p.is_file() and p.name.startswith(f"{INDEX_FILE}.tmp")]
