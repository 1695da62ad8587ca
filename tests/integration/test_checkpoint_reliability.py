"""Checkpoints survive crashes, damage and full disks (issue 6).

- SIGKILL at random moments during saves: every restore, in a process that never saw the saver's memory,
  gets the last completed step with that step's values (tests/scripts/checkpoint_crash.py does the killing).
- A truncated or corrupted newest checkpoint is detected and the previous one used, with a message; a
  damaged `checkpoint` index file is reported and does not cost the newest checkpoint; nothing loadable is
  a one-line error, exit 2, naming the directory.
- A run directory on a read-only or too small filesystem is refused before anything is written; a disk that
  fills up mid-run stops the run with one line naming the directory, and the last good checkpoint loads.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, REPO, TINY_CLASSIFIER, run_cmd, strata

pytestmark = pytest.mark.slow
CRASH_SCRIPT = str(REPO / "tests" / "scripts" / "checkpoint_crash.py")
KILLS = 20


def _error_line(done: subprocess.CompletedProcess) -> str:
    """The single `strata: error:` line of a failed command (and nothing else on stderr)."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert len(lines) == 1 and lines[0].startswith("strata: error: "), done.stderr
    return lines[0]


# ------------------------------------------------------------------------------------- SIGKILL
def test_sigkill_at_random_moments_during_saves_never_loses_the_last_checkpoint(tmp_path: Path):
    directory = tmp_path / "checkpoints"
    done = run_cmd([sys.executable, CRASH_SCRIPT, "kill", "--dir", str(directory), "--kills", str(KILLS),
                    "--seed", "6"], timeout=400)
    print(done.stdout)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"kills {summary['kills']}, restores tried {summary['restores']}, failed {summary['failed_restores']}, "
          f"killed mid-save {summary['killed_mid_save']}, fallbacks {summary['fallbacks']}")
    assert summary["restores"] == KILLS and summary["failed_restores"] == 0
    assert summary["killed_mid_save"] >= KILLS // 2, "most kills must land inside a save to test anything"

    # And once more from a process started from scratch (not forked from the killer).
    fresh = run_cmd([sys.executable, CRASH_SCRIPT, "restore", "--dir", str(directory)], timeout=180)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    restored = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert restored["step"] == summary["last_restored"] and restored["wrong"] == []


# ------------------------------------------------------------------------------------- damage
STEPS, EVERY = 30, 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run with checkpoints at steps 10, 20 and 30."""
    run_dir = tmp_path_factory.mktemp("reliability") / "run"
    done = strata("train", str(CONFIGS / "classifier.yaml"), *TINY_CLASSIFIER, "--set", f"run_dir={run_dir}",
                  "--set", f"train.steps={STEPS}", "--set", f"checkpoint.every={EVERY}", "--set", "eval.every=1000")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.fixture
def run_copy(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _evaluated_step(run_dir: Path) -> tuple[int, str]:
    done = strata("evaluate", str(run_dir), "--split", "val", timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["step"], done.stderr


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,reason", [
    (_truncate, "(truncated or overwritten)"),
    (_flip_a_byte, "does not match its sha256"),
], ids=["truncated-data", "corrupted-data"])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_message(run_copy: Path, damage, reason: str):
    damage(run_copy / "checkpoints" / f"ckpt-{STEPS}.data-00000-of-00001")
    step, stderr = _evaluated_step(run_copy)
    assert step == STEPS - EVERY
    assert f"ckpt-{STEPS} skipped: ckpt-{STEPS}.data-00000-of-00001" in stderr and reason in stderr, stderr


def test_a_damaged_index_file_is_reported_and_the_newest_checkpoint_still_used(run_copy: Path):
    index = run_copy / "checkpoints" / "checkpoint"
    index.write_bytes(index.read_bytes()[:20])  # cut mid-line, as a torn write would
    step, stderr = _evaluated_step(run_copy)
    assert step == STEPS  # the manifests, not the index, say what is committed
    assert f"checkpoint index {index} ignored" in stderr, stderr


def test_a_resumed_run_replaces_the_damaged_checkpoint(run_copy: Path):
    _truncate(run_copy / "checkpoints" / f"ckpt-{STEPS}.index")
    done = strata("train", str(CONFIGS / "classifier.yaml"), *TINY_CLASSIFIER, "--set", f"run_dir={run_copy}",
                  "--set", f"train.steps={STEPS}", "--set", f"checkpoint.every={EVERY}", "--set", "eval.every=1000")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"ckpt-{STEPS} skipped" in done.stderr
    step, stderr = _evaluated_step(run_copy)
    assert step == STEPS and "skipped" not in stderr  # rewritten from step 20, and intact again


def test_no_loadable_checkpoint_is_one_line_exit_2_naming_the_directory(run_copy: Path):
    for data in (run_copy / "checkpoints").glob("*.data-*"):
        _truncate(data)
    done = strata("evaluate", str(run_copy), timeout=180)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"strata: error: {run_copy / 'checkpoints'}: none of the 3 checkpoints can be loaded")
    assert done.stderr.count("skipped:") == 3  # each one said why before giving up


# --------------------------------------------------------------------------------- disk space
@pytest.fixture
def tmpfs(tmp_path: Path):
    """Mount small tmpfs filesystems under tmp_path (root only); unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: str, *, read_only: bool = False) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); needs root")
        mounted.append(point)
        return point

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], timeout=30)


def _train_into(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return strata("train", str(CONFIGS / "classifier.yaml"), *TINY_CLASSIFIER, "--set", f"run_dir={run_dir}",
                  "--set", "train.steps=60", "--set", "checkpoint.every=10", "--set", "eval.every=1000", *extra)


@pytest.mark.parametrize("size,read_only,fragment", [
    ("1m", True, "cannot write here"),
    ("64k", False, "not enough disk space for checkpoints"),
], ids=["read-only", "too-small"])
def test_an_unusable_filesystem_is_refused_before_anything_is_written(tmpfs, size, read_only, fragment):
    run_dir = tmpfs(size, read_only=read_only) / "run"
    line = _error_line(_train_into(run_dir))
    assert line.startswith(f"strata: error: {run_dir}: ") and fragment in line, line
    assert not run_dir.exists()


def test_a_disk_that_fills_up_mid_run_keeps_the_last_good_checkpoint(tmpfs):
    # 160 KiB holds the run's small files and one checkpoint (~75 KiB), not two: the second save fails.
    run_dir = tmpfs("160k") / "run"
    line = _error_line(_train_into(run_dir, "--set", "checkpoint.check_free_space=false"))
    checkpoints = run_dir / "checkpoints"
    assert line.startswith(f"strata: error: {checkpoints}: saving checkpoint ckpt-") and "the disk is full" in line
    failed = line.split("saving checkpoint ")[1].split()[0]
    latest = line.split("; ")[1].split()[0]  # "ckpt-N is the latest checkpoint"
    assert not list(checkpoints.glob(f"{failed}.*")), "the failed save must leave nothing behind"
    assert f'model_checkpoint_path: "{latest}"' in (checkpoints / "checkpoint").read_text()
    assert _evaluated_step(run_dir)[0] == int(latest.split("-")[1])
