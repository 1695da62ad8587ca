"""Stopping and resuming `strata train` without surprises (trainer/preemption.py, trainer/resume.py).

Real signals to a real `strata train`: Ctrl-C (SIGINT) and SIGTERM stop after the current step, save it,
say so and exit 130 / 75; the resumed runs end with exactly the weights of an uninterrupted run (read from
the checkpoints in this process, not the trainer's). A second Ctrl-C stops at once and says which steps
will be redone. Every start says where it starts. A changed `train.steps` is applied or refused, and a run
with nothing left to do says so, without importing TensorFlow (a stand-in `tensorflow` that raises on
import is first on the path)."""
from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import CONFIGS, STRATA, TINY_CLASSIFIER, child_env, run_cmd
from trainer.optim import WarmupSchedule

pytestmark = pytest.mark.slow
STEPS = 300  # long enough that a signal sent at step 5 lands well before the end, even on a busy machine
COMMON = [*TINY_CLASSIFIER, "--set", "train.log_every=1", "--set", "eval.every=1000", "--set", "checkpoint.every=1000",
          "--set", "model.dropout=0.3"]  # dropout: the RNG state must resume too
STOPPED = r"^strata: stopped at step (\d+) by {} \(checkpoint saved\); run the same command to resume$"
RESUMING = r"^strata: resuming from step {n} \(checkpoint ckpt-{n}, saved \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\)$"
EVALUATED = re.compile(r"^(step \d+: validation |strata: step \d+/\d+ \| validation)", re.M)  # an evaluation's lines


def train_argv(run_dir: Path, *extra: str) -> list[str]:
    return [STRATA, "train", str(CONFIGS / "classifier.yaml"), *COMMON, "--set", f"run_dir={run_dir}",
            "--set", f"train.steps={STEPS}", *extra]


