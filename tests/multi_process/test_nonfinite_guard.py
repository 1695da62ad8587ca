"""NaN/Inf guard (issue 6): an Inf injected into ONE rank's gradient, inside the compiled step and before the
all-reduce, makes EVERY rank skip that step (no update), both say so, TensorBoard counts it, the run still
reaches train.steps with identical weights on both ranks; so does a NaN in one rank's loss on a logging step
(issue 10: it used to end the run with a FloatingPointError); with float16 loss scaling the skip halves the
scale and the optimizer's own step counter does not advance; K consecutive bad steps stop the run with one line."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from tests.conftest import CONFIGS, STRATA, TINY_CLASSIFIER, run_cmd
from tests.readback import trainable_weights

CONFIG = str(CONFIGS / "classifier.yaml")
STEPS = 10
BAD_STEP = 5
NAN_LOSS_STEP = 7  # a logging step (log_every=1): its loss, summed over ranks, is NaN on every rank
COMMON = [*TINY_CLASSIFIER, "--set", f"train.steps={STEPS}", "--set", "train.log_every=1", "--set", "eval.every=100",
          "--set", "optimizer.warmup_steps=0", "--set", "model.dropout=0.0"]
BAD_VARIABLE = "classifier/output/dense/bias (level output)"  # the last trainable variable: where `inf` goes


def _scalars(run_dir: Path, tag: str) -> dict[int, float]:
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}


_weights = trainable_weights  # the run's trainable weights, from its newest checkpoint


def _collectives(timeline: Path) -> Counter:
    """Tensor name -> how many times Horovod all-reduced or all-gathered it (its timeline, written by rank 0)."""
    text = timeline.read_text().rstrip().rstrip(",")
    events = json.loads(text if text.endswith("]") else text + "]")
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name" and "name" in e["args"]}
    return Counter(names[e["pid"]] for e in events if e.get("ph") == "B" and e.get("name") in ("ALLREDUCE", "ALLGATHER"))


@pytest.mark.multi_process
# zero 2 (issue 13): the sharded update skips under the same agreed flag (reduce-scatter and all-gather run or
# are skipped on every rank together), so the weights again equal the replicated 1-process run's.
@pytest.mark.parametrize("zero", [0, 2])
def test_inf_on_one_rank_skips_the_step_on_every_rank(tmp_path: Path, zero: int):
    run_dir = tmp_path / "run"
    timeline = tmp_path / "timeline.json"
    done = run_cmd([STRATA, "launch", "-np", "2", CONFIG, *COMMON, "--set", f"run_dir={run_dir}",
                    "--set", f"distribution.horovod.timeline={timeline}", "--set", f"distribution.zero={zero}"],
                   timeout=400,
                   STRATA_FAULT=f"1:{BAD_STEP}:inf,1:{NAN_LOSS_STEP}:nan_loss")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "Traceback" not in out and "FloatingPointError" not in out, out[-4000:]
    assert f"injected fault: rank 1 inf in a gradient at step {BAD_STEP}" in out
    assert f"injected fault: rank 1 nan in the loss at step {NAN_LOSS_STEP}" in out
    for rank in (0, 1):  # each rank decided to skip, from the agreed flags, and says so
        assert re.search(rf"^\[rank {rank}\] strata: rank {rank}: step {BAD_STEP} skipped on all ranks: "
                         rf"non-finite gradient of {re.escape(BAD_VARIABLE)}", out, re.M), out[-4000:]
        assert re.search(rf"^\[rank {rank}\] strata: rank {rank}: step {NAN_LOSS_STEP} skipped on all ranks: "
                         r"non-finite loss \(1 in a row, 2 in total\)", out, re.M), out[-4000:]
    assert out.count("skipped on all ranks") == 4  # those two steps only, on both ranks
    assert re.search(rf"^\[rank 0\] step {NAN_LOSS_STEP}/{STEPS} loss nan ", out, re.M), out[-4000:]
    digests = dict(re.findall(r"rank (\d) weights sha256 ([0-9a-f]+)", out))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], digests
    assert "weights identical on all 2 ranks" in out and f"step {STEPS}/{STEPS}" in out
    # The flags, votes, loss and tokens agreed in ONE all-reduce per step beside the gradients; the step's
    # outputs are those sums, never all-reduced again (each such tensor cost a collective of its own).
    reduced = _collectives(timeline)
    assert reduced["replica_sum"] == STEPS, reduced
    assert not [name for name in reduced if name.startswith("metric_")], reduced
    skipped = _scalars(run_dir, "train/skipped_steps")
    assert skipped[BAD_STEP] == 1.0 and skipped[BAD_STEP - 1] == 0.0 and skipped[NAN_LOSS_STEP] == 2.0
    assert skipped[STEPS] == 2.0
    # The skipped step's NaN stays out of the loss curve; every other step is in it, finite.
    losses = _scalars(run_dir, "train/loss")
    assert sorted(losses) == [s for s in range(1, STEPS + 1) if s != NAN_LOSS_STEP], losses
    assert all(np.isfinite(v) for v in losses.values())
    # The weights are those of a run that never had steps 5's and 7's updates: compare with a 1-process run
    # whose steps are skipped the same way (2 x 32 vs 1 x 64: tests/multi_process/test_data_parallel.py).
    reference = tmp_path / "reference"
    single = run_cmd([STRATA, "train", CONFIG, *COMMON, "--set", f"run_dir={reference}"], timeout=300,
                     STRATA_FAULT=f"0:{BAD_STEP}:inf,0:{NAN_LOSS_STEP}:nan_loss")
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = _weights(run_dir), _weights(reference)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)
    clean = run_cmd([STRATA, "train", CONFIG, *COMMON, "--set", f"run_dir={tmp_path / 'clean'}"], timeout=300)
    assert clean.returncode == 0, clean.stderr[-3000:]
    differs = [n for n, v in _weights(tmp_path / "clean").items() if not np.allclose(v, a[n], rtol=1e-4, atol=1e-5)]
    assert differs, "skipping steps 5 and 7 must leave different weights than applying them"


@pytest.mark.slow
def test_float16_skip_halves_the_loss_scale_and_keeps_the_optimizer_step(tmp_path: Path):
    """float16 loss scaling: Keras's LossScaleOptimizer skips and halves its scale on non-finite GRADIENTS
    only. A NaN loss leaves the gradients finite, so it skips only because the guard poisons them
    (trainer/nonfinite.py): the loss-scaling branch of the step, end to end."""
    run_dir = tmp_path / "run"
    steps = 8
    done = run_cmd([STRATA, "train", CONFIG, *COMMON, "--set", f"train.steps={steps}", "--set", f"run_dir={run_dir}",
                    "--set", "train.mixed_precision=float16"], timeout=300, STRATA_FAULT=f"0:{BAD_STEP}:nan_loss")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"step {BAD_STEP} skipped on all ranks: non-finite loss" in done.stderr
    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints"))
    scale = float(reader.get_tensor("optimizer/dynamic_scale/.ATTRIBUTES/VARIABLE_VALUE"))
    inner_steps = int(reader.get_tensor("optimizer/inner_optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"))
    loop_step = int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))
    print(f"float16: loss scale 32768 -> {scale:g}, optimizer step {inner_steps} of {loop_step}")
    assert (scale, inner_steps, loop_step) == (16384.0, steps - 1, steps)


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
