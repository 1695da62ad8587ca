"""Greedy decoding for the summarizers, with fixed shapes so it traces once inside a tf.function or a
SavedModel signature.

Each step runs the whole model on a [B, S] buffer that starts as [BOS, PAD, ...] and writes the argmax
at position t into position t+1. Because the decoders are causal, the logits at position t do not
depend on the (still PAD) positions after it, so this equals step-by-step autoregressive decoding.
The encoder is recomputed every step: simple and shape-static; fine at these sequence lengths.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable

import tensorflow as tf

from trainer.models.levels import BOS_ID, EOS_ID, PAD_ID, LevelModel


def mask_after_eos(tokens: tf.Tensor) -> tf.Tensor:
    """Replace every token after the first EOS of each row by PAD (the EOS itself stays)."""
    seen_eos = tf.cumsum(tf.cast(tf.equal(tokens, EOS_ID), tf.int32), axis=1, exclusive=True) > 0
    return tf.where(seen_eos, tf.constant(PAD_ID, tokens.dtype), tokens)


def greedy_decode(model: LevelModel, document: tf.Tensor, summary_len: int) -> tf.Tensor:
    """Greedy summaries: int32 [B, summary_len], excluding BOS, PAD after the first EOS.

    `summary_len` should be the length the model was trained with (`data.summary_len`); the built-in
    summarizers accept any length, so a different one runs but is out of distribution.
    """
    if "summary_in" not in model.input_specs:  # what the decoder reads back: its own tokens so far
        raise ValueError(f"greedy_decode needs a summarization model, got task {model.task!r}")
    if summary_len < 1:
        raise ValueError(f"summary_len must be positive, got {summary_len}")
    document = tf.cast(document, tf.int32)
    batch = tf.shape(document)[0]
    buffer = tf.concat(
        [tf.fill([batch, 1], BOS_ID), tf.fill([batch, summary_len - 1], PAD_ID)], axis=1
    )
    if not model.weights:
        # Variables cannot be created inside the while loop's body; create them here (eagerly, or on
        # the first trace of an enclosing tf.function, where that is allowed).
        model({"document": document, "summary_in": buffer}, training=False)

    positions = tf.range(summary_len)[None, :]

    def step(t, buffer, generated, done):
        logits = model({"document": document, "summary_in": buffer}, training=False)["logits"]
        token = tf.cast(tf.argmax(tf.gather(logits, t, axis=1), axis=-1), tf.int32)[:, None]
        # Write by one-hot select instead of scatter: shapes stay static, and it is cheap at [B, S].
        generated = tf.where(tf.equal(positions, t), token, generated)
        buffer = tf.where(tf.equal(positions, t + 1), token, buffer)
        return t + 1, buffer, generated, done | tf.equal(token[:, 0], EOS_ID)

    def not_finished(t, buffer, generated, done):
        # Stop early once every row has emitted EOS; what follows would be masked to PAD anyway.
        return tf.logical_and(t < summary_len, tf.logical_not(tf.reduce_all(done)))

    _, _, generated, _ = tf.while_loop(
        not_finished,
        step,
        (tf.constant(0), buffer, tf.zeros_like(buffer), tf.zeros([batch], tf.bool)),
        maximum_iterations=summary_len,
    )
    return mask_after_eos(generated)


# model -> {summary_len: traced decoder}. Weak keys: a cache must not keep a discarded model alive, and
# the function is kept off the model itself so SavedModel export does not serialize it too.
_DECODERS: "weakref.WeakKeyDictionary[LevelModel, dict[int, Callable]]" = weakref.WeakKeyDictionary()


def greedy_decoder(model: LevelModel, summary_len: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """`greedy_decode` as a tf.function (traced once per model and summary_len, then reused).

    Eager greedy decoding runs every op of every step from Python (RNN time loops included), which is
    tens of times slower than one traced graph; evaluation loops should call this instead.
    """
    per_model = _DECODERS.setdefault(model, {})
    if summary_len not in per_model:
        model_ref = weakref.ref(model)  # a strong reference in the value would pin the weak key

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="document")])
        def decode(document: tf.Tensor) -> tf.Tensor:
            return greedy_decode(model_ref(), document, summary_len)

        per_model[summary_len] = decode
    return per_model[summary_len]
