"""`data.tokenizer: bpe` for the existing workloads (issue 12): a summarizer whose SentencePiece tokenizer is
trained at the run's start keeps every character of a Unicode document (byte fallback, no <unk>), answers
`strata summarize`, and its SavedModel takes raw strings with the tokenizer in the graph (tensorflow_text),
giving the same summaries in a fresh process."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, run_cmd, strata
from tests.textdata import UNICODE_DOC
from trainer.data.subword import UNK_ID, SubwordTokenizer

pytestmark = pytest.mark.slow
TINY = ["--set", "data.builtin.train_examples=300", "--set", "data.builtin.val_examples=32",
        "--set", "data.builtin.test_examples=32", "--set", "eval.rouge_examples=4", "--set", "train.steps=10",
        "--set", "eval.every=10", "--set", "logging.progress_bar=false", "--set", "model.embed_dim=16",
        "--set", "model.hidden_dim=16", "--set", "data.tokenizer=bpe", "--set", "data.vocab_size=300"]
_SERVE = """
import json, sys, tensorflow as tf, tensorflow_text  # tensorflow_text registers the SentencePiece ops
model = tf.saved_model.load(sys.argv[1])
out = model.signatures["serving_default"](text=tf.constant(json.loads(sys.argv[2])))["summary"]
print(json.dumps([x.decode("utf-8") for x in out.numpy()]))
"""


def test_subword_summarizer_keeps_unicode_and_exports_raw_text(tmp_path: Path):
    run_dir = tmp_path / "run"
    done = strata("train", str(CONFIGS / "summarizer.yaml"), *TINY, "--set", f"run_dir={run_dir}", timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "tokenizer.model").is_file() and not (run_dir / "vocab.json").exists()
    tok = SubwordTokenizer.load(run_dir / "tokenizer.model")
    assert tok.vocab_size == 300 and UNK_ID not in tok.encode(UNICODE_DOC)
    assert tok.decode(tok.encode(UNICODE_DOC)) == UNICODE_DOC
    texts = [UNICODE_DOC.replace("\x00", ""), "the delivery was late and the soup was cold"]  # argv: no NUL
    summarized = strata("summarize", str(run_dir), *texts, timeout=300)
    assert summarized.returncode == 0, summarized.stderr[-3000:]
    answers = [json.loads(line) for line in summarized.stdout.strip().splitlines()]
    assert [a["text"] for a in answers] == texts
    exported = strata("export", str(run_dir), "--out", str(tmp_path / "export"), timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    served = run_cmd([sys.executable, "-c", _SERVE, str(tmp_path / "export"), json.dumps(texts)], timeout=300)
    assert served.returncode == 0, served.stderr[-3000:]
    assert json.loads(served.stdout.strip().splitlines()[-1]) == [a["summary"] for a in answers]
