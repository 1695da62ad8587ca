"""Shared test helpers: run the real `strata` / `python -m trainer` commands in subprocesses."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STRATA = str(Path(sys.executable).parent / "strata")
CONFIGS = REPO / "configs"

# Small, fast settings shared by training tests (tiny corpora, few steps, no progress bar).
TINY_CLASSIFIER = [
    "--set", "data.builtin.train_examples=1200", "--set", "data.builtin.val_examples=200",
    "--set", "data.builtin.test_examples=200", "--set", "logging.progress_bar=false",
]


def child_env(**extra: str) -> dict[str, str]:
    # TF_ENABLE_ONEDNN_OPTS=1: TensorFlow takes its oneDNN path on every x86-64 CPU (where it prints its own
    # log lines at import, whatever TF_CPP_MIN_LOG_LEVEL says), not only on the CPUs it turns it on for.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", "TF_ENABLE_ONEDNN_OPTS": "1", **extra}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cmd(argv: list[str], *, timeout: float = 300, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """Run a command to completion and return it (never hangs past `timeout`)."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO, env=child_env(**env))


def strata(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_cmd([STRATA, *args], timeout=timeout, cwd=cwd)


def trainer(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "-m", "trainer", *args], timeout=timeout, cwd=cwd)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


_SERVE = """
import json, sys, tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
result = model.signatures["serving_default"](text=tf.constant(json.loads(sys.argv[2])))
print(json.dumps([x.decode() if isinstance(x, bytes) else x.tolist() for x in result[sys.argv[3]].numpy()]))
"""


def serve_in_fresh_process(saved_model: Path, texts: list[str], output: str) -> list:
    """Load an exported SavedModel in a new process that imports only TensorFlow; raw text in, `output` out."""
    import json

    done = run_cmd([sys.executable, "-c", _SERVE, str(saved_model), json.dumps(texts), output], timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
