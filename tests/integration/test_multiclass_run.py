"""K-way classification through the real commands: a 3-class JSONL file with class names, generated here,
trains a softmax head; evaluate reports macro and per-class precision/recall/F1; classify and a SavedModel
served from a fresh process answer the class names; the run directory itself is a config that resumes it.
One short training run (which also shows that `--set train.steps=N` alone works for a short run)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, serve_in_fresh_process, strata, trainer

pytestmark = pytest.mark.slow
STEPS = 20  # below the config's warmup_steps (20): the warm-up is capped, with a note, instead of refused
CLASSES = {"cat": ("purr", "whisker", "meow", "kitten"), "dog": ("bark", "leash", "puppy", "fetch"),
           "bird": ("wing", "feather", "nest", "chirp")}
FILLER = ("the", "a", "pet", "saw", "today", "our", "small", "house", "near", "garden", "very", "quite")


def _corpus(n: int, seed: int) -> list[dict]:
    """Texts with two words of their class among filler: learnable in a few steps, never trivial to copy."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name = sorted(CLASSES)[i % 3]
        words = rng.sample(FILLER, 5) + rng.sample(CLASSES[name], 2)
        rng.shuffle(words)
        out.append({"text": " ".join(words), "label": name})
    return out


def _jsonl(path: Path, examples: list[dict]) -> str:
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("multiclass")
    run_dir = d / "run"
    train, test = _jsonl(d / "train.jsonl", _corpus(900, 1)), _jsonl(d / "test.jsonl", _corpus(90, 2))
    done = strata("train", str(CONFIGS / "classifier.yaml"), "--set", "data.source=jsonl",
                  "--set", f"data.train_path={train}", "--set", f"data.test_path={test}", "--set", f"run_dir={run_dir}",
                  "--set", f"train.steps={STEPS}", "--set", "optimizer.lr=0.02", "--set", "logging.progress_bar=false")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done.stdout


def test_start_up_line_says_what_each_split_is_and_notes_the_capped_warmup(trained):
    _, stdout = trained
    assert ("strata: data: train 810 (train.jsonl, 90% after carving val), val 90 (carved 10% from train.jsonl, "
            "data.val_fraction), test 90 (test.jsonl), 3 classes: bird, cat, dog\n") in stdout
    assert (f"strata: note: optimizer.warmup_steps (20) is not below train.steps ({STEPS}): warm-up capped at 2 "
            "step(s)") in stdout


def test_three_classes_train_a_softmax_head_and_report_macro_and_per_class_metrics(trained):
    run_dir, _ = trained
    assert json.loads((run_dir / "labels.json").read_text()) == {"num_classes": 3, "names": ["bird", "cat", "dog"]}
    done = strata("evaluate", str(run_dir), "--split", "test")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["split"] == "test" and result["step"] == STEPS and result["classes"] == ["bird", "cat", "dog"]
    assert result["accuracy"] >= 0.9, result  # chance is 1/3
    for metric in ("precision", "recall", "f1"):
        per_class = [result[f"{metric}_{i}"] for i in range(3)]
        assert result[metric] == pytest.approx(sum(per_class) / 3)  # macro average
        assert min(per_class) > 0.5


def test_classify_export_and_serve_answer_class_names(trained, tmp_path: Path):
    run_dir, _ = trained
    texts = ["our kitten began to purr", "the puppy wants to fetch", "a feather fell from the nest"]
    done = strata("classify", str(run_dir), *texts)
    assert done.returncode == 0, done.stderr[-2000:]
    answers = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert [a["label_name"] for a in answers] == ["cat", "dog", "bird"]
    assert [a["label"] for a in answers] == [1, 2, 0] and [a["text"] for a in answers] == texts
    assert all(len(a["probabilities"]) == 3 and sum(a["probabilities"]) == pytest.approx(1, abs=1e-3) for a in answers)

    out = tmp_path / "served"
    done = strata("export", str(run_dir), "--out", str(out))
    assert done.returncode == 0 and "text -> label, probabilities, label_name" in done.stdout, done.stderr[-2000:]
    assert serve_in_fresh_process(out, texts, "label_name") == ["cat", "dog", "bird"]
    served = serve_in_fresh_process(out, texts, "probabilities")
    assert [max(range(3), key=row.__getitem__) for row in served] == [1, 2, 0]


def test_a_run_directory_is_accepted_as_the_config(trained):
    run_dir, _ = trained
    done = trainer("validate", str(run_dir), "--set", "train.log_every=7")  # what launch and slurm submit run first
    assert done.returncode == 0, done.stderr[-2000:]
    resolved = json.loads(done.stdout)
    assert resolved["run_dir"] == str(run_dir) and resolved["train"]["log_every"] == 7
    done = strata("slurm", "submit", str(run_dir), "--dry-run")
    assert done.returncode == 0 and str(run_dir / "slurm" / "config.yaml") in done.stdout, done.stderr[-2000:]
    done = strata("train", str(run_dir))  # resumes that run with its saved config: already finished
    assert done.returncode == 0, done.stderr[-2000:]
    assert "config file not found" not in done.stderr
    assert f"strata: already at step {STEPS}, train.steps is {STEPS}: nothing to do" in done.stdout
