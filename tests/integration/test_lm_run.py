"""The `lm` workload end to end, as a user runs it: prepare (real docstrings plus a Unicode document) -> train
(loss goes down; tokens/s and perplexity reported) -> stop and resume mid-shard (the weights of an
uninterrupted run) -> generate (a Unicode prompt survives byte-exact; sampling is seeded) -> export ->
serve in a fresh process that imports only TensorFlow and tensorflow_text."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from tests.conftest import CONFIGS, run_cmd, strata
from tests.readback import trainable_weights
from tests.textdata import UNICODE_DOC, documents, prepare_small
from trainer.data.stream import TokenStream
from trainer.data.subword import UNK_ID, SubwordTokenizer

pytestmark = pytest.mark.slow
STEPS = 30
TINY = ["--set", "model.d_model=32", "--set", "model.num_heads=2", "--set", "model.ff_dim=64",
        "--set", "model.layers=2", "--set", "data.seq_len=32", "--set", "data.batch_size=8",
        "--set", f"train.steps={STEPS}", "--set", "train.log_every=1", "--set", "eval.every=15",
        "--set", "eval.max_batches=4", "--set", "checkpoint.every=15", "--set", "optimizer.warmup_steps=3",
        "--set", "optimizer.lr=0.01", "--set", "logging.progress_bar=false"]
PROMPT = "Ça coûte 5 € ou 4 £, naïve café 中文字符 日本語 😀👍🏽 Return the"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Real docstrings and a Unicode document, in shards of 997 tokens (sequences span shards)."""
    return prepare_small(tmp_path_factory.mktemp("lm") / "prepared", [UNICODE_DOC, *documents()[:400], UNICODE_DOC])


def _train(run_dir: Path, prepared: Path, *extra: str):
    return strata("train", str(CONFIGS / "lm_small.yaml"), *TINY, "--set", f"data.prepared_path={prepared}",
                  "--set", f"run_dir={run_dir}", *extra, timeout=400)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared: Path) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("lmrun") / "run"
    done = _train(run_dir, prepared)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done.stdout


def _scalars(run_dir: Path, tag: str) -> list[float]:
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    return [float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]


_weights = trainable_weights  # the run's trainable weights, from its newest checkpoint


def test_tiny_lm_learns_and_reports_perplexity_and_tokens_per_second(trained, prepared):
    run_dir, stdout = trained
    losses = _scalars(run_dir, "train/loss")
    assert len(losses) == STEPS
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses  # ln(400) = 6.0 at the start
    assert "data: prepared " in stdout and "sequences of 32+1" in stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == STEPS and np.isclose(metrics["perplexity"], np.exp(metrics["loss"]), rtol=1e-6)
    assert metrics["perplexity"] < 400 / 2, metrics  # far better than uniform over the vocabulary
    assert min(_scalars(run_dir, "perf/tokens_per_sec")) > 0
    assert (run_dir / "tokenizer.model").read_bytes() == (prepared / "tokenizer.model").read_bytes()


