"""`strata launch` refuses bad plans before starting anything, and a dying rank stops the whole job
within seconds with a message naming the rank."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from launch.launcher import built_controllers
from tests.conftest import CONFIGS, TINY_CLASSIFIER, STRATA, run_cmd, strata

pytestmark = pytest.mark.multi_process
CONFIG = str(CONFIGS / "classifier.yaml")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["-np", "0"], "-np must be at least 1"),
        (["-np", "3", "-H", "localhost:2"], "-np 3 exceeds the 2 slots"),
        (["-np", "2", "-H", "localhost:1,no-such-host.invalid:1"], "no-such-host.invalid is unreachable"),
        (["-np", "3"], "data.batch_size (64) must be divisible by -np (3)"),
        (["-np", "2", "--backend", "multi_worker", "--mpi"], "--mpi selects Horovod's MPI controller"),
        (["-np", "2", "-H", "localhost:2", "--hostfile", "x"], "either -H or --hostfile"),
    ],
    ids=["np-zero", "more-ranks-than-slots", "unreachable-host", "batch-not-divisible", "mpi-with-multi-worker",
         "hosts-twice"],
)
def test_bad_launch_is_refused_before_start(tmp_path: Path, args: list[str], fragment: str):
    run_dir = tmp_path / "run"
    done = strata("launch", *args, CONFIG, "--set", f"run_dir={run_dir}", timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(lines) == 1 and fragment in lines[0], done.stderr
    assert not run_dir.exists()


def test_config_errors_pass_through_the_launcher(tmp_path: Path):
    done = strata("launch", "-np", "2", CONFIG, "--set", "model.hiden=1", timeout=60)
    assert done.returncode == 2 and done.stderr.strip().endswith("model.hiden: unknown key; did you mean "
                                                                 "model.hidden_dim?")


def test_controller_detection_reads_check_build_output():
    sample = ("Available Frameworks:\n    [X] TensorFlow\n\nAvailable Controllers:\n    [ ] MPI\n    [X] Gloo\n\n"
              "Available Tensor Operations:\n    [ ] NCCL\n    [X] Gloo\n    [X] MPI\n")
    assert built_controllers(sample) == {"gloo"}


@pytest.mark.parametrize("backend_args, kind", [(["--backend", "multi_worker"], "kill"), (["--backend", "horovod"], "exit")],
                         ids=["multi_worker-sigkill", "horovod-exit"])
def test_a_dead_rank_stops_the_job_and_is_named(tmp_path: Path, backend_args: list[str], kind: str):
    argv = [STRATA, "launch", "-np", "2", *backend_args, "--grace", "3", CONFIG, *TINY_CLASSIFIER,
            "--set", f"run_dir={tmp_path / 'run'}", "--set", "train.steps=400", "--set", "eval.every=1000"]
    start = time.monotonic()
    done = run_cmd(argv, timeout=300, STRATA_FAULT=f"1:5:{kind}")
    elapsed = time.monotonic() - start
    assert done.returncode != 0
    assert "injected fault: rank 1" in done.stdout + done.stderr
    failure = [line for line in done.stderr.splitlines() if line.startswith("strata: ")]
    assert failure and "rank 1" in failure[-1], done.stderr[-2000:]
    # The job must not run on: 400 steps would take far longer than start-up plus the grace period.
    assert "step 400/400" not in done.stdout
    print(f"job stopped {elapsed:.1f}s after launch (includes TensorFlow start-up of both ranks)")
