"""Horovod was really built with TensorFlow, Gloo and MPI: a 2-rank allreduce under each launcher."""
import re
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cmd

pytestmark = pytest.mark.multi_process
SCRIPT = str(REPO / "tests" / "scripts" / "allreduce.py")
HOROVODRUN = str(Path(sys.executable).parent / "horovodrun")


def _sums(output: str) -> dict[int, float]:
    return {int(r): float(s) for r, s in re.findall(r"rank=(\d) size=2 sum=([0-9.]+)", output)}


def test_check_build_lists_tensorflow_gloo_and_mpi():
    out = run_cmd([HOROVODRUN, "--check-build"], timeout=60).stdout
    assert re.search(r"\[X\] TensorFlow", out)
    assert re.search(r"\[X\] Gloo", out) and re.search(r"\[X\] MPI", out)


def test_allreduce_under_horovodrun_gloo():
    done = run_cmd([HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, SCRIPT], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _sums(done.stdout) == {0: 3.0, 1: 3.0}


def test_allreduce_under_mpirun():
    done = run_cmd(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, SCRIPT], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _sums(done.stdout) == {0: 3.0, 1: 3.0}
