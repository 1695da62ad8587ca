"""The evaluation step is traced once for a whole split, whose last batch is smaller than the others, and
gives the same counts as a step traced per batch shape (the one it replaced)."""
from __future__ import annotations

from pathlib import Path

import pytest
import tensorflow as tf

from tests.conftest import CONFIGS
from trainer.config import load_config
from trainer.experiment import prepare
from trainer.loop import evaluate, make_eval_step
from trainer.strategy.single import SingleDevice


def test_one_trace_for_a_split_with_a_short_last_batch(tmp_path: Path):
    cfg = load_config(CONFIGS / "classifier.yaml", [f"run_dir={tmp_path / 'run'}", "data.builtin.train_examples=200",
                                                    "data.builtin.val_examples=100", "data.builtin.test_examples=10"])
    exp = prepare(cfg, SingleDevice(), training=True)
    assert len(exp.arrays["val"]["label"]) % cfg.data.batch_size  # 100 = 64 + 36: the last batch is smaller
    step = make_eval_step(exp)
    metrics = evaluate(exp, SingleDevice(), eval_step=step)
    assert step.experimental_get_tracing_count() == 1

    @tf.function
    def per_shape(batch):  # the step as it was: one trace per batch shape
        return exp.task.eval_counts(batch, exp.model(exp.task.model_inputs(batch), training=False))

    assert evaluate(exp, SingleDevice(), eval_step=per_shape) == pytest.approx(metrics, rel=1e-6)
    assert per_shape.experimental_get_tracing_count() == 2
