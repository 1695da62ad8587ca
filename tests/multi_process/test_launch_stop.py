"""Ctrl-C and SIGTERM to `strata launch -np 2` (Horovod, Gloo): the launcher passes the signal on to the ranks,
which stop after the same step and save it; the launcher reports a stop, not a failure, and exits 130 / 75.
The relaunched job ends with the weights of an uninterrupted 2-rank job (the ranks' weight digests, and the
final checkpoints read in this process)."""
from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CONFIGS, STRATA, TINY_CLASSIFIER, run_cmd
from tests.integration.test_stopping import RESUMING, saved_step, signalled, weights

pytestmark = [pytest.mark.multi_process, pytest.mark.slow]
STEPS = 300
COMMON = [*TINY_CLASSIFIER, "--set", "train.log_every=1", "--set", "eval.every=1000", "--set", "checkpoint.every=1000",
          "--set", "optimizer.warmup_steps=0", "--set", f"train.steps={STEPS}"]
LAUNCHER_STOPPED = r"^strata: stopped at step (\d+) by {} \(checkpoint saved\); run the same command to resume$"


def launch_argv(run_dir: Path) -> list[str]:
    return [STRATA, "launch", "-np", "2", "--backend", "horovod", str(CONFIGS / "classifier.yaml"), *COMMON,
            "--set", f"run_dir={run_dir}"]


def digest(out: str) -> str:
    (value,) = set(re.findall(r"strata: rank \d weights sha256 (\w+)", out))  # one value: both ranks agree
    return value


def stopped_by(out: str, what: str) -> int:
    """The stop step, as the launcher's own last line says it; the chief said the same."""
    assert out.rstrip("\n").splitlines()[-1].startswith("strata: stopped at step"), out[-2000:]
    (step,) = [int(n) for n in re.findall(LAUNCHER_STOPPED.format(what), out, re.M)]
    assert re.search(rf"^\S*strata: stopped at step {step} by {what} \(checkpoint saved\)", out, re.M), out[-2000:]
    assert "job failed" not in out and "SIGKILL" not in out and "Traceback" not in out, out[-3000:]
    assert "weights identical on all 2 ranks" in out  # both ranks stopped after the same step
    return step


def test_ctrl_c_and_sigterm_to_the_launcher_stop_every_rank_at_one_saved_step(tmp_path: Path):
    reference, run_dir = tmp_path / "straight", tmp_path / "run"
    began = time.monotonic()
    straight = run_cmd(launch_argv(reference), timeout=400)
    assert straight.returncode == 0, (straight.stdout + straight.stderr)[-3000:]

    sent = time.monotonic()
    code, out = signalled(launch_argv(run_dir), [(rf"step 5/{STEPS} loss", signal.SIGINT)], timeout=400)
    ctrl_c_s = time.monotonic() - sent
    assert code == 130, out[-3000:]
    first = stopped_by(out, "Ctrl-C")
    assert 5 <= first < STEPS and saved_step(run_dir) == first

    code, out = signalled(launch_argv(run_dir), [(rf"step {first + 5}/{STEPS} loss", signal.SIGTERM)], timeout=400)
    assert code == 75, out[-3000:]
    assert re.search(RESUMING.format(n=first).lstrip("^"), out, re.M), out[-3000:]
    second = stopped_by(out, "SIGTERM")
    assert first + 5 <= second < STEPS and saved_step(run_dir) == second

    done = run_cmd(launch_argv(run_dir), timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert re.search(RESUMING.format(n=second).lstrip("^"), done.stdout, re.M)
    assert digest(done.stdout) == digest(straight.stdout)
    a, b = weights(reference), weights(run_dir)
    assert a.keys() == b.keys() and len(a) > 10 and all(np.array_equal(a[k], b[k]) for k in a)
    print(f"\nlaunch -np 2: Ctrl-C at step 5 -> stopped at {first}, exit 130 ({ctrl_c_s:.1f} s for that launch); "
          f"SIGTERM at {first + 5} -> stopped at {second}, exit 75; relaunch: weights equal the uninterrupted "
          f"job's; four launches {time.monotonic() - began:.1f} s")
