"""A SentencePiece tokenizer behind the vocabulary interface: Python and in-graph (tensorflow-text) encoding
give the same padded ids, decoding the same text, with <s>/</s> markers and truncation as the word
vocabulary has them; the lm model counts its parameters without being built, exactly."""
from __future__ import annotations

import random

import numpy as np
import tensorflow as tf

from tests.textdata import UNICODE_DOC, documents, random_string, tokenizer
from trainer.data.subword_vocab import SubwordVocabulary


def test_python_and_graph_encoders_agree():
    vocab = SubwordVocabulary(tokenizer("bpe", 400).model)
    rng = random.Random(0)
    texts = [UNICODE_DOC, "", *documents()[:20], *(random_string(rng) for _ in range(30))]
    cases = ((12, {}), (40, {"add_bos": True}), (40, {"add_eos": True}), (7, {"add_bos": True, "add_eos": True}))
    for max_len, kw in cases:
        python = vocab.encode_batch(texts, max_len, **kw)
        graph = vocab.tf_encoder(max_len, **kw)(tf.constant(texts)).numpy()
        np.testing.assert_array_equal(graph, python, err_msg=str(kw))
    ids = vocab.encode_batch(texts, 400, add_bos=True, add_eos=True)
    decoded = [x.decode("utf-8") for x in vocab.tf_decoder()(tf.constant(ids)).numpy()]
    assert decoded == [vocab.decode(row) for row in ids]
    assert decoded[0] == UNICODE_DOC  # nothing lost: byte fallback, no <unk>


def test_lm_parameter_count_matches_the_built_model():
    from trainer.config import LMModel
    from trainer.models.lm import build_lm

    for cfg in (LMModel(d_model=16, num_heads=2, ff_dim=24, layers=2),
                LMModel(d_model=8, num_heads=2, ff_dim=12, layers=1, tie_embeddings=False, positions="learned")):
        model = build_lm(cfg, vocab_size=50, seq_len=10)
        model({"tokens": tf.zeros([2, 10], tf.int32)})
        built = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
        assert built == cfg.parameter_count(50, 10), cfg
