"""NaN/Inf guard (issue 6): an Inf injected into ONE rank's gradient, inside the compiled step and before the
all-reduce, makes EVERY rank skip that step (no update), both say so, TensorBoard counts it, the run still
reaches train.steps with identical weights on both ranks; K consecutive bad steps stop the run with one line."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from tests.conftest import CONFIGS, STRATA, TINY_CLASSIFIER, run_cmd

CONFIG = str(CONFIGS / "classifier.yaml")
STEPS = 10
BAD_STEP = 5
COMMON = [*TINY_CLASSIFIER, "--set", f"train.steps={STEPS}", "--set", "train.log_every=1", "--set", "eval.every=100",
          "--set", "optimizer.warmup_steps=0", "--set", "model.dropout=0.0"]
BAD_VARIABLE = "classifier/output/dense/bias (level output)"  # the last trainable variable: where `inf` goes


def _scalars(run_dir: Path, tag: str) -> dict[int, float]:
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}


def _weights(run_dir: Path) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints"))
    return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map() if "_trainable_variables/" in n}


@pytest.mark.multi_process
def test_inf_on_one_rank_skips_the_step_on_every_rank(tmp_path: Path):
    run_dir = tmp_path / "run"
    done = run_cmd([STRATA, "launch", "-np", "2", CONFIG, *COMMON, "--set", f"run_dir={run_dir}"], timeout=400,
                   STRATA_FAULT=f"1:{BAD_STEP}:inf")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert f"injected fault: rank 1 inf in a gradient at step {BAD_STEP}" in out
    for rank in (0, 1):  # each rank decided to skip, from the agreed flags, and says so
        assert re.search(rf"\[{rank}\]<stderr>:strata: rank {rank}: step {BAD_STEP} skipped on all ranks: "
                         rf"non-finite gradient of {re.escape(BAD_VARIABLE)}", out), out[-4000:]
    assert out.count("skipped on all ranks") == 2  # that step only
    digests = dict(re.findall(r"rank (\d) weights sha256 ([0-9a-f]+)", out))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], digests
    assert "weights identical on all 2 ranks" in out and f"step {STEPS}/{STEPS}" in out
    skipped = _scalars(run_dir, "train/skipped_steps")
    assert skipped[BAD_STEP] == 1.0 and skipped[BAD_STEP - 1] == 0.0 and skipped[STEPS] == 1.0
    # The weights are those of a run that never had step 5's update: compare with a 1-process run whose
    # step 5 is skipped the same way (the equivalence of 2 x 32 and 1 x 64 is tests/multi_process/test_data_parallel.py).
    reference = tmp_path / "reference"
    single = run_cmd([STRATA, "train", CONFIG, *COMMON, "--set", f"run_dir={reference}"], timeout=300,
                     STRATA_FAULT=f"0:{BAD_STEP}:inf")
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = _weights(run_dir), _weights(reference)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)
    clean = run_cmd([STRATA, "train", CONFIG, *COMMON, "--set", f"run_dir={tmp_path / 'clean'}"], timeout=300)
    assert clean.returncode == 0, clean.stderr[-3000:]
    differs = [n for n, v in _weights(tmp_path / "clean").items() if not np.allclose(v, a[n], rtol=1e-4, atol=1e-5)]
    assert differs, "skipping step 5 must leave different weights than applying it"


@pytest.mark.slow
def test_consecutive_bad_steps_stop_the_run_with_one_line(tmp_path: Path):
    run_dir = tmp_path / "run"
    done = run_cmd([STRATA, "train", CONFIG, *COMMON, "--set", f"run_dir={run_dir}", "--set", "train.max_bad_steps=3",
                    "--set", "logging.progress_bar=false"], timeout=300, STRATA_FAULT="0:4-100:inf")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("strata: error:")]
    assert len(errors) == 1, done.stderr
    assert ("training diverged: 3 consecutive steps up to step 6 skipped for a non-finite value "
            f"(first non-finite: gradient of {BAD_VARIABLE}); stopped at train.max_bad_steps=3") in errors[0]
    assert "step 7/" not in done.stdout
