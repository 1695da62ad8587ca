"""Compute levers change speed, not results: `train.jit_compile` trains to the same losses as without it,
through the real compiled step (trainer/loop.py `make_train_step`), and really hands the forward and
backward pass to XLA."""
from __future__ import annotations

from pathlib import Path

import pytest
import tensorflow as tf

from tests.conftest import CONFIGS
from trainer.config import load_config
from trainer.experiment import configure_runtime, prepare
from trainer.loop import _batches, make_train_step
from trainer.strategy.single import SingleDevice

pytestmark = pytest.mark.slow
STEPS = 6


def _xla_calls(graph: tf.Graph) -> int:
    """Function calls in `graph` that XLA must compile (what tf.function(jit_compile=True) leaves there)."""
    return sum(1 for op in graph.get_operations()
               if op.type in ("PartitionedCall", "StatefulPartitionedCall") and op.node_def.attr["_XlaMustCompile"].b)


def _losses(run_dir: Path, *overrides: str) -> tuple[list[float], int]:
    # No dropout: the random masks are the one thing XLA may draw differently; the products and sums are what
    # the lever must not change.
    cfg = load_config(CONFIGS / "transformer_small.yaml", [
        f"run_dir={run_dir}", "model.dropout=0", "data.builtin.train_examples=256", "data.builtin.val_examples=32",
        "data.builtin.test_examples=32", "data.batch_size=16", "optimizer.warmup_steps=0", *overrides])
    configure_runtime(cfg)
    strategy = SingleDevice()
    exp = prepare(cfg, strategy, training=True)
    step, batches = make_train_step(exp, strategy), _batches(exp, strategy, 0)
    losses = [float(step(batches)["loss"]) for _ in range(STEPS)]
    return losses, _xla_calls(step.get_concrete_function(batches).graph)


def test_jit_compile_trains_to_the_same_losses(tmp_path: Path):
    plain, plain_calls = _losses(tmp_path / "plain")
    xla, xla_calls = _losses(tmp_path / "xla", "train.jit_compile=true")
    assert (plain_calls, xla_calls) == (0, 1)
    # float32 throughout; XLA fuses and reorders sums, so the losses agree to rounding, which after 6 Adam
    # steps stays far below 1e-4 relative (a wrong gradient or a skipped update moves them by >1e-2).
    assert xla == pytest.approx(plain, rel=1e-4), (xla, plain)
    assert plain[-1] < plain[0]  # it trains
