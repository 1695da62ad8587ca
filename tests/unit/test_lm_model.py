"""The `lm` model: causal (a position's logits never depend on later tokens), tied embeddings are ONE variable
that both ends train, and generation is greedy at temperature 0 and reproducible by seed otherwise."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.config import LMModel
from trainer.models.generation import generate_ids
from trainer.models.lm import build_lm

V, L = 60, 12


def _model(**kw):
    keras.utils.set_random_seed(0)
    cfg = LMModel(d_model=16, num_heads=2, ff_dim=32, layers=2, **kw)
    model = build_lm(cfg, vocab_size=V, seq_len=L)
    model({"tokens": tf.zeros([1, L], tf.int32)})
    return model


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_logits_at_a_position_ignore_later_tokens(positions):
    model = _model(positions=positions)
    rng = np.random.default_rng(0)
    a = rng.integers(4, V, (2, L)).astype(np.int32)
    b = a.copy()
    b[:, 7:] = rng.integers(4, V, (2, L - 7))
    la, lb = model({"tokens": a})["logits"].numpy(), model({"tokens": b})["logits"].numpy()
    np.testing.assert_allclose(la[:, :7], lb[:, :7], atol=1e-5)
    assert np.abs(la[:, 7:] - lb[:, 7:]).max() > 1e-3  # later positions do see their tokens


def test_tied_embedding_is_one_variable_trained_by_both_ends():
    tied, untied = _model(), _model(tie_embeddings=False)
    assert len(untied.trainable_variables) == len(tied.trainable_variables) + 1
    assert not tied.get_layer("head").trainable_variables or all(
        "embedding" not in v.path for v in tied.get_layer("head").trainable_variables)
    tokens = tf.constant([[5, 6, 7, 8]])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tied({"tokens": tokens})["logits"][:, :, 40])  # id 40 is not among the inputs
    matrix = tied.get_layer("embed").embedding.embeddings
    grad = tf.convert_to_tensor(tape.gradient(loss, matrix))
    assert float(tf.reduce_sum(tf.abs(grad[40]))) > 0  # only the output projection reaches row 40


def test_generation_is_greedy_or_seeded():
    model = _model()
    kw = dict(max_tokens=8, top_k=0, window=L, eod_id=3)
    greedy = generate_ids(model, [5, 6, 7], temperature=0.0, seed=0, **kw)
    assert greedy == generate_ids(model, [5, 6, 7], temperature=0.0, seed=9, **kw)
    assert 0 < len(greedy) <= 8 and 3 not in greedy
    first = generate_ids(model, [5, 6, 7], temperature=2.0, seed=1, **kw)
    assert first == generate_ids(model, [5, 6, 7], temperature=2.0, seed=1, **kw)
    samples = {tuple(generate_ids(model, [5], temperature=2.0, seed=s, **{**kw, "max_tokens": 20})) for s in range(4)}
    assert len(samples) > 1
    top1 = generate_ids(model, [5, 6, 7], temperature=5.0, seed=3, **{**kw, "top_k": 1})
    assert top1 == greedy  # top_k 1 leaves only the argmax, whatever the temperature
    assert generate_ids(model, [], temperature=0.0, seed=0, **kw)  # an empty prompt starts a document
