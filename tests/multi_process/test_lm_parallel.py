"""The `lm` levels under data and pipeline parallelism follow the one-device loss curve (issue 12): 2 Horovod
ranks x batch b = 1 rank x batch 2b (the ranks read disjoint rows of each global batch of the token stream),
and 2 pipeline stages x 2 micro-batches = the whole model on one device. Plain SGD (an update proportional
to the gradient: a gradient off by any factor moves the curve). Untied embeddings: a pipeline cannot share
the tied matrix between its first and last stage (refused by the config, tests/unit/test_lm_config.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CONFIGS, strata
from tests.readback import loss_curve, trainable_weights
from tests.textdata import documents, prepare_small

pytestmark = pytest.mark.multi_process
STEPS = 8
LM = [str(CONFIGS / "lm_small.yaml"), "--set", "model.d_model=32", "--set", "model.num_heads=2",
      "--set", "model.ff_dim=64", "--set", "model.layers=2", "--set", "model.tie_embeddings=false",
      "--set", "data.seq_len=32", "--set", "data.batch_size=8", "--set", f"train.steps={STEPS}",
      "--set", "train.log_every=1", "--set", f"eval.every={STEPS}", "--set", "eval.max_batches=2",
      "--set", "optimizer.name=sgd", "--set", "optimizer.lr=0.5", "--set", "optimizer.momentum=0.9",
      "--set", "optimizer.weight_decay=0", "--set", "optimizer.warmup_steps=0", "--set", "optimizer.clip_norm=null",
      "--set", "logging.progress_bar=false"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_small(tmp_path_factory.mktemp("lmpar") / "prepared", documents()[:300])


def _run(run_dir: Path, prepared: Path, *command: str, extra: tuple[str, ...] = ()) -> None:
    done = strata(*command, *LM, "--set", f"data.prepared_path={prepared}", "--set", f"run_dir={run_dir}", *extra,
                  timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def _curve(run_dir: Path) -> np.ndarray:
    return loss_curve(run_dir, STEPS)


_weights = trainable_weights


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prepared: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("one") / "run"
    _run(run_dir, prepared, "train")
    return run_dir


def _assert_equivalent(run_dir: Path, reference: Path, rtol: float = 2e-5) -> None:
    curve, ref = _curve(run_dir), _curve(reference)
    assert ref[-1] < ref[0] - 0.3, ref  # the curve moves: equal curves mean something
    np.testing.assert_allclose(curve, ref, rtol=rtol, atol=1e-6)
    a, b = _weights(run_dir), _weights(reference)
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_two_horovod_ranks_follow_one_rank(reference: Path, prepared: Path, tmp_path: Path):
    _run(tmp_path / "run", prepared, "launch", "-np", "2", "--backend", "horovod")
    _assert_equivalent(tmp_path / "run", reference)


def test_two_pipeline_stages_follow_one_device(reference: Path, prepared: Path, tmp_path: Path):
    pipe = "distribution.pipeline={stages: 2, micro_batches: 2, partition: [[embed, block_1], [block_2, head]]}"
    _run(tmp_path / "run", prepared, "train", extra=("--set", pipe))
    _assert_equivalent(tmp_path / "run", reference, rtol=1e-4)  # micro-batch sums add in another order