def test_stopped_and_resumed_mid_shard_ends_with_the_uninterrupted_weights(trained, prepared, tmp_path):
    run_dir = tmp_path / "run"
    first = _train(run_dir, prepared, "--stop-after", "13")  # step 13: 104 sequences in, mid-shard
    assert first.returncode == 0, first.stderr[-3000:]
    second = _train(run_dir, prepared)
    assert second.returncode == 0 and "resuming from step 13" in second.stdout, second.stdout[-2000:]
    reference, resumed = _weights(trained[0]), _weights(run_dir)
    assert reference.keys() == resumed.keys() and reference
    for name in reference:
        np.testing.assert_allclose(resumed[name], reference[name], rtol=1e-6, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(_scalars(run_dir, "train/loss")[-17:], _scalars(trained[0], "train/loss")[-17:],
                               rtol=1e-5)


def test_a_shard_damaged_after_the_checks_ends_training_in_one_line(prepared, tmp_path):
    """With data.verify_shards off, a shard whose bytes went bad (same size) is found by the reader inside
    tf.data, at the first step that reads it: one line naming the shard, exit 2, no traceback."""
    damaged = tmp_path / "prepared"
    shutil.copytree(prepared, damaged)
    stream = TokenStream.open(damaged, "train", seq_len=32, global_batch=8, seed=0, verify=False)
    offsets = stream.data.split("train").offsets

    def shards_read(step: int) -> set[int]:
        starts = stream.sequence_ids(step) * 32
        return {int(i) for s in starts for i in np.searchsorted(offsets, [s, s + 32], side="right") - 1}

    first = shards_read(0)  # step 0 builds the model (outside tf.data): leave its shards intact
    later = next(i for step in range(1, STEPS) for i in sorted(shards_read(step)) if i not in first)
    shard = stream.data.split("train").paths[later]
    shard.write_bytes(b"\xff" * shard.stat().st_size)  # token id 65535, beyond the 400-piece vocabulary
    done = _train(tmp_path / "run", damaged, "--set", "data.verify_shards=false")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines == [f"strata: error: {shard}: token id 65535 >= vocabulary 400: the shard is corrupted; check it "
                     "with `strata data verify`"], lines


def _generate(run_dir: Path, *args: str) -> list[dict]:
    done = strata("generate", str(run_dir), *args, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.strip().splitlines()]


@pytest.fixture(scope="module")
def greedy(trained) -> list[dict]:
    """`strata generate` (greedy, at most 32 tokens) of the Unicode prompt, a plain one and an empty one."""
    return _generate(trained[0], PROMPT, "The", "")


def test_generate_keeps_a_unicode_prompt_and_takes_sampling_options(trained, greedy):
    run_dir, _ = trained
    tok = SubwordTokenizer.load(run_dir / "tokenizer.model")
    assert UNK_ID not in tok.encode(PROMPT) and tok.decode(tok.encode(PROMPT)) == PROMPT
    unicode, _, empty = greedy
    assert unicode["text"] == PROMPT and unicode["completion"].startswith(PROMPT)  # no character lost to <unk>
    assert unicode["prompt_tokens"] == len(tok.encode(PROMPT)) and 0 < unicode["tokens"] <= 32
    assert empty["text"] == "" and empty["prompt_tokens"] == 0
    # Seeds are checked in-process (tests/unit/test_lm_model.py); here: the options reach the sampler.
    sampled = _generate(run_dir, "--max-tokens", "12", "--temperature", "5", "--top-k", "50", "--seed", "1", PROMPT,
                        PROMPT)
    assert sampled[0] == sampled[1] and sampled[0]["tokens"] <= 12  # one seed: the same text for the same prompt
    assert sampled[0]["continuation"] != unicode["continuation"]  # temperature 5 leaves the greedy path


_SERVE_TF_TEXT = """
import json, sys, tensorflow as tf, tensorflow_text  # tensorflow_text registers the SentencePiece ops
model = tf.saved_model.load(sys.argv[1])
out = model.signatures["serving_default"](text=tf.constant(json.loads(sys.argv[2])))["continuation"]
print(json.dumps([x.decode("utf-8") for x in out.numpy()]))
print(sorted(m for m in sys.modules if m.split(".")[0] in ("trainer", "launch", "tests")))
"""


def test_export_serves_raw_text_in_a_fresh_process_like_strata_generate(trained, greedy, tmp_path):
    run_dir, _ = trained
    out = tmp_path / "export"
    done = strata("export", str(run_dir), "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "text -> continuation" in done.stdout
    served = run_cmd([sys.executable, "-c", _SERVE_TF_TEXT, str(out), json.dumps([PROMPT, "The", ""])], timeout=300)
    assert served.returncode == 0, served.stderr[-3000:]
    lines = served.stdout.strip().splitlines()
    continuations = json.loads(lines[-2])
    assert lines[-1] == "[]", lines[-1]  # nothing of Strata was needed
    assert continuations == [a["continuation"] for a in greedy]  # both greedy, 32 tokens at most


def test_plan_shows_the_1b_config(prepared):
    """configs/lm_1b.yaml through `strata plan` (64 ranks; on the tiny corpus: shorter sequences, the same
    model): its parameter count, which tests/unit/test_subword_vocab.py checks against a built model."""
    from trainer.config import load_config

    done = strata("plan", str(CONFIGS / "lm_1b.yaml"), "-np", "64", "--set", f"data.prepared_path={prepared}",
                  "--set", "data.seq_len=8")
    assert done.returncode == 0, done.stderr[-3000:]
    n = load_config(CONFIGS / "lm_1b.yaml").model.parameter_count(400, 8)
    assert 1.0e9 < n < 1.1e9
    assert "strata plan: lm_1b (lm) | 64 replica(s) x 1 stage(s)" in done.stdout
    assert f"model: lm, {n:,} parameters (1.01 billion)" in done.stdout, done.stdout[-1500:]
