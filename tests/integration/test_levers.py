"""Compute levers change speed, not results: `train.jit_compile` trains to the same losses as without it,
through the real compiled step (trainer/loop.py `make_train_step`), and really hands the forward and
backward pass to XLA; `train.steps_per_call` runs several steps per compiled call and still logs,
evaluates, checkpoints and injects/guards non-finite steps at exactly their steps."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import CONFIGS
from trainer.config import load_config
from trainer.experiment import configure_runtime, prepare
from trainer.hooks import Hook, LoopState
from trainer.loop import _batches, make_train_step, train
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


class _Record(Hook):
    """What the loop did, step by step: call ends and their lengths, logged losses, evaluations."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.logs: dict[int, float] = {}
        self.evals: dict[int, float] = {}

    def on_step_end(self, state: LoopState) -> None:
        self.calls.append((state.step, state.steps_in_call))

    def on_log(self, state: LoopState) -> None:
        self.logs[state.step] = state.train_logs["loss"]

    def on_eval(self, state: LoopState) -> None:
        self.evals[state.step] = state.eval_metrics["loss"]


def _train(run_dir: Path, per_call: int) -> tuple[_Record, list]:
    # Periods that divide neither each other nor the call length, so calls must be cut at each of them.
    cfg = load_config(CONFIGS / "classifier.yaml", [
        f"run_dir={run_dir}", "train.steps=20", "train.log_every=3", "checkpoint.every=5", "checkpoint.keep=10",
        "eval.every=7", f"train.steps_per_call={per_call}", "logging.progress_bar=false",
        "data.builtin.train_examples=600", "data.builtin.val_examples=64", "data.builtin.test_examples=64",
        "optimizer.name=sgd", "optimizer.lr=0.5", "optimizer.momentum=0.9", "optimizer.warmup_steps=0"])
    configure_runtime(cfg)
    strategy = SingleDevice()
    exp = prepare(cfg, strategy, training=True)
    record = _Record()
    train(exp, strategy, extra_hooks=[record])
    # train() returned: its watchdog must not outlive it (it once aborted this test process 10 minutes later).
    assert not [t for t in threading.enumerate() if t.name == "strata-heartbeat"]
    return record, [v.numpy() for v in exp.model.trainable_variables]


def test_steps_per_call_trains_the_same_and_hooks_act_at_their_steps(tmp_path: Path, monkeypatch, capfd):
    monkeypatch.setenv("STRATA_FAULT", "0:9-10:inf")  # steps 9 and 10 skipped by the NaN/Inf guard
    one, weights_one = _train(tmp_path / "one", 1)
    guard_one = [line for line in capfd.readouterr().err.splitlines() if "skipped on all ranks" in line]
    four, weights_four = _train(tmp_path / "four", 4)
    guard_four = [line for line in capfd.readouterr().err.splitlines() if "skipped on all ranks" in line]

    assert [n for _, n in one.calls] == [1] * 20
    lengths = [n for _, n in four.calls]
    assert sum(lengths) == 20 and max(lengths) > 1 and len(lengths) < 20, four.calls  # several steps per call
    ends = {step for step, _ in four.calls}
    checkpoints = sorted(int(p.stem.split("-")[1]) for p in (tmp_path / "four" / "checkpoints").glob("ckpt-*.index"))
    # Every step where something acts ends a call: logs, evaluations, checkpoints, the faulted steps.
    assert set(four.logs) | set(four.evals) | set(checkpoints) | {8, 9, 10} <= ends, (ends, four.calls)
    assert sorted(four.logs) == sorted(one.logs) == [3, 6, 9, 12, 15, 18, 20]
    assert sorted(four.evals) == sorted(one.evals) == [7, 14, 20]
    assert checkpoints == [5, 10, 15, 20] == sorted(
        int(p.stem.split("-")[1]) for p in (tmp_path / "one" / "checkpoints").glob("ckpt-*.index"))
    assert len(guard_one) == 2 and "(2 in a row, 2 in total)" in guard_one[1] and guard_four == guard_one
    # The same steps on the same batches: equal up to float32 rounding of a differently compiled graph.
    assert [four.logs[s] for s in sorted(four.logs)] == pytest.approx([one.logs[s] for s in sorted(one.logs)], rel=1e-5)
    assert [four.evals[s] for s in sorted(four.evals)] == pytest.approx([one.evals[s] for s in sorted(one.evals)],
                                                                        rel=1e-5)
    for a, b in zip(weights_four, weights_one):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

