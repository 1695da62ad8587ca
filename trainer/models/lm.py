"""Decoder-only causal language model (GPT-style, pre-norm), one level per block.

Levels and their carries (D d_model, L sequence length, V vocabulary):
  embed      {"tokens" int32 [B,L]} -> {"x" [B,L,D]}  token embedding (+ learned positions)
  block_i    {"x"} -> {"x"}   x += Attn(LN(x)) (causal, rotary or no positions inside); x += FFN(LN(x))
  head       {"x"} -> {"logits" f32 [B,L,V]}   final LayerNorm, then the output projection: the
             embedding matrix transposed when tied (one variable, owned by `embed`), else its own kernel

Logits at position t depend on tokens[:, :t+1] only (the causal mask), so one forward pass scores every
next-token prediction of a sequence, and generation may run the model on any prefix.
"""
from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING

import keras
import tensorflow as tf

from trainer.models.dropout import Dropout
from trainer.models.levels import Carry, Level, LevelModel
from trainer.models.transformer import FeedForward

if TYPE_CHECKING:
    from trainer.config import LMModel


def rotary(x: tf.Tensor) -> tf.Tensor:
    """Rotary position embedding of x [B, L, H, Dh] (Dh even): pairs (x[2i], x[2i+1]) rotated by angle
    t * 10000^(-2i/Dh) at position t, so q.k depends on the positions' difference only."""
    length, dim = tf.shape(x)[1], x.shape[-1]
    inv = tf.exp(-math.log(10000.0) * tf.range(0, dim, 2, dtype=tf.float32) / dim)  # [Dh/2]
    angles = tf.cast(tf.range(length), tf.float32)[:, None] * inv[None, :]  # [L, Dh/2]
    cos, sin = tf.cos(angles)[None, :, None, :], tf.sin(angles)[None, :, None, :]
    pairs = tf.reshape(tf.cast(x, tf.float32), tf.concat([tf.shape(x)[:-1], [dim // 2, 2]], 0))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = tf.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return tf.cast(tf.reshape(rotated, tf.shape(x)), x.dtype)


def causal_bias(length: tf.Tensor) -> tf.Tensor:
    """float32 [1, 1, L, L]: 0 where key position <= query position, -1e9 after it."""
    allowed = tf.linalg.band_part(tf.ones([length, length], tf.bool), -1, 0)
    return tf.where(allowed, 0.0, -1e9)[None, None]


class CausalSelfAttention(keras.layers.Layer):
    """Multi-head causal self-attention; softmax in float32 whatever the compute dtype."""

    def __init__(self, cfg: LMModel, name: str = "attention") -> None:
        super().__init__(name=name)
        self.heads, self.head_dim, self.rotary = cfg.num_heads, cfg.d_model // cfg.num_heads, cfg.positions == "rotary"
        self.qkv = keras.layers.Dense(3 * cfg.d_model, name="qkv")
        self.out = keras.layers.Dense(cfg.d_model, name="out")
        self.dropout = Dropout(cfg.dropout, name="dropout")
        self.d_model = cfg.d_model

    def build(self, input_shape: tuple) -> None:
        self.qkv.build(input_shape)
        self.out.build((*input_shape[:-1], self.d_model))

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        shape = tf.shape(x)
        qkv = tf.reshape(self.qkv(x), [shape[0], shape[1], 3, self.heads, self.head_dim])
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, H, Dh]
        if self.rotary:
            q, k = rotary(q), rotary(k)
        scores = tf.einsum("bqhd,bkhd->bhqk", tf.cast(q, tf.float32), tf.cast(k, tf.float32))
        weights = tf.nn.softmax(scores / math.sqrt(self.head_dim) + causal_bias(shape[1]), axis=-1)
        weights = self.dropout(tf.cast(weights, v.dtype), training=training)
        attended = tf.reshape(tf.einsum("bhqk,bkhd->bqhd", weights, v), [shape[0], shape[1], self.d_model])
        return self.out(attended)


class LMEmbed(Level):
    """Token embedding scaled by sqrt(D) (+ a learned position table of data.seq_len rows)."""

    def __init__(self, cfg: LMModel, vocab_size: int, seq_len: int, name: str = "embed") -> None:
        super().__init__(name=name)
        self.d_model = cfg.d_model
        self.embedding = keras.layers.Embedding(vocab_size, cfg.d_model, name="token_embedding",
                                                embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02))
        self.positions = (keras.layers.Embedding(seq_len, cfg.d_model, name="position_embedding",
                                                 embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02))
                          if cfg.positions == "learned" else None)
        self.dropout = Dropout(cfg.dropout, name="dropout")

    def call(self, carry: Carry, training: bool = False) -> Carry:
        tokens = carry["tokens"]
        x = self.embedding(tokens)
        if self.positions is not None:
            x = x + self.positions(tf.range(tf.shape(tokens)[1]))[None]
        return {"x": self.dropout(x, training=training)}


class LMBlock(Level):
    """x += Drop(Attn(LN(x))); x += Drop(FFN(LN(x)))."""

    def __init__(self, cfg: LMModel, name: str) -> None:
        super().__init__(name=name)
        self.norm_attn = keras.layers.LayerNormalization(epsilon=1e-5, name="norm_attn")
        self.attention = CausalSelfAttention(cfg)
        self.norm_ffn = keras.layers.LayerNormalization(epsilon=1e-5, name="norm_ffn")
        self.ffn = FeedForward(cfg.d_model, cfg.ff_dim, cfg.dropout)
        self.dropout = Dropout(cfg.dropout, name="dropout")

    def call(self, carry: Carry, training: bool = False) -> Carry:
        x = carry["x"]
        x = x + self.dropout(self.attention(self.norm_attn(x), training=training), training=training)
        x = x + self.dropout(self.ffn(self.norm_ffn(x), training=training), training=training)
        return {"x": x}


class LMHead(Level):
    """Final LayerNorm and the projection to the vocabulary, in float32.

    Tied: the embed level's matrix, reached through a weak reference so the variable is tracked (and
    checkpointed, and counted) once, as embed's; its gradient sums both uses (the tape does that)."""

    def __init__(self, vocab_size: int, tied: LMEmbed | None, name: str = "head") -> None:
        super().__init__(name=name)
        self.norm = keras.layers.LayerNormalization(epsilon=1e-5, name="norm")
        self._tied = weakref.ref(tied) if tied is not None else None
        self.dense = None if tied is not None else keras.layers.Dense(vocab_size, use_bias=False, dtype="float32",
                                                                       name="output")

    def call(self, carry: Carry, training: bool = False) -> Carry:
        x = self.norm(carry["x"])
        if self.dense is not None:
            return {"logits": self.dense(x)}
        matrix = self._tied().embedding.embeddings  # [V, D], float32 variable
        return {"logits": tf.einsum("bld,vd->blv", tf.cast(x, tf.float32), tf.cast(matrix, tf.float32))}


def build_lm(cfg: LMModel, *, vocab_size: int, seq_len: int) -> LevelModel:
    """Inputs `{"tokens": int32 [B, L]}`, any L (learned positions: L <= seq_len); outputs `{"logits"}`."""
    embed = LMEmbed(cfg, vocab_size, seq_len)
    levels: list[Level] = [embed, *(LMBlock(cfg, name=f"block_{i}") for i in range(1, cfg.layers + 1))]
    levels.append(LMHead(vocab_size, embed if cfg.tie_embeddings else None))
    specs = {"tokens": tf.TensorSpec([None, None], tf.int32, name="tokens")}
    return LevelModel(levels, task="language_modeling", input_specs=specs, name="lm")
