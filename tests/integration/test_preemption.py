"""Preemption in the trainer (trainer/preemption.py), without SLURM: a signal makes every rank stop after the
same step, checkpoint it and exit 75; the next start resumes there and no step is done twice.
(tests/cluster/ runs the same through real sbatch, srun and scontrol requeue; tests/integration/test_stopping.py
covers Ctrl-C.)"""
from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from tests.conftest import CONFIGS, STRATA, TINY_CLASSIFIER, child_env, run_cmd, strata
from tests.readback import trainable_weights

pytestmark = pytest.mark.slow
CONFIG = str(CONFIGS / "classifier.yaml")
COMMON = [*TINY_CLASSIFIER, "--set", "train.log_every=1", "--set", "eval.every=1000", "--set", "checkpoint.every=1000",
          "--set", "optimizer.warmup_steps=0"]


def _saved_step(run_dir: Path) -> int:
    return int(tf.train.load_checkpoint(str(run_dir / "checkpoints")).get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))


_weights = trainable_weights  # the run's trainable weights, from its newest checkpoint


def _tb_steps(run_dir: Path) -> list[int]:
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0},
                                             purge_orphaned_data=False)  # keep duplicates, if any
    acc.Reload()
    return [e.step for e in acc.Tensors("train/loss")]


def test_agreed_stop_checkpoints_exits_75_and_resumes_exactly(tmp_path: Path):
    run_dir = tmp_path / "run"
    args = ["train", CONFIG, *COMMON, "--set", f"run_dir={run_dir}", "--set", "train.steps=20"]
    # The warning arrives after step 7; one process needs no agreement: it stops after that step.
    first = run_cmd([STRATA, *args], STRATA_FAULT="0:7:usr1")
    assert first.returncode == 75, first.stderr[-3000:]
    assert "strata: stopped at step 7 by SIGUSR1 (preemption warning) (checkpoint saved)" in first.stdout
    assert _saved_step(run_dir) == 7
    resumed = strata(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.findall(r"^step (\d+)/20 loss", resumed.stdout, re.M)[0] == "8"
    assert _tb_steps(run_dir) == list(range(1, 21))
    # ... and ends with the weights of the same 20 steps never interrupted.
    straight = tmp_path / "straight"
    done = strata("train", CONFIG, *COMMON, "--set", f"run_dir={straight}", "--set", "train.steps=20")
    assert done.returncode == 0, done.stderr[-3000:]
    final, reference = _weights(run_dir), _weights(straight)
    assert final.keys() == reference.keys() and final
    for name in final:
        np.testing.assert_allclose(final[name], reference[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_a_real_sigterm_mid_run(tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([STRATA, "train", CONFIG, *COMMON, "--set", f"run_dir={run_dir}", "--set", "train.steps=5000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=child_env())
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 30/5000"):
                sent = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + rest
    assert proc.returncode == 75, out[-3000:]
    (stop,) = [int(s) for s in re.findall(r"stopped at step (\d+) by SIGTERM \(checkpoint saved\)", out)]
    assert 30 <= stop < 5000 and _saved_step(run_dir) == stop
    print(f"SIGTERM at step 30 -> stopped and checkpointed at step {stop}, exit 75 after {time.monotonic() - sent:.1f} s")


@pytest.mark.multi_process
def test_a_signal_on_one_rank_stops_both_at_the_same_step(tmp_path: Path):
    run_dir = tmp_path / "run"
    done = run_cmd([STRATA, "launch", "-np", "2", "--backend", "horovod", CONFIG, *COMMON, "--set", f"run_dir={run_dir}",
                    "--set", "train.steps=40"], timeout=300, STRATA_FAULT="1:7:usr1")
    out = done.stdout + done.stderr
    assert done.returncode == 75, out[-3000:]  # checkpoint saved: run again
    # Rank 1 votes from its next step on; the vote rides in step 8's all-reduce, so both stop after step 8.
    assert "strata: stopped at step 8 by SIGUSR1 (preemption warning) (checkpoint saved)" in out, out[-3000:]
    assert "weights identical on all 2 ranks" in out  # rank 0, never signalled, stopped after the same step
    assert _saved_step(run_dir) == 8
