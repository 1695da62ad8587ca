"""A run stopped at step k and resumed in a fresh process ends with exactly the weights of an
uninterrupted run (deterministic ops, data order a pure function of the step, dropout RNG restored)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import CONFIGS, TINY_CLASSIFIER, strata

pytestmark = pytest.mark.slow
STEPS = 40
DROPOUT = "0.3"


def _train(run_dir: Path, *extra: str):
    done = strata("train", str(CONFIGS / "classifier.yaml"), *TINY_CLASSIFIER, "--set", f"run_dir={run_dir}",
                  "--set", f"train.steps={STEPS}", "--set", "model.dropout=" + DROPOUT, "--set", "eval.every=1000",
                  "--set", "checkpoint.every=1000", *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _weights(run_dir: Path) -> dict[str, np.ndarray]:
    """Every saved tensor of the latest checkpoint, read straight from the files."""
    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if "save_counter" not in name}


def test_stop_and_resume_equals_uninterrupted(tmp_path: Path):
    straight, chunked = tmp_path / "straight", tmp_path / "chunked"
    _train(straight)
    first = _train(chunked, "--stop-after", "15")
    assert "step 15/40" in first.stdout
    assert tf.train.load_checkpoint(str(chunked / "checkpoints")).get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == 15
    resumed = _train(chunked)
    assert "step 40/40" in resumed.stdout

    a, b = _weights(straight), _weights(chunked)
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_resume_refuses_a_different_model(tmp_path: Path):
    run_dir = tmp_path / "run"
    _train(run_dir, "--stop-after", "2")
    done = strata("train", str(CONFIGS / "classifier.yaml"), *TINY_CLASSIFIER, "--set", f"run_dir={run_dir}",
                  "--set", "model.hidden_dim=48", "--set", "model.dropout=0.3")
    assert done.returncode == 2
    assert "model.hidden_dim: 32 -> 48" in done.stderr and "Traceback" not in done.stderr
