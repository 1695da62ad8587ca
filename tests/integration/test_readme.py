"""The README's commands work: every command line in its ```bash blocks is executed here, in the README's
order, from a scratch directory laid out like a checkout (`configs/` beside `runs/`), with small sizes added.

A command that cannot run on this machine (other nodes, a GPU partition, this suite itself) is listed in
NOT_RUN with the reason and what is checked instead; a README command that is neither run nor listed fails the
test, so a new README command is covered the day it is written.
"""
from __future__ import annotations

import re
import shlex
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, STRATA, child_env

pytestmark = pytest.mark.slow

# Small sizes for every command that trains or submits training (appended after the README's own --set flags,
# so they win).
SMALL = ["train.steps=6", "train.log_every=3", "eval.every=6", "checkpoint.every=6", "eval.rouge_examples=4",
         "data.builtin.train_examples=400", "data.builtin.val_examples=64", "data.builtin.test_examples=64",
         "logging.progress_bar=false"]

# README command (as written, comment removed) -> (why it is not run as written, the check made instead)
NOT_RUN = {
    "make demo": ("installs and trains at full size", "its recipe's strata commands run here, with small sizes"),
    "make test": ("is this test suite", None),
    "strata launch -np 8 -H node1:4,node2:4 configs/transformer_large.yaml": (
        "needs two other machines", "refused before anything starts, naming the unreachable host"),
    "strata slurm submit configs/classifier.yaml --nodes 4 --gpus-per-node 8 --time 12:00:00 --partition gpu": (
        "needs a GPU partition", "run with --dry-run: the real checks refuse it in one line"),
}


def readme_commands() -> list[str]:
    """Every command line of the README's ```bash blocks, without its trailing comment, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def demo_commands() -> list[str]:
    """The strata commands of the Makefile's `demo` recipe."""
    recipe = re.search(r"^demo:.*?\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M).group(1)
    lines = recipe.replace("\\\n", " ").splitlines()
    return [shlex.join(["strata", *shlex.split(line)[1:]]) for line in lines if line.strip().startswith("$(STRATA)")]


class Sizes:
    """Adds the small sizes to training commands. The first command that trains a config keeps its default run
    directory (the README's evaluate/classify/export lines read it); a later one gets its own, so that it
    trains for real instead of finding its steps done."""

    def __init__(self) -> None:
        self.trained: set[str] = set()

    def __call__(self, words: list[str]) -> list[str]:
        trains = words[1:2] in (["train"], ["launch"]) or words[1:3] == ["slurm", "submit"]
        if words[0] != "strata" or not trains:
            return words
        config = next(w for w in words[2:] if w.endswith(".yaml") or w.startswith("runs/"))
        extra = list(SMALL)
        if config.endswith(".yaml") and config in self.trained:
            extra.append(f"run_dir=runs/readme-{len(self.trained)}-{Path(config).stem}")
        self.trained.add(config)
        return words + [x for s in extra for x in ("--set", s)]


def _run(words: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    argv = [STRATA, *words[1:]] if words[0] == "strata" else words
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=child_env())


def _tensorboard_answers(words: list[str], cwd: Path) -> None:
    """`strata tensorboard RUN` serves until stopped: it must answer HTTP on 127.0.0.1, then stop on Ctrl-C."""
    from launch.env import free_ports

    port = free_ports(1)[0]
    proc = subprocess.Popen([STRATA, *words[1:], "--port", str(port)], cwd=cwd, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.5)
        else:
            pytest.fail(f"{shlex.join(words)}: nothing listening on 127.0.0.1:{port} after 90 s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_every_readme_command_runs(tmp_path: Path):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    small, ran, checked = Sizes(), [], []
    for command in readme_commands():
        words = shlex.split(command)
        if command in NOT_RUN:
            why, check = NOT_RUN[command]
            if check is None:
                continue
            if command == "make demo":
                demo = tmp_path / "demo"
                demo.mkdir()
                (demo / "configs").symlink_to(REPO / "configs")
                demo_small = Sizes()
                for line in demo_commands():
                    done = _run(demo_small(shlex.split(line)), demo)
                    assert done.returncode == 0, f"make demo: {line}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            elif words[:3] == ["strata", "slurm", "submit"]:
                done = _run(small(words) + ["--dry-run"], tmp_path)
                assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, (command, done.stderr)
                assert "partition" in done.stderr or "GPU" in done.stderr, done.stderr
            else:
                done = _run(words, tmp_path, timeout=120)
                assert done.returncode == 2 and "node1" in done.stderr, (command, done.stderr)
            checked.append(command)
            continue
        assert words[0] == "strata", f"README command {command!r} is neither run here nor listed in NOT_RUN"
        if words[1] == "tensorboard":
            _tensorboard_answers(words, tmp_path)
        else:
            done = _run(small(words), tmp_path)
            assert done.returncode == 0, f"README command failed: {command}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        ran.append(command)
    unused = set(NOT_RUN) - set(readme_commands())
    assert not unused, f"NOT_RUN lists commands the README no longer has: {unused}"
    print(f"\nREADME commands run: {len(ran)}; checked instead: {len(checked)}")
    assert len(ran) >= 10
