"""The end-to-end classifier, through the real commands: train, TensorBoard events, evaluate, classify,
export and serve from a fresh process. One training run is shared by the tests of this module."""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
from tensorboard.backend.event_processing import event_accumulator

from tests.conftest import CONFIGS, TINY_CLASSIFIER, serve_in_fresh_process, strata

pytestmark = pytest.mark.slow
STEPS, LOG_EVERY, EVAL_EVERY = 150, 10, 50


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("classifier") / "run"
    done = strata("train", str(CONFIGS / "classifier.yaml"), *TINY_CLASSIFIER, "--set", f"run_dir={run_dir}",
                  "--set", f"train.steps={STEPS}", "--set", f"train.log_every={LOG_EVERY}",
                  "--set", f"eval.every={EVAL_EVERY}", "--set", "logging.profile_steps=[23,24]")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "validation loss=" in done.stdout and "accuracy=" in done.stdout
    # The first throughput shown leaves out the first step (graph building: it read ~1/20 of the rest before).
    shown = [float(x) for x in re.findall(r"^step \d+/\d+ loss \S+ lr \S+ (\d+) ex/s eta \d+s$", done.stdout, re.M)]
    assert len(shown) == STEPS // LOG_EVERY and shown[0] >= 0.1 * statistics.median(shown[1:]), shown
    return run_dir


def test_reaches_90_percent_validation_accuracy(trained: Path):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["step"] == STEPS
    assert metrics["accuracy"] >= 0.90, metrics
    for key in ("precision", "recall", "f1"):
        assert 0.8 <= metrics[key] <= 1.0


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


def test_evaluate_classify_and_export(trained: Path, tmp_path: Path):
    done = strata("evaluate", str(trained), "--split", "test")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["split"] == "test" and result["step"] == STEPS and result["accuracy"] >= 0.85

    texts = ["a wonderful delightful brilliant film", "a dreadful awful boring mess"]
    done = strata("classify", str(trained), *texts)
    assert done.returncode == 0, done.stderr[-2000:]
    labels = [json.loads(line)["label"] for line in done.stdout.strip().splitlines()]
    assert labels == [1, 0]

    out = tmp_path / "served"
    done = strata("export", str(trained), "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert serve_in_fresh_process(out, texts, "label") == labels
