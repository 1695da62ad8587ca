"""trainer/models/attention.py computes what keras.layers.MultiHeadAttention computes, given the same weights:
padding masks, the causal mask, the returned weights, and the gradients."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.models.attention import MultiHeadAttention

B, T, S, D, H = 3, 5, 7, 16, 4


def _pair(seed: int) -> tuple[MultiHeadAttention, keras.layers.MultiHeadAttention]:
    """Ours (random weights) and Keras' layer carrying the same weights, reshaped to its [D, H, Dh] kernels."""
    keras.utils.set_random_seed(seed)
    ours = MultiHeadAttention(D, H, dropout=0.0)
    ours.build((B, T, D), (B, S, D))
    for dense in (ours.query, ours.key, ours.value, ours.output_dense):  # non-zero biases too
        dense.bias.assign(np.random.default_rng(seed).normal(size=dense.bias.shape).astype(np.float32))
    theirs = keras.layers.MultiHeadAttention(H, D // H)
    theirs.build((B, T, D), (B, S, D))
    for mine, other in ((ours.query, theirs._query_dense), (ours.key, theirs._key_dense),
                        (ours.value, theirs._value_dense), (ours.output_dense, theirs._output_dense)):
        other.kernel.assign(tf.reshape(mine.kernel, other.kernel.shape))
        other.bias.assign(tf.reshape(mine.bias, other.bias.shape))
    return ours, theirs


@pytest.mark.parametrize("case", ["cross_padding", "causal_self", "unmasked_cross"])
def test_same_outputs_weights_and_gradients_as_keras(case):
    ours, theirs = _pair(seed=3)
    rng = np.random.default_rng(0)
    query = tf.constant(rng.normal(size=(B, T, D)).astype(np.float32))
    value = query if case == "causal_self" else tf.constant(rng.normal(size=(B, S, D)).astype(np.float32))
    keys = value.shape[1]
    valid = np.arange(keys)[None, :] < np.array([keys, keys - 2, 1])[:, None]  # padded keys, one row 1 key
    mask = None if case != "cross_padding" else tf.constant(np.broadcast_to(valid[:, None, :], (B, T, keys)))
    causal = case == "causal_self"
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([query, value])
        out, weights = ours(query, value, attention_mask=mask, causal=causal, return_weights=True)
        ref, ref_weights = theirs(query, value, attention_mask=mask, use_causal_mask=causal,
                                  return_attention_scores=True)
        loss, ref_loss = tf.reduce_sum(out * out), tf.reduce_sum(ref * ref)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(weights.numpy(), ref_weights.numpy(), rtol=1e-5, atol=1e-6)
    if mask is not None:  # masked keys get no weight at all
        assert float(tf.reduce_max(tf.where(mask[:, None], 0.0, weights))) == 0.0
    grads = tape.gradient(loss, [query, value, ours.query.kernel, ours.output_dense.kernel])
    ref_grads = tape.gradient(ref_loss, [query, value, theirs._query_dense.kernel, theirs._output_dense.kernel])
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g.numpy(), tf.reshape(r, g.shape).numpy(), rtol=1e-4, atol=1e-5)
