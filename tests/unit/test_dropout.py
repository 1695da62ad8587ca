"""trainer/models/dropout.py: 16-bit dropout masks, against what a dropout layer must do."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.config import ClassifierModel, LMModel, SummarizerModel, TransformerModel
from trainer.models.dropout import Dropout, drop_threshold, packed_dropout, seed_tensor
from trainer.tasks import build_model

SEED = tf.constant([7, 11], tf.int32)


def test_threshold_is_the_rate_in_sixteen_bit_steps():
    assert drop_threshold(0.1) == 6554
    assert drop_threshold(0.5) == 32768
    assert drop_threshold(1e-9) == 1  # a tiny rate still drops something rather than nothing


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_drops_the_rate_and_keeps_the_expectation(rate):
    out = packed_dropout(tf.ones([1000, 1000]), rate, SEED).numpy()
    dropped = float(np.mean(out == 0))
    # 1e6 Bernoulli draws: one standard deviation is <= 5e-4
    assert dropped == pytest.approx(rate, abs=3e-3)
    assert float(np.mean(out)) == pytest.approx(1.0, abs=5e-3)  # kept values scaled by 1 / keep probability
    assert set(np.unique(out)) == {0.0, np.float32(65536 / (65536 - drop_threshold(rate)))}


def test_mask_depends_on_the_seed_only():
    x = tf.random.normal([33, 17, 5])  # an odd number of elements: the last 32-bit draw is half used
    a, b = packed_dropout(x, 0.1, SEED), packed_dropout(x, 0.1, SEED)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    c = packed_dropout(x, 0.1, SEED + 1)
    assert not np.array_equal(a.numpy() == 0, c.numpy() == 0)
    kept = a.numpy() != 0
    np.testing.assert_allclose(a.numpy()[kept], x.numpy()[kept] * 65536 / (65536 - 6554), rtol=1e-6)


def test_gradient_is_the_mask_times_the_scale():
    x = tf.random.normal([64, 128])
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = packed_dropout(x, 0.1, SEED)
        total = tf.reduce_sum(out)
    grad = tape.gradient(total, x).numpy()
    np.testing.assert_allclose(grad, (out.numpy() != 0) * 65536 / (65536 - 6554), rtol=1e-6)


def test_layer_advances_its_seed_and_is_identity_outside_training():
    layer = Dropout(0.1)
    x = tf.ones([256, 256])
    first, second = layer(x, training=True).numpy(), layer(x, training=True).numpy()
    assert not np.array_equal(first == 0, second == 0)  # the seed generator moved on
    np.testing.assert_array_equal(layer(x, training=False).numpy(), x.numpy())
    np.testing.assert_array_equal(Dropout(0.0)(x, training=True).numpy(), x.numpy())


def test_bfloat16_and_xla():
    x = tf.ones([512, 512], tf.bfloat16)
    out = tf.function(lambda x: packed_dropout(x, 0.1, SEED), jit_compile=True)(x)
    assert out.dtype == tf.bfloat16
    assert float(np.mean(out.numpy().astype(np.float32) == 0)) == pytest.approx(0.1, abs=5e-3)


def test_layer_draws_the_sixteen_bit_mask_of_its_seed():
    layer = Dropout(0.1)
    x = tf.random.normal([64, 96])
    seed = tf.constant(layer.seed_generator.state.numpy())  # the seed the next call draws with
    np.testing.assert_array_equal(layer(x, training=True).numpy(), packed_dropout(x, 0.1, seed_tensor(seed)).numpy())


@pytest.mark.parametrize("cfg", [ClassifierModel(dropout=0.1), SummarizerModel(dropout=0.1),
                                 TransformerModel(d_model=16, num_heads=2, ff_dim=16, dropout=0.1),
                                 LMModel(d_model=16, num_heads=2, ff_dim=16, dropout=0.1)], ids=lambda c: c.kind)
def test_every_built_in_model_uses_it(cfg):
    model = build_model(cfg, vocab_size=40, max_len=8, summary_len=5)
    dropouts = [layer for layer in model._flatten_layers(include_self=False)
                if isinstance(layer, keras.layers.Dropout)]
    assert dropouts and all(type(layer) is Dropout for layer in dropouts)
