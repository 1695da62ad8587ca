"""The in-process hang watchdog (a run started without `strata launch`: plain `strata train`, horovodrun,
mpirun, srun): past train.watchdog_timeout_s in one phase, the rank prints the heartbeat table and exits 124."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, STRATA, TINY_CLASSIFIER, run_cmd

pytestmark = pytest.mark.slow


def test_a_hung_single_process_run_is_reported_and_aborted(tmp_path: Path):
    run_dir, timeout_s = tmp_path / "run", 4
    start = time.monotonic()
    done = run_cmd([STRATA, "train", str(CONFIGS / "classifier.yaml"), *TINY_CLASSIFIER, "--set", f"run_dir={run_dir}",
                    "--set", "train.steps=400", "--set", "eval.every=1000", "--set", "train.log_every=1",
                    "--set", f"train.watchdog_timeout_s={timeout_s}"], timeout=300, STRATA_FAULT="0:5:hang")
    elapsed = time.monotonic() - start
    assert done.returncode == 124, done.stderr[-3000:]
    assert re.search(rf"rank 0 made no progress for \d+ s \(limit {timeout_s} s, train.watchdog_timeout_s\)",
                     done.stderr), done.stderr[-3000:]
    assert "between steps" in done.stderr and "aborting (exit 124)" in done.stderr
    beat = json.loads((run_dir / "heartbeat" / "rank-0.json").read_text())  # the file a person can look at
    assert beat["step"] == 5 and beat["phase"] == "between steps"
    print(f"\nsingle process hung after step 5: aborted with exit 124, {elapsed:.1f} s after start "
          f"(timeout {timeout_s} s)")
