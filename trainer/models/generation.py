"""Text generation with a causal language model, as ONE graph function (`continue_ids`) that `strata generate`
traces and the exported SavedModel contains, so both give the same tokens for the same prompt and seed.

The prompt is preceded by the end-of-document id (training streams put it before every document, so the
model reads the prompt as the start of a document; an empty prompt works too). Each step runs the model on
the last `window` tokens (data.seq_len: the longest context it was trained on) and picks the next token:
greedy (argmax) when temperature is 0, else sampled from softmax(logits / temperature), restricted to the
`top_k` most likely tokens when top_k > 0, with a stateless generator seeded by (seed, step): reproducible.
Generation stops after `max_tokens` tokens or at an end-of-document token (not returned). The model is
rerun on the whole window every step (no key/value cache): simple, and fine at these lengths.
"""
from __future__ import annotations

import weakref

import tensorflow as tf

from trainer.models.levels import LevelModel


def pick_token(logits: tf.Tensor, temperature: tf.Tensor, top_k: tf.Tensor, seed: tf.Tensor,
               step: tf.Tensor) -> tf.Tensor:
    """int32 scalar: the next token from float logits [V] (see the module docstring)."""
    logits = tf.cast(logits, tf.float32)
    greedy = tf.argmax(logits, output_type=tf.int32)
    vocab = tf.shape(logits)[0]
    k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)
    scaled = logits / tf.maximum(temperature, 1e-6)
    kth = tf.math.top_k(scaled, k=k).values[-1]
    scaled = tf.where(scaled < kth, tf.constant(-1e30, tf.float32), scaled)
    seeds = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])
    sampled = tf.cast(tf.random.stateless_categorical(scaled[None], 1, seed=seeds)[0, 0], tf.int32)
    return tf.where(temperature > 0.0, sampled, greedy)


def continue_ids(model: LevelModel, prompt: tf.Tensor, max_tokens: tf.Tensor, temperature: tf.Tensor,
                 top_k: tf.Tensor, seed: tf.Tensor, *, window: int, eod_id: int) -> tf.Tensor:
    """int32 [n <= max_tokens]: the ids generated after `prompt` (int32 [P]), end-of-document excluded."""
    ids = tf.concat([[tf.constant(eod_id, tf.int32)], tf.cast(prompt, tf.int32)], 0)
    start = tf.size(ids)

    def step(i, ids, done):
        context = ids[tf.maximum(tf.size(ids) - window, 0):]
        logits = model({"tokens": context[None]}, training=False)["logits"][0, -1]
        token = pick_token(logits, temperature, top_k, seed, i)
        return i + 1, tf.concat([ids, token[None]], 0), tf.equal(token, eod_id)

    def going(i, ids, done):
        return tf.logical_and(i < max_tokens, tf.logical_not(done))

    _, ids, done = tf.while_loop(going, step, (tf.constant(0), ids, tf.constant(False)),
                                 shape_invariants=(tf.TensorShape([]), tf.TensorShape([None]), tf.TensorShape([])))
    new = ids[start:]
    return new[:tf.size(new) - tf.cast(done, tf.int32)]  # the end-of-document token ends the text: dropped


_SIGNATURE = [tf.TensorSpec([None], tf.int32, name="prompt"), tf.TensorSpec([], tf.int32, name="max_tokens"),
              tf.TensorSpec([], tf.float32, name="temperature"), tf.TensorSpec([], tf.int32, name="top_k"),
              tf.TensorSpec([], tf.int64, name="seed")]
_GENERATORS: "weakref.WeakKeyDictionary[LevelModel, dict]" = weakref.WeakKeyDictionary()


def generate_ids(model: LevelModel, prompt: list[int], *, max_tokens: int, temperature: float, top_k: int, seed: int,
                 window: int, eod_id: int) -> list[int]:
    """`continue_ids` as a traced function (once per model, window and end id): the new ids of one prompt."""
    per_model = _GENERATORS.setdefault(model, {})
    if (window, eod_id) not in per_model:
        ref = weakref.ref(model)  # a strong reference in the value would pin the weak key

        @tf.function(input_signature=_SIGNATURE)
        def run(prompt, max_tokens, temperature, top_k, seed):
            return continue_ids(ref(), prompt, max_tokens, temperature, top_k, seed, window=window, eod_id=eod_id)

        per_model[(window, eod_id)] = run
    out = per_model[(window, eod_id)](tf.constant(prompt, tf.int32, shape=[len(prompt)]), tf.constant(max_tokens),
                                      tf.constant(temperature, tf.float32), tf.constant(top_k),
                                      tf.constant(seed, tf.int64))
    return [int(i) for i in out.numpy()]
