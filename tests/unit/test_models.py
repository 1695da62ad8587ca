"""Models as ordered levels: shapes/dtypes, level slicing, causality, padding, decoding, gradients, export.

Everything is tiny (vocab 40, lengths 8/5, widths 8-16) so the whole file runs in seconds on a CPU.
"""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.config import ClassifierModel, SummarizerModel, TransformerModel
from trainer.models import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    Level,
    LevelModel,
    greedy_decode,
    greedy_decoder,
    mask_after_eos,
)
from trainer.models.summarizer import encoder_mask
from trainer.tasks import build_model

VOCAB, MAX_LEN, SUMMARY_LEN, BATCH = 40, 8, 5, 3
CONFIGS = {
    "classifier": ClassifierModel(embed_dim=8, hidden_dim=8, dropout=0.1),
    "summarizer": SummarizerModel(embed_dim=8, hidden_dim=8, encoder_layers=2, dropout=0.1),
    "transformer": TransformerModel(
        d_model=16, num_heads=2, ff_dim=16, encoder_layers=2, decoder_layers=2, dropout=0.1
    ),
}
SUMMARIZERS = ["summarizer", "transformer"]
EXPECTED_LEVELS = {
    "classifier": ["embed", "pool", "hidden", "output"],
    "summarizer": ["embed", "encoder_1", "encoder_2", "decoder", "attention", "output"],
    "transformer": [
        "embed", "encoder_block_0", "encoder_block_1", "decoder_block_0", "decoder_block_1", "output",
    ],
}


def make_model(kind: str) -> LevelModel:
    return build_model(CONFIGS[kind], vocab_size=VOCAB, max_len=MAX_LEN, summary_len=SUMMARY_LEN)


