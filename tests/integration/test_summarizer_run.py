"""The hierarchical summarizer and the transformer through the real commands: held-out ROUGE-L beats the
lead-words baseline, attention images reach TensorBoard, summaries come from the CLI and from an
exported SavedModel loaded in a fresh process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing import event_accumulator

from tests.conftest import CONFIGS, serve_in_fresh_process, strata
from trainer.config import load_config
from trainer.data.splits import load_splits
from trainer.tasks.summarization import rouge

pytestmark = pytest.mark.slow
SMALL = ["--set", "data.builtin.train_examples=2000", "--set", "data.builtin.val_examples=100",
         "--set", "data.builtin.test_examples=100", "--set", "eval.rouge_examples=100",
         "--set", "logging.progress_bar=false"]
# Long and gentle enough that the run is past the plateau where the model learns to copy names: before
# it, when a run escapes the plateau depends on float rounding, so two equivalent runs can differ a lot
# (seen at 500 steps, lr 5e-3: ROUGE-L 0.97 vs 0.48); after it they agree (1000 steps, lr 3e-3: 0.62 vs 0.65).
QUALITY_RUN = ["--set", "train.steps=1000", "--set", "eval.every=500", "--set", "optimizer.lr=0.003"]


@pytest.fixture(scope="module")
def summarizer(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("summarizer") / "run"
    done = strata("train", str(CONFIGS / "summarizer.yaml"), *SMALL, "--set", f"run_dir={run_dir}",
                  *QUALITY_RUN, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def lead_baseline(documents: list[str], summary_words: int) -> list[str]:
    """The classic 'lead' baseline: the document's first words, as many as a summary has."""
    return [" ".join(d.split()[:summary_words]) for d in documents]

def test_heldout_rouge_beats_lead_baseline(summarizer: Path):
    done = strata("evaluate", str(summarizer), "--split", "test")
    assert done.returncode == 0, done.stderr[-2000:]
    model_scores = json.loads(done.stdout.strip().splitlines()[-1])

    cfg = load_config(summarizer / "config.yaml")
    test = load_splits(cfg.data, cfg.task).test[: cfg.eval.rouge_examples]
    words = max(len(ex["summary"].split()) for ex in test)
    baseline = rouge([ex["summary"] for ex in test], lead_baseline([ex["document"] for ex in test], words))
    print(f"held-out ROUGE-L: model {model_scores['rougeL']:.3f} vs lead-{words} baseline {baseline['rougeL']:.3f}")
    assert model_scores["rougeL"] > baseline["rougeL"] + 0.2
    assert model_scores["rouge1"] > baseline["rouge1"]


def test_attention_image_and_rouge_in_tensorboard(summarizer: Path):
    acc = event_accumulator.EventAccumulator(str(summarizer / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    for tag in ("val/rouge1", "val/rouge2", "val/rougeL", "val/token_accuracy", "val/attention"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    image = acc.Tensors("val/attention")[-1]
    assert image.step == 1000
    # An image summary is [width, height, encoded PNG...] as strings.
    width, height = (int(x) for x in image.tensor_proto.string_val[:2])
    assert width > 0 and height > 0 and image.tensor_proto.string_val[2].startswith(b"\x89PNG")


def test_summarize_and_served_export_agree(summarizer: Path, tmp_path: Path):
    cfg = load_config(summarizer / "config.yaml")
    documents = [ex["document"] for ex in load_splits(cfg.data, cfg.task).test[:3]]
    done = strata("summarize", str(summarizer), *documents)
    assert done.returncode == 0, done.stderr[-2000:]
    answers = [json.loads(line) for line in done.stdout.strip().splitlines()]  # JSON lines, like classify
    assert [a["text"] for a in answers] == documents
    summaries = [a["summary"] for a in answers]
    assert len(summaries) == 3 and all(s.strip() for s in summaries)

    out = tmp_path / "served"
    assert strata("export", str(summarizer), "--out", str(out)).returncode == 0
    assert serve_in_fresh_process(out, documents, "summary") == summaries


def test_transformer_trains_resumes_and_evaluates(tmp_path: Path):
    run_dir = tmp_path / "run"
    args = ["train", str(CONFIGS / "transformer_small.yaml"), *SMALL, "--set", f"run_dir={run_dir}",
            "--set", "train.steps=30", "--set", "eval.every=30", "--set", "eval.rouge_examples=8",
            "--set", "train.mixed_precision=bfloat16", "--set", "optimizer.warmup_steps=5"]
    first = strata(*args, "--stop-after", "10")
    assert first.returncode == 0, first.stderr[-3000:]
    second = strata(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 30 and metrics["loss"] < 6.0 and "rougeL" in metrics


def assert_same_quality(reference: Path, run_dir: Path, label: str) -> None:
    """Held-out test metrics of two runs: within 0.1 ROUGE-L and 25% loss, both far above the lead baseline."""
    scores = []
    for directory in (reference, run_dir):
        ev = strata("evaluate", str(directory), "--split", "test")
        assert ev.returncode == 0, ev.stderr[-2000:]
        scores.append(json.loads(ev.stdout.strip().splitlines()[-1]))
    one, other = scores
    print(f"held-out: 1 worker ROUGE-L {one['rougeL']:.3f} loss {one['loss']:.3f}, "
          f"{label} ROUGE-L {other['rougeL']:.3f} loss {other['loss']:.3f}")
    assert abs(one["rougeL"] - other["rougeL"]) < 0.1
    assert abs(one["loss"] - other["loss"]) < 0.25 * max(one["loss"], other["loss"])
    assert min(one["rougeL"], other["rougeL"]) > 0.45


@pytest.mark.multi_process
def test_two_horovod_workers_by_two_stages_reach_the_same_quality(summarizer: Path, tmp_path: Path):
    """Hybrid parallelism: 2 Horovod replicas x 2 pipeline stages (4 logical devices, levels split by the
    measured `auto` partition, 1F1B over 4 micro-batches) vs 1 worker x 1 stage, same global batch and
    QUALITY_RUN: the same held-out quality.

    This run also stands for "2 Horovod workers reach the quality of 1" (a separate data-parallel-only run
    cost CI ~7 minutes; step-for-step equality of N workers and 1 is in tests/multi_process/). The math is
    the same as 1 x 1, but float sums in another order make a long GRU run drift apart, so the comparison
    is of quality after QUALITY_RUN: within 0.1 ROUGE-L and 25% loss, both far above the lead baseline
    (observed for 2 workers x 1 stage on the 2-core VM: ROUGE-L 0.608-0.620 vs 0.653, loss 1.133-1.146 vs
    1.077-1.079)."""
    run_dir = tmp_path / "run"
    pipeline = "distribution.pipeline={stages: 2, micro_batches: 4, schedule: 1f1b, partition: auto}"
    done = strata("launch", "-np", "2", str(CONFIGS / "summarizer.yaml"), *SMALL, "--set", f"run_dir={run_dir}",
                  *QUALITY_RUN, "--set", pipeline, timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "pipeline: 2 stages x 2 replicas, 4 devices" in done.stdout
    assert "weights identical on all 2 ranks" in done.stdout
    assert_same_quality(summarizer, run_dir, "2 workers x 2 stages")
