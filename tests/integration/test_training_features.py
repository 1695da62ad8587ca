"""Loop features through the real command: gradient accumulation is exact, early stopping stops,
`strata doctor` reports a usable install, `strata tensorboard` binds to 127.0.0.1 only."""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import CONFIGS, STRATA, TINY_CLASSIFIER, child_env, strata
from tests.readback import trainable_weights

pytestmark = pytest.mark.slow


def _train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    done = strata("train", str(CONFIGS / "classifier.yaml"), *TINY_CLASSIFIER, "--set", f"run_dir={run_dir}", *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


_weights = trainable_weights  # the run's trainable weights, from its newest checkpoint


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path):
    # Plain SGD with momentum: its update is proportional to the gradient, so micro-step gradients summed
    # with the wrong scale (e.g. each normalised by its own micro-batch) change the weights; Adam would
    # divide a constant scale out.
    common = ["--set", "train.steps=8", "--set", "eval.every=1000", "--set", "optimizer.warmup_steps=0",
              "--set", "optimizer.name=sgd", "--set", "optimizer.lr=0.5", "--set", "optimizer.momentum=0.9"]
    _train(tmp_path / "one", *common)
    _train(tmp_path / "four", *common, "--set", "train.grad_accum=4")
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "four")
    assert a.keys() == b.keys() and a
    for name in a:  # same math, different summation order: float32 rounding only
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_early_stopping_stops_on_the_chosen_metric(tmp_path: Path):
    # Loss falls while training, so in "max" mode it never improves: stop after 1 + patience evaluations.
    done = _train(tmp_path / "run", "--set", "train.steps=200", "--set", "eval.every=5", "--set", "checkpoint.every=5",
                  "--set", "train.early_stopping={metric: val_loss, mode: max, patience: 2}")
    assert "step 15/200 (early stopping: val loss did not improve for 2 evaluations)" in done.stdout, done.stdout
    assert tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints")).get_tensor(
        "step/.ATTRIBUTES/VARIABLE_VALUE") == 15


def test_doctor_reports_tensorflow_horovod_and_mpi():
    done = strata("doctor", timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = {line.split("]", 1)[1].split()[0]: line for line in done.stdout.splitlines() if line.startswith("[")}
    assert lines["tensorflow"].startswith("[  ok]") and "2.21" in lines["tensorflow"]
    assert lines["horovod"].startswith("[  ok]") and "gloo" in lines["horovod"] and "mpi" in lines["horovod"]
    assert lines["mpirun"].startswith("[  ok]")
    assert done.stdout.strip().endswith("verdict: ready")
    assert all(c.isprintable() or c == "\n" for c in done.stdout), repr(done.stdout)  # mpi4py's line ended in NUL


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                found.append(local.rsplit(":", 1)[0])
    return found


def test_tensorboard_binds_to_loopback_only(tmp_path: Path):
    import json
    import urllib.request

    from launch.env import free_ports

    run_dir = tmp_path / "my-run"
    with tf.summary.create_file_writer(str(run_dir / "tensorboard")).as_default(step=1):
        tf.summary.scalar("train/loss", 0.5)
    port = free_ports(1)[0]
    env = child_env()
    env.pop("TF_CPP_MIN_LOG_LEVEL")  # as a user runs it (TF_ENABLE_ONEDNN_OPTS=1: TensorFlow's lines on any CPU)
    proc = subprocess.Popen([STRATA, "tensorboard", str(run_dir), "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not _listening(port):
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        assert _listening(port) == ["0100007F"], "TensorBoard must listen on 127.0.0.1 only"
        runs = []
        while time.time() < deadline and not runs:  # what a browser's run list shows, once the files are read
            runs = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=10).read())
            time.sleep(0.5)
        assert runs == ["my-run"], runs  # was ["."]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    output = proc.stdout.read()  # TensorBoard imports TensorFlow: none of TensorFlow's own lines are shown
    assert "TensorBoard" in output and not re.search(r"^[IWEF]\d{4} \d+:\d+|absl::InitializeLog", output, re.M), output
