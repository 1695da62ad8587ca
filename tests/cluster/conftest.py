"""Cluster tests need the local SLURM cluster (slurm/local-cluster.sh; `make test` starts it). In CI a missing
cluster is a failure, not a skip: these tests are the only proof that real sbatch jobs work."""
from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="session", autouse=True)
def slurm_cluster() -> None:
    try:
        done = subprocess.run(["bash", str(REPO / "slurm" / "local-cluster.sh"), "status"], capture_output=True,
                              text=True, timeout=60)
        up, why = done.returncode == 0, (done.stdout + done.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        up, why = False, str(err)
    if up:
        return
    message = f"the local SLURM cluster is not running ({why}); start it with `slurm/local-cluster.sh start` (make test does)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)
