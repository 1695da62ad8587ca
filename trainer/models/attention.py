"""Multi-head attention whose projections are plain Dense layers (the transformer's self- and cross-attention).

Why not `keras.layers.MultiHeadAttention`: its projections are `EinsumDense` layers, which Keras' TensorFlow
backend runs as a matmul of a [B, T, D] tensor by a [D, H*Dh] kernel broadcast over the batch
(`BatchMatMulV2`). The gradient of that kernel is then B small matmuls and a sum over the batch (measured
with TensorFlow's profiler on the d_model-512 transformer: the q/k/v/output projections' backward took as
long as the feed-forward's, which has twice their FLOPs, plus the sums). A Dense layer on a [B, T, D]
input is a single [B*T, D] x [D, N] matmul both ways (`tf.tensordot`). Same mathematics as Keras' layer
(scores scaled by 1/sqrt(Dh), masked softmax, dropout on the attention weights), checked against it in
tests/unit/test_attention.py; the softmax runs in float32 whatever the compute dtype, as the LM's does.
"""
from __future__ import annotations

import math

import keras
import tensorflow as tf

from trainer.models.dropout import Dropout

MASKED = -1e9  # added to the scores of masked keys before the softmax (float32)


class MultiHeadAttention(keras.layers.Layer):
    """`layer(query [B,T,D], value [B,S,D], attention_mask=bool [B,T,S] | None, causal=False,
    return_weights=False)` -> output [B,T,D] (and the attention weights [B,H,T,S] if asked)."""

    def __init__(self, d_model: int, num_heads: int, dropout: float, name: str = "attention") -> None:
        super().__init__(name=name)
        self.d_model, self.heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.query = keras.layers.Dense(d_model, name="query")
        self.key = keras.layers.Dense(d_model, name="key")
        self.value = keras.layers.Dense(d_model, name="value")
        self.output_dense = keras.layers.Dense(d_model, name="attention_output")
        self.dropout = Dropout(dropout, name="dropout")

    def build(self, query_shape: tuple, value_shape: tuple | None = None) -> None:
        value_shape = query_shape if value_shape is None else value_shape
        self.query.build(query_shape)
        self.key.build(value_shape)
        self.value.build(value_shape)
        self.output_dense.build((*query_shape[:-1], self.d_model))

    def _heads(self, x: tf.Tensor) -> tf.Tensor:
        """[B, L, D] -> [B, H, L, Dh]."""
        shape = tf.shape(x)
        return tf.transpose(tf.reshape(x, [shape[0], shape[1], self.heads, self.head_dim]), [0, 2, 1, 3])

    def call(self, query: tf.Tensor, value: tf.Tensor, attention_mask: tf.Tensor | None = None,
             causal: bool = False, return_weights: bool = False, training: bool = False):
        q, k, v = self._heads(self.query(query)), self._heads(self.key(value)), self._heads(self.value(value))
        scores = tf.matmul(tf.cast(q, tf.float32), tf.cast(k, tf.float32), transpose_b=True) / math.sqrt(self.head_dim)
        allowed = None if attention_mask is None else attention_mask[:, None]  # [B, 1, T, S]
        if causal:
            lower = tf.linalg.band_part(tf.ones([tf.shape(q)[2], tf.shape(k)[2]], tf.bool), -1, 0)[None, None]
            allowed = lower if allowed is None else tf.logical_and(allowed, lower)
        if allowed is not None:
            scores += tf.where(allowed, 0.0, MASKED)
        weights = tf.nn.softmax(scores, axis=-1)
        attended = tf.matmul(self.dropout(tf.cast(weights, v.dtype), training=training), v)  # [B, H, T, Dh]
        shape = tf.shape(attended)
        merged = tf.reshape(tf.transpose(attended, [0, 2, 1, 3]), [shape[0], shape[2], self.d_model])
        out = self.output_dense(merged)
        return (out, weights) if return_weights else out