def make_inputs(kind: str, seed: int = 0) -> dict[str, tf.Tensor]:
    """Right-padded random token ids (no PAD/BOS/EOS inside the text), like the data pipeline's."""
    rng = np.random.default_rng(seed)
    lengths = [MAX_LEN, MAX_LEN // 2, 1][:BATCH]
    doc = np.zeros((BATCH, MAX_LEN), np.int32)
    for row, n in enumerate(lengths):
        doc[row, :n] = rng.integers(4, VOCAB, n)
    if kind == "classifier":
        return {"tokens": tf.constant(doc)}
    summary_in = rng.integers(4, VOCAB, (BATCH, SUMMARY_LEN)).astype(np.int32)
    summary_in[:, 0] = BOS_ID
    return {"document": tf.constant(doc), "summary_in": tf.constant(summary_in)}


@pytest.fixture(scope="module")
def models() -> dict[str, LevelModel]:
    """One built float32 model per kind, shared by the read-only tests."""
    keras.utils.set_random_seed(0)
    return {kind: make_model(kind).build_from_inputs() for kind in CONFIGS}


def check_outputs(kind: str, out: dict[str, tf.Tensor]) -> None:
    if kind == "classifier":
        assert set(out) == {"logit", "probability"}
        for key in ("logit", "probability"):
            assert out[key].shape == (BATCH,) and out[key].dtype == tf.float32
        np.testing.assert_allclose(out["probability"], tf.sigmoid(out["logit"]), rtol=1e-6)
    else:
        assert set(out) == {"logits", "attention"}
        assert out["logits"].shape == (BATCH, SUMMARY_LEN, VOCAB) and out["logits"].dtype == tf.float32
        assert out["attention"].shape == (BATCH, SUMMARY_LEN, MAX_LEN)
        assert out["attention"].dtype == tf.float32
        # Attention rows are distributions over the document's real tokens only.
        weights = out["attention"].numpy()
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=2e-2)
        assert np.all(weights[1, :, MAX_LEN // 2 :] == 0) and np.all(weights[2, :, 1:] == 0)
    for value in out.values():
        assert np.all(np.isfinite(value.numpy()))


# ----------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_output_shapes_and_dtypes(models, kind):
    check_outputs(kind, models[kind](make_inputs(kind), training=False))


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_mixed_bfloat16_keeps_float32_outputs(kind):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = make_model(kind).build_from_inputs()
        check_outputs(kind, model(make_inputs(kind), training=False))
        # Activations between levels are bf16 (half the bytes across a pipeline boundary).
        carry = model.run_levels(make_inputs(kind), 0, 1)
        assert any(v.dtype == tf.bfloat16 for v in carry.values())
        assert all(v.dtype == tf.float32 for v in model.trainable_variables)
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_level_names_unique_and_stable(models, kind):
    assert models[kind].level_names == EXPECTED_LEVELS[kind]
    # The config knows the names without building (pipeline partitions are checked before TensorFlow).
    assert CONFIGS[kind].level_names() == EXPECTED_LEVELS[kind]
    assert make_model(kind).level_names == EXPECTED_LEVELS[kind]  # a rebuild gets the same names
    assert models[kind].level_index("output") == len(EXPECTED_LEVELS[kind]) - 1
    assert models[kind].task == ("classification" if kind == "classifier" else "summarization")


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_run_levels_over_any_split_equals_call(models, kind):
    model, inputs = models[kind], make_inputs(kind)
    full = model(inputs, training=False)
    carry = inputs
    for k in range(1, model.num_levels):
        carry = model.run_levels(carry, k - 1, k)  # == run_levels(inputs, 0, k), one level at a time
        for key, value in carry.items():
            assert tf.is_tensor(value), (k, key)
        out = model.run_levels(carry, k, model.num_levels)
        assert set(out) == set(full)
        for key in full:
            np.testing.assert_allclose(out[key], full[key], rtol=1e-5, atol=1e-6, err_msg=f"split {k}")


def test_invalid_models_are_rejected():
    class Bad(Level):
        def call(self, carry, training=False):
            return {"x": None}

    spec = {"tokens": tf.TensorSpec([None, 4], tf.int32)}
    with pytest.raises(ValueError, match="unique"):
        LevelModel([Bad("a"), Bad("a")], task="classification", input_specs=spec)
    bad = LevelModel([Bad("a")], task="classification", input_specs=spec)
    with pytest.raises(TypeError, match="dense tf.Tensor"):
        bad({"tokens": tf.zeros([1, 4], tf.int32)})
    with pytest.raises(KeyError, match="tokens"):
        bad({"text": tf.zeros([1, 4], tf.int32)})
    with pytest.raises(ValueError, match="unknown model kind"):
        build_model(type("Cfg", (), {"kind": "rnn"})(), vocab_size=8, max_len=4, summary_len=4)


# ---------------------------------------------------------------------------------- semantics
def test_classifier_ignores_padding(models):
    model, tokens = models["classifier"], make_inputs("classifier")["tokens"]
    base = model({"tokens": tokens})["logit"]
    longer = tf.concat([tokens, tf.zeros([BATCH, 7], tf.int32)], axis=1)  # extra trailing PAD
    np.testing.assert_allclose(model({"tokens": longer})["logit"], base, rtol=1e-6, atol=1e-6)
    empty = model({"tokens": tf.zeros([1, MAX_LEN], tf.int32)})["logit"]
    assert np.all(np.isfinite(empty.numpy()))  # an all-PAD text pools to 0, not NaN


@pytest.mark.parametrize("kind", SUMMARIZERS)
def test_decoder_is_causal(models, kind):
    model, inputs = models[kind], make_inputs(kind)
    base = model(inputs)["logits"].numpy()
    # One batched call: variant t changes summary_in[:, t+1:] and must keep logits[:, :t+1].
    variants = []
    for t in range(SUMMARY_LEN - 1):
        changed = inputs["summary_in"].numpy()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % (VOCAB - 4) + 4
        variants.append(changed)
    n = len(variants)
    batched = {
        "document": tf.tile(inputs["document"], [n, 1]),
        "summary_in": tf.constant(np.concatenate(variants)),
    }
    logits = model(batched)["logits"].numpy().reshape(n, BATCH, SUMMARY_LEN, VOCAB)
    for t in range(n):
        np.testing.assert_allclose(logits[t, :, : t + 1], base[:, : t + 1], rtol=1e-5, atol=1e-6)
        assert not np.allclose(logits[t, :, t + 1 :], base[:, t + 1 :])


def test_encoder_mask_is_right_padded_and_never_empty():
    doc = tf.constant([[5, 6, 0, 7, 0, 0], [0, 0, 0, 0, 0, 0], [5, 5, 5, 5, 5, 5]])
    expected = [[1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    np.testing.assert_array_equal(encoder_mask(doc).numpy().astype(int), expected)


def test_mask_after_eos():
    tokens = tf.constant([[5, EOS_ID, 6, EOS_ID], [5, 6, 7, 8], [EOS_ID, 4, 4, 4]])
    expected = [[5, EOS_ID, PAD_ID, PAD_ID], [5, 6, 7, 8], [EOS_ID, PAD_ID, PAD_ID, PAD_ID]]
    np.testing.assert_array_equal(mask_after_eos(tokens).numpy(), expected)


@pytest.mark.parametrize("kind", SUMMARIZERS)
def test_greedy_decode_in_tf_function(exported, kind):
    module, document = exported[kind], make_inputs(kind)["document"]
    tokens = module.summarize(document)["tokens"]  # a tf.function with an input_signature
    assert tokens.dtype == tf.int32 and tokens.shape == (BATCH, SUMMARY_LEN)
    # Greedy == teacher-forced argmax on its own output (up to the first EOS): the causal contract.
    summary_in = tf.concat([tf.fill([BATCH, 1], BOS_ID), tokens[:, :-1]], axis=1)
    logits = module.model({"document": document, "summary_in": summary_in})["logits"]
    argmax = tf.argmax(logits, -1).numpy()
    keep = tf.cumsum(tf.cast(tokens == EOS_ID, tf.int32), axis=1, exclusive=True).numpy() == 0
    np.testing.assert_array_equal(argmax[keep], tokens.numpy()[keep])


def test_greedy_decode_eager_and_early_stop():
    """Eagerly, with a model that always says EOS: one step, then PAD everywhere after it."""

    class AlwaysEos(Level):
        def call(self, carry, training=False):
            logits = tf.one_hot(tf.fill(tf.shape(carry["summary_in"]), EOS_ID), VOCAB)
            return {"logits": logits + tf.cast(carry["document"][:, :1, None], tf.float32) * 0}

    spec = {"document": tf.TensorSpec([None, 4], tf.int32), "summary_in": tf.TensorSpec([None, 5], tf.int32)}
    model = LevelModel([AlwaysEos("eos")], task="summarization", input_specs=spec)
    tokens = greedy_decode(model, tf.ones([2, 4], tf.int32), 5).numpy()
    np.testing.assert_array_equal(tokens, [[EOS_ID, 0, 0, 0, 0]] * 2)
    decoder = greedy_decoder(model, 5)
    assert greedy_decoder(model, 5) is decoder  # traced once, reused
    np.testing.assert_array_equal(decoder(tf.ones([3, 4], tf.int32)), [[EOS_ID, 0, 0, 0, 0]] * 3)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_gradients_reach_every_trainable_variable(models, kind):
    model, inputs = models[kind], make_inputs(kind)
    with tf.GradientTape() as tape:
        out = model(inputs, training=True)  # dropout on
        if kind == "classifier":
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(tf.ones([BATCH]), out["logit"]))
        else:
            targets = tf.roll(inputs["summary_in"], -1, axis=1)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(targets, out["logits"])
            )
    variables = model.trainable_variables
    grads = tape.gradient(loss, variables)
    missing = [v.path for v, g in zip(variables, grads) if g is None]
    assert not missing, f"no gradient for {missing}"
    for v, g in zip(variables, grads):
        g = tf.convert_to_tensor(g)  # embeddings give IndexedSlices
        assert np.all(np.isfinite(g.numpy())), v.path
    assert sum(float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(g)))) > 0 for g in grads) >= len(grads) - 2


