"""The end-to-end classifier, through the real commands: train, TensorBoard events, evaluate, classify,
export and serve from a fresh process. One training run is shared by the tests of this module.

The built-in corpus flips 10% of its labels at random (trainer/data/corpora.py), so the best accuracy any
model can reach is known exactly (`best_accuracy`: 0.900 on 500 examples); the quality test asks for
the classifier to come within 2 points of it (chance: 0.5)."""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from tests.conftest import CONFIGS, STRATA, run_cmd, serve_in_fresh_process, strata
from trainer.config import load_run_config
from trainer.data.corpora import LABEL_NOISE, best_accuracy
from trainer.flops import run_training_flops

pytestmark = pytest.mark.slow
# Enough data and steps to learn the rule under label noise (1200 examples reach ~0.85 of 0.90; 4000 in
# 300 steps reach 0.896-0.898 over seeds 0-2 here), still a few seconds of training.
STEPS, LOG_EVERY, EVAL_EVERY = 300, 10, 100
EXAMPLES = 500  # validation and test
SIZES = ["--set", "data.builtin.train_examples=4000", "--set", f"data.builtin.val_examples={EXAMPLES}",
         "--set", f"data.builtin.test_examples={EXAMPLES}", "--set", "logging.progress_bar=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("classifier") / "run"
    # Its own peak cache: the run measures its CPU's fp32 matmul peak and files it there (trainer/peak.py).
    done = run_cmd([STRATA, "train", str(CONFIGS / "classifier.yaml"), *SIZES, "--set", f"run_dir={run_dir}",
                    "--set", f"train.steps={STEPS}", "--set", f"train.log_every={LOG_EVERY}",
                    "--set", f"eval.every={EVAL_EVERY}", "--set", "logging.profile_steps=[23,24]"],
                   STRATA_CACHE_DIR=str(run_dir.parent / "cache"))
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir / "stdout.txt").write_text(done.stdout)
    assert "validation loss=" in done.stdout and "accuracy=" in done.stdout
    assert ("strata: data: train 4000 (built-in, data.builtin.seed 1234), val 500 (built-in, own seed), test 500 "
            "(built-in, own seed), 2 classes; built-in reviews with 10% of labels flipped (data.builtin.label_noise): "
            "best achievable validation accuracy 0.900\n") in done.stdout
    # The first throughput shown leaves out the first step (graph building: it read ~1/20 of the rest before).
    shown = [float(x) for x in re.findall(r"^step \d+/\d+ loss \S+ lr \S+ (\d+) ex/s mfu \d+\.\d\d% eta \d+s$",
                                          done.stdout, re.M)]
    assert len(shown) == STEPS // LOG_EVERY and shown[0] >= 0.1 * statistics.median(shown[1:]), shown
    return run_dir


def test_validation_accuracy_is_within_2_points_of_the_best_achievable(trained: Path):
    metrics = json.loads((trained / "metrics.json").read_text())
    best = best_accuracy(EXAMPLES, LABEL_NOISE)
    assert metrics["step"] == STEPS and best == pytest.approx(0.9)
    assert abs(metrics["accuracy"] - best) <= 0.02, metrics  # above the bound by more would mean a leak
    for key in ("precision", "recall", "f1"):
        assert best - 0.05 <= metrics[key] <= 1.0, metrics


def test_run_directory_holds_resolved_config_vocab_and_checkpoint(trained: Path):
    config = (trained / "config.yaml").read_text()
    assert f"steps: {STEPS}" in config and "kind: classifier" in config
    assert json.loads((trained / "vocab.json").read_text())[:4] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert (trained / "checkpoints" / f"ckpt-{STEPS}.index").is_file()


def test_tensorboard_events_read_back_with_tensorboard(trained: Path):
    acc = event_accumulator.EventAccumulator(str(trained / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/learning_rate", "perf/examples_per_sec", "perf/tokens_per_sec",
                "perf/step_time_ms", "val/loss", "val/accuracy", "val/precision", "val/recall", "val/f1"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    steps = [e.step for e in acc.Tensors("train/loss")]
    assert steps == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert [e.step for e in acc.Tensors("val/accuracy")] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    assert "hparams" in acc.PluginTagToContent("hparams") or acc.PluginTagToContent("hparams")
    profile = list((trained / "tensorboard" / "plugins" / "profile").rglob("*.xplane.pb"))
    assert profile, "profiler trace for logging.profile_steps was not written"


def test_mfu_in_tensorboard_console_and_final_line_from_the_measured_peak(trained: Path):
    """perf/mfu at every log step is the formula's FLOPs x examples/s over the peak the run measured and
    cached, the console shows it, and the final line gives the run's MFU."""
    acc = event_accumulator.EventAccumulator(str(trained / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    value = lambda event: float(tf.make_ndarray(event.tensor_proto))  # noqa: E731
    mfus = {e.step: value(e) for e in acc.Tensors("perf/mfu")}
    rates = {e.step: value(e) for e in acc.Tensors("perf/examples_per_sec")}
    assert sorted(mfus) == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    (entry,) = json.loads((trained.parent / "cache" / "peak.json").read_text()).values()
    assert entry["dtype"] == "float32" and entry["processes"] == 1 and entry["flops"] > 1e8
    flops = run_training_flops(load_run_config(trained), vocab_size=len(json.loads((trained / "vocab.json").read_text())))
    for step, m in mfus.items():
        assert m == pytest.approx(flops * rates[step] / entry["flops"], rel=1e-5), step
    stdout = (trained / "stdout.txt").read_text()
    assert f"strata: MFU against {entry['flops'] / 1e12:.3g} TFLOP/s peak (float32 matmul probe, measured); " in stdout
    shown = [float(x) / 100 for x in re.findall(r"^step \d+/\d+ .* mfu (\d+\.\d\d)% eta", stdout, re.M)]
    assert shown == pytest.approx([mfus[s] for s in sorted(mfus)], abs=6e-5)
    final = re.search(rf"^strata: step {STEPS}/{STEPS} \| validation .* \| MFU (\d+\.\d\d)%$", stdout, re.M)
    assert final and min(mfus.values()) - 6e-5 <= float(final.group(1)) / 100 <= max(mfus.values()) + 6e-5, stdout


def test_evaluate_classify_and_export(trained: Path, tmp_path: Path):
    done = strata("evaluate", str(trained), "--split", "test")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["split"] == "test" and result["step"] == STEPS
    assert abs(result["accuracy"] - best_accuracy(EXAMPLES, LABEL_NOISE)) <= 0.03, result

    # Reviews like the corpus's (a text of 3 sentiment words and nothing else pools to an extreme, unseen input).
    texts = ["the room was lovely and the staff friendly . we arrived on monday . the hotel is near the beach",
             "the breakfast was stale and the waiter rude . we stayed for three nights . my sister ordered the soup"]
    done = strata("classify", str(trained), *texts)
    assert done.returncode == 0, done.stderr[-2000:]
    answers = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert [a["label"] for a in answers] == [1, 0] and [a["text"] for a in answers] == texts
    labels = [a["label"] for a in answers]
    # With 10% of labels flipped, a calibrated model is never certain (~0.9 here): no more 1.0 / 0.0 answers.
    assert 0.5 < answers[0]["probability"] < 0.99 and 0.01 < answers[1]["probability"] < 0.5, answers

    out = tmp_path / "served"
    done = strata("export", str(trained), "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert serve_in_fresh_process(out, texts, "label") == labels
