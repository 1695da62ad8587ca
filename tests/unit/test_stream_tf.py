"""The TensorFlow side of the data foundation: the tf.data stream yields exactly the numpy rows, and
tensorflow-text's in-graph SentencePiece (for exported models) matches the Python tokenizer id for id."""
from __future__ import annotations

import random

import numpy as np
import pytest

from tests.textdata import UNICODE_DOC, documents, random_string, tokenizer, write_jsonl
from trainer.data.prepare import PrepareSpec, prepare
from trainer.data.stream import TokenStream

tf = pytest.importorskip("tensorflow")


def test_dataset_yields_the_rows_of_each_step_for_this_rank_from_any_start(tmp_path):
    model = tmp_path / "tok.model"
    tokenizer("bpe", 400).save(model)
    prepare(PrepareSpec(out=tmp_path / "p", inputs=[str(write_jsonl(tmp_path / "d.jsonl", documents()[:150]))],
                        tokenizer_model=str(model), shard_tokens=500, workers=1, progress=False))
    stream = TokenStream.open(tmp_path / "p", "train", seq_len=12, global_batch=8, seed=5)
    batches = list(stream.dataset(rank=1, num_ranks=2, start_step=40, steps=5).as_numpy_iterator())
    assert len(batches) == 5
    for step, batch in zip(range(40, 45), batches):
        rows = stream.rows(step, 1, 2)
        assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (4, 12)
        assert np.array_equal(batch["tokens"], rows[:, :-1]) and np.array_equal(batch["targets"], rows[:, 1:])
    spec = stream.dataset(num_ranks=2).element_spec
    assert spec["tokens"].shape.as_list() == [4, 12] and spec["targets"].dtype == tf.int32


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tensorflow_text_tokenizer_matches_the_python_one(model_type):
    tf_text = pytest.importorskip("tensorflow_text")
    tok = tokenizer(model_type)
    in_graph = tf_text.SentencepieceTokenizer(model=tok.model, out_type=tf.int32)
    rng = random.Random(7)
    texts = [UNICODE_DOC, *documents()[:20], *(random_string(rng) for _ in range(300))]
    ids = in_graph.tokenize(tf.constant(texts)).to_list()
    python_ids = tok.encode_batch(texts)
    if model_type == "bpe":
        assert ids == python_ids
    else:  # unigram: segmentations of equal score (ties, e.g. "▁" + "▁▁▁" vs "▁▁▁" + "▁") may be broken
        # differently by tensorflow-text's bundled SentencePiece; the score and length are the same
        def score(seq):
            return round(sum(tok._sp.get_score(i) for i in seq), 3)

        assert [(score(a), len(a)) for a in ids] == [(score(b), len(b)) for b in python_ids]
    assert [t.decode("utf-8") for t in in_graph.detokenize(tf.ragged.constant(ids)).numpy()] == texts