# --------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_tf_checkpoint_saves_and_restores_every_weight(models, kind, tmp_path):
    model, fresh = models[kind], make_model(kind).build_from_inputs()
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    saved = [name for name, _ in tf.train.list_variables(path) if name.startswith("model/")]
    assert len(saved) == len(model.weights)
    assert all(name.startswith("model/level_") for name in saved)  # keyed by the stable level names
    tf.train.Checkpoint(model=fresh).restore(path).assert_consumed()
    for a, b in zip(model.weights, fresh.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


# ------------------------------------------------------------------------------------- export
class _Exported(tf.Module):
    """How serving export holds a model: a tf.Module with the LevelModel and a decode signature."""

    def __init__(self, model: LevelModel):
        super().__init__()
        self.model = model

    @tf.function(input_signature=[tf.TensorSpec([None, MAX_LEN], tf.int32, name="document")])
    def summarize(self, document):
        return {"tokens": greedy_decode(self.model, document, SUMMARY_LEN)}


@pytest.fixture(scope="module")
def exported(models) -> dict[str, _Exported]:
    return {kind: _Exported(models[kind]) for kind in SUMMARIZERS}


@pytest.mark.slow  # ~10 s each: saving re-traces the decode loop and walks every Keras layer
@pytest.mark.parametrize("kind", SUMMARIZERS)
def test_saved_model_roundtrip(exported, kind, tmp_path):
    module, document = exported[kind], make_inputs(kind)["document"]
    expected = module.summarize(document)["tokens"]
    tf.saved_model.save(module, str(tmp_path), signatures={"serving_default": module.summarize})
    loaded = tf.saved_model.load(str(tmp_path))
    served = loaded.signatures["serving_default"](document=document)
    np.testing.assert_array_equal(served["tokens"], expected)


# ------------------------------------------------------------------------------- K-way classifier
def test_three_classes_get_a_softmax_head_and_two_keep_the_sigmoid_unit():
    keras.utils.set_random_seed(0)
    inputs = make_inputs("classifier")
    three = build_model(CONFIGS["classifier"], vocab_size=VOCAB, max_len=MAX_LEN, summary_len=SUMMARY_LEN,
                        num_classes=3).build_from_inputs()
    out = three(inputs)
    assert set(out) == {"class_logits", "probabilities"}
    assert out["probabilities"].shape == (BATCH, 3) and out["probabilities"].dtype == tf.float32
    np.testing.assert_allclose(tf.reduce_sum(out["probabilities"], -1), np.ones(BATCH), rtol=1e-6)
    assert three.levels[-1].dense.kernel.shape == (8, 3)
    two = build_model(CONFIGS["classifier"], vocab_size=VOCAB, max_len=MAX_LEN, summary_len=SUMMARY_LEN,
                      num_classes=2).build_from_inputs()
    assert two.levels[-1].dense.kernel.shape == (8, 1)  # binary: checkpoints unchanged
    check_outputs("classifier", two(inputs))


def test_k_class_counts_sum_over_batches_into_macro_and_per_class_metrics():
    from trainer.tasks import CLASSIFICATION as task
    from trainer.tasks.classification import BINARY_COUNTS

    # Two batches (as two ranks would count them); truth/prediction pairs over 3 classes.
    batches = [([0, 0, 1, 2], [0, 1, 1, 2]), ([2, 2, 1], [2, 0, 1])]
    totals = {key: 0.0 for key in task.count_keys(3)}
    for truth, predicted in batches:
        logits = tf.one_hot(predicted, 3) * 5.0
        counts = task.eval_counts({"label": tf.constant(truth, tf.int32)},
                                  {"class_logits": logits, "probabilities": tf.nn.softmax(logits)})
        for key, value in counts.items():
            totals[key] += float(value)
    m = task.metrics_from_counts(totals)
    assert m["accuracy"] == pytest.approx(5 / 7)
    # class 0: tp 1, predicted 2, actual 2; class 1: tp 2, predicted 3, actual 2; class 2: tp 2, predicted 2, actual 3
    assert (m["precision_0"], m["recall_0"]) == (pytest.approx(0.5), pytest.approx(0.5))
    assert (m["precision_1"], m["recall_1"]) == (pytest.approx(2 / 3), pytest.approx(1.0))
    assert (m["precision_2"], m["recall_2"]) == (pytest.approx(1.0), pytest.approx(2 / 3))
    assert m["f1_1"] == pytest.approx(0.8)
    assert m["precision"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    assert m["f1"] == pytest.approx((0.5 + 0.8 + 0.8) / 3)
    assert task.count_keys(2) == BINARY_COUNTS  # binary counts unchanged
