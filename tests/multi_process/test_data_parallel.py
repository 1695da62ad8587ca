"""Data-parallel equivalence, the backbone of issue 3: with the same seed and data order, 2 replicas x
per-replica batch b follow the loss curve of 1 replica x batch 2b, step by step, on every backend; the
backends agree with each other; every rank ends with identical weights.

The runs use plain SGD with momentum (and the config's cosine schedule): an update proportional to the
gradient, so a gradient off by a constant factor (an all-reduce that averages where it must sum) moves every
curve. Adam divides that factor out except through its epsilon (issue 10: such a bug left the Adam curves
only 5e-4 apart)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CONFIGS, TINY_CLASSIFIER, run_cmd, strata
from tests.readback import loss_curve, trainable_weights

pytestmark = pytest.mark.multi_process
STEPS = 12
COMMON = [*TINY_CLASSIFIER, "--set", f"train.steps={STEPS}", "--set", "train.log_every=1", "--set", "eval.every=6",
          "--set", "optimizer.warmup_steps=0", "--set", "model.dropout=0.0",
          "--set", "optimizer.name=sgd", "--set", "optimizer.lr=0.5", "--set", "optimizer.momentum=0.9"]
CONFIG = str(CONFIGS / "classifier.yaml")


def _curve(run_dir: Path) -> np.ndarray:
    return loss_curve(run_dir, STEPS)


_weights = trainable_weights


def _rank_digests(output: str) -> dict[int, str]:
    return {int(r): d for r, d in re.findall(r"rank (\d) weights sha256 ([0-9a-f]+)", output)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """1 replica x the global batch."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    done = strata("train", CONFIG, *COMMON, "--set", f"run_dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def _assert_equivalent(run_dir: Path, reference: Path) -> None:
    np.testing.assert_allclose(_curve(run_dir), _curve(reference), rtol=2e-5, atol=1e-6)
    a, b = _weights(run_dir), _weights(reference)
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_mirrored_two_logical_cpus(reference: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    done = strata("train", CONFIG, *COMMON, "--set", f"run_dir={run_dir}", "--set", "distribution.backend=mirrored",
                  "--set", "distribution.devices=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mirrored: 2 replica(s)" in done.stdout and "global batch 64 = 2 x 32 per replica" in done.stdout
    _assert_equivalent(run_dir, reference)


@pytest.mark.parametrize("backend_args", [["--backend", "multi_worker"], ["--backend", "horovod"],
                                          ["--backend", "horovod", "--mpi"]],
                         ids=["multi_worker", "horovod-gloo", "horovod-mpi"])
def test_two_processes_via_strata_launch(reference: Path, tmp_path: Path, backend_args: list[str]):
    run_dir = tmp_path / "run"
    timeline = tmp_path / "timeline.json"
    extra = ["--set", f"distribution.horovod.timeline={timeline}"] if "horovod" in backend_args else []
    done = strata("launch", "-np", "2", *backend_args, CONFIG, *COMMON, "--set", f"run_dir={run_dir}", *extra,
                  timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    if extra:  # Horovod options from the config reach Horovod: its timeline records the collectives
        trace = timeline.read_text()
        assert "ALLREDUCE" in trace and "HorovodBroadcast" in trace
    digests = _rank_digests(done.stdout)
    assert set(digests) == {0, 1} and digests[0] == digests[1], digests
    assert "weights identical on all 2 ranks" in done.stdout
    _assert_equivalent(run_dir, reference)
    _assert_one_prefix_whole_lines(done.stdout + done.stderr)


def _assert_one_prefix_whole_lines(output: str) -> None:
    """Every launcher prints a rank's lines as `[rank R] ...`, whole (mpirun relays the pieces of a line
    separately: ranks run with PYTHONUNBUFFERED=1 here, so print() writes text and newline apart), with no
    TensorFlow log line or per-step warning in between."""
    lines = output.splitlines()
    assert all(re.match(r"\[rank [01]\] |strata: ", line) for line in lines), output[-3000:]
    steps = [re.fullmatch(r"\[rank 0\] step (\d+)/12 loss \S+ lr \S+ \d+ ex/s mfu \d+\.\d\d%( eta \d+s)?", line) for line in lines]
    assert [int(m.group(1)) for m in steps if m] == list(range(1, STEPS + 1)), output[-3000:]
    assert {line for line in lines if "weights sha256" in line} == {
        f"[rank {r}] strata: rank {r} weights sha256 {d}" for r, d in _rank_digests(output).items()}
    for noise in ("<stdout>:", "<stderr>:", "WARNING:tensorflow", "eagerly has significant overhead", "] oneDNN"):
        assert noise not in output, output[-3000:]


def test_trainer_runs_unchanged_under_plain_mpirun(reference: Path, tmp_path: Path):
    """How Horovod users already work: `mpirun -np 2 python -m trainer train CONFIG`."""
    run_dir = tmp_path / "run"
    argv = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "PYTHONPATH", sys.executable, "-m",
            "trainer", "train", CONFIG, *COMMON, "--set", f"run_dir={run_dir}", "--set", "distribution.backend=horovod"]
    done = run_cmd(argv, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    digests = _rank_digests(done.stdout)
    assert set(digests) == {0, 1} and digests[0] == digests[1], digests  # one digest alone proves nothing
    _assert_equivalent(run_dir, reference)