def signalled(argv: list[str], plan: list[tuple[str, int]], *, env: dict[str, str] | None = None,
              timeout: float = 300) -> tuple[int, str]:
    """Run `argv`; when a line matches plan[0]'s pattern, send its signal to the process and go on to the next
    entry. Returns (exit code, merged output)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or child_env())
    lines, deadline = [], time.monotonic() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if plan and re.search(plan[0][0], line):
                proc.send_signal(plan.pop(0)[1])
            assert time.monotonic() < deadline, "".join(lines[-40:])
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not plan, f"never saw {plan[0][0]!r}:\n{''.join(lines[-40:])}"
    return proc.returncode, "".join(lines)


def saved_step(run_dir: Path) -> int:
    return int(tf.train.load_checkpoint(str(run_dir / "checkpoints")).get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))


def weights(run_dir: Path) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map() if "save_counter" not in name}


def step_lines(out: str) -> list[int]:
    return [int(s) for s in re.findall(rf"^step (\d+)/{STEPS} loss", out, re.M)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted run (and its output): the reference, and a finished run directory."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    done = run_cmd(train_argv(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done.stdout


def test_ctrl_c_and_sigterm_stop_at_a_saved_step_and_resume_to_the_same_weights(tmp_path: Path, straight):
    reference, straight_out = straight
    assert re.search(r"^strata: starting at step 0$", straight_out, re.M)
    run_dir, started = tmp_path / "run", time.monotonic()

    code, out = signalled(train_argv(run_dir), [(rf"^step 5/{STEPS} ", signal.SIGINT)])
    assert code == 130, out[-3000:]
    (first,) = [int(n) for n in re.findall(STOPPED.format("Ctrl-C"), out, re.M)]
    assert "Traceback" not in out and not EVALUATED.search(out)  # nothing beyond the stop: no evaluation
    assert 5 <= first < STEPS and saved_step(run_dir) == first and step_lines(out)[-1] == first

    code, out = signalled(train_argv(run_dir), [(rf"^step {first + 5}/{STEPS} ", signal.SIGTERM)])
    assert code == 75, out[-3000:]
    assert re.search(RESUMING.format(n=first), out, re.M), out[-3000:]
    (second,) = [int(n) for n in re.findall(STOPPED.format("SIGTERM"), out, re.M)]
    assert step_lines(out)[0] == first + 1 and not EVALUATED.search(out)
    assert first + 5 <= second < STEPS and saved_step(run_dir) == second

    done = run_cmd(train_argv(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(RESUMING.format(n=second), done.stdout, re.M)
    assert step_lines(done.stdout)[0] == second + 1 and f"strata: step {STEPS}/{STEPS} " in done.stdout
    a, b = weights(reference), weights(run_dir)
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    print(f"\nCtrl-C at step 5 -> stopped at {first} (exit 130), SIGTERM at {first + 5} -> stopped at {second} "
          f"(exit 75), resumed to {STEPS}: weights equal the uninterrupted run's; three starts "
          f"{time.monotonic() - started:.1f} s")


def test_a_second_ctrl_c_stops_at_once_and_says_what_is_lost(tmp_path: Path):
    run_dir = tmp_path / "run"
    constant = ["--set", "optimizer.schedule=constant", "--set", "optimizer.warmup_steps=0",
                "--set", "checkpoint.every=5"]
    # The run hangs after step 12 (the main thread asleep in a hook, as in a stuck collective): only the
    # second Ctrl-C can end it, and it must not need the main thread.
    started = time.monotonic()
    code, out = signalled(train_argv(run_dir, *constant, "--set", "train.steps=30"),
                          [("injected fault", signal.SIGINT), ("Ctrl-C again", signal.SIGINT)],
                          env=child_env(STRATA_FAULT="0:12:hang"))
    assert code == 130, out[-3000:]
    assert ("strata: second Ctrl-C: stopping now without a checkpoint; steps after 10 (the last checkpoint) "
            "will be redone") in out
    assert "stopped at step" not in out and saved_step(run_dir) == 10
    print(f"\nsecond Ctrl-C on a run hung after step 12: exit 130 {time.monotonic() - started:.1f} s after start")

    # Resuming with more steps: the constant schedule does not depend on train.steps, so it is applied.
    done = run_cmd(train_argv(run_dir, *constant, "--set", "train.steps=40"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("strata: train.steps changed from 30 to 40: applied; the constant learning-rate schedule does not "
            "depend on it; the rate at step 10 is 0.005") in done.stdout
    assert re.search(RESUMING.format(n=10), done.stdout, re.M)
    rates = set(re.findall(r"^step \d+/40 loss \S+ lr (\S+) ", done.stdout, re.M))
    assert rates == {"5.00e-03"}  # no restart: the rate went on as it was
    assert saved_step(run_dir) == 40


def _no_tensorflow_env(tmp_path: Path) -> dict[str, str]:
    fake = tmp_path / "fake"
    (fake / "tensorflow").mkdir(parents=True)
    (fake / "tensorflow" / "__init__.py").write_text("raise ImportError('test: TensorFlow must not be imported')\n")
    env = child_env()
    env["PYTHONPATH"] = f"{fake}:{env['PYTHONPATH']}"
    return env


def test_changed_train_steps_are_decided_before_tensorflow_loads(tmp_path: Path, straight):
    run_dir, _ = straight
    env = _no_tensorflow_env(tmp_path)
    config = (run_dir / "config.yaml").read_text()

    def start(steps: int) -> subprocess.CompletedProcess:
        began = time.monotonic()
        done = subprocess.run(train_argv(run_dir, "--set", f"train.steps={steps}"), capture_output=True, text=True,
                              timeout=120, env=env)
        print(f"\ntrain.steps={steps} on a finished {STEPS}-step run: exit {done.returncode} in "
              f"{time.monotonic() - began:.2f} s")
        return done

    for steps in (STEPS, STEPS // 2):  # finished, or already past the new end: nothing to do
        done = start(steps)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout == f"strata: already at step {STEPS}, train.steps is {steps}: nothing to do\n"
    done = start(2 * STEPS)  # more steps on a cosine schedule that has decayed to 0: refused, with the fixes
    # The rate the stretched schedule would give at that step: the schedule training uses, not a copy of it.
    stretched = float(WarmupSchedule(0.005, warmup_steps=20, total_steps=2 * STEPS, decay="cosine", min_ratio=0.0)(STEPS))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        f"strata: error: {run_dir}: train.steps changed from {STEPS} to {2 * STEPS}, but the cosine learning-rate "
        f"schedule depends on it: resuming at step {STEPS} would move the rate from 0 to {stretched:.3g} (an unplanned warm "
        f"restart); keep --set train.steps={STEPS}, go on at a rate you choose with --set optimizer.schedule=constant "
        f"--set optimizer.lr=RATE, or start a new run with --set run_dir=<new dir>\n")
    assert (run_dir / "config.yaml").read_text() == config  # nothing written
