"""Pre-LayerNorm Transformer encoder–decoder summarizer, one level per block.

Levels and their carries (D d_model, L document length, S summary length):
  embed              {"document", "summary_in"} -> {"enc_x" [B,L,D], "doc_mask" bool [B,L], "dec_x" [B,S,D]}
  encoder_block_i    {"enc_x", "doc_mask", "dec_x"} -> same keys; the last block replaces "enc_x" by the
                     final-LayerNorm'd "memory" [B,L,D]
  decoder_block_j    {"memory", "doc_mask", "dec_x"} -> same keys; the last block drops "memory"/"doc_mask"
                     and adds "attention" f32 [B,S,L] (its cross-attention weights, mean over heads)
  output             {"dec_x", "attention"} -> {"logits" f32 [B,S,V], "attention"}

Masks are explicit `attention_mask` tensors (no Keras implicit masks, which do not survive a carry).
Decoder self-attention is causal, so position t depends only on summary_in[:, :t+1].
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import math

import keras
import tensorflow as tf

from trainer.models.attention import MultiHeadAttention
from trainer.models.dropout import Dropout
from trainer.models.levels import PAD_ID, Carry, Level, LevelModel

if TYPE_CHECKING:
    from trainer.config import TransformerModel


def sinusoidal_positions(length: tf.Tensor | int, dim: int) -> tf.Tensor:
    """float32 [length, dim] sinusoidal position encodings (any length: no table to outgrow)."""
    positions = tf.cast(tf.range(length), tf.float32)[:, None]
    rates = tf.exp(-math.log(10000.0) * tf.cast(tf.range(0, dim, 2), tf.float32) / dim)[None, :]
    angles = positions * rates
    # Interleave sin/cos, then trim for odd dims.
    enc = tf.reshape(tf.stack([tf.sin(angles), tf.cos(angles)], axis=-1), [tf.shape(angles)[0], -1])
    return enc[:, :dim]


def key_padding_mask(key_valid: tf.Tensor, query_length: tf.Tensor) -> tf.Tensor:
    """bool [B, T, S] attention mask from a bool [B, S] key mask."""
    shape = tf.stack([tf.shape(key_valid)[0], query_length, tf.shape(key_valid)[1]])
    return tf.broadcast_to(key_valid[:, None, :], shape)


class TransformerEmbed(Level):
    """Shared token embedding (scaled by sqrt(D)) plus sinusoidal positions, for both sides."""

    def __init__(self, vocab_size: int, d_model: int, dropout: float, name: str = "embed") -> None:
        super().__init__(name=name)
        self.d_model = d_model
        self.embedding = keras.layers.Embedding(vocab_size, d_model, name="token_embedding")
        self.dropout = Dropout(dropout, name="dropout")

    def _embed(self, tokens: tf.Tensor, training: bool) -> tf.Tensor:
        x = self.embedding(tokens)
        pos = tf.cast(sinusoidal_positions(tf.shape(tokens)[1], self.d_model), x.dtype)
        return self.dropout(x * tf.cast(math.sqrt(self.d_model), x.dtype) + pos[None], training=training)

    def call(self, carry: Carry, training: bool = False) -> Carry:
        document = carry["document"]
        return {
            "enc_x": self._embed(document, training),
            "doc_mask": tf.not_equal(document, PAD_ID),
            "dec_x": self._embed(carry["summary_in"], training),
        }


class FeedForward(keras.layers.Layer):
    """Position-wise Dense(ff, relu) -> dropout -> Dense(D)."""

    def __init__(self, d_model: int, ff_dim: int, dropout: float, name: str = "ffn") -> None:
        super().__init__(name=name)
        self.inner = keras.layers.Dense(ff_dim, activation="relu", name="inner")
        self.outer = keras.layers.Dense(d_model, name="outer")
        self.dropout = Dropout(dropout, name="dropout")
        self.ff_dim = ff_dim

    def build(self, input_shape: tuple) -> None:
        # Explicit, so Keras 3 does not trace call() symbolically just to create the variables.
        self.inner.build(input_shape)
        self.outer.build((*input_shape[:-1], self.ff_dim))

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        return self.outer(self.dropout(self.inner(x), training=training))


def _mha(cfg: TransformerModel, name: str) -> MultiHeadAttention:
    return MultiHeadAttention(cfg.d_model, cfg.num_heads, cfg.dropout, name=name)


class EncoderBlock(Level):
    """x += Drop(SelfAttn(LN(x))); x += Drop(FFN(LN(x))). The last block applies the final LayerNorm."""

    def __init__(self, cfg: TransformerModel, *, last: bool, name: str) -> None:
        super().__init__(name=name)
        self.last = last
        self.norm_attn = keras.layers.LayerNormalization(epsilon=1e-6, name="norm_attn")
        self.self_attn = _mha(cfg, "self_attention")
        self.norm_ffn = keras.layers.LayerNormalization(epsilon=1e-6, name="norm_ffn")
        self.ffn = FeedForward(cfg.d_model, cfg.ff_dim, cfg.dropout)
        self.dropout = Dropout(cfg.dropout, name="dropout")
        if last:
            self.norm_out = keras.layers.LayerNormalization(epsilon=1e-6, name="norm_out")

    def call(self, carry: Carry, training: bool = False) -> Carry:
        x, doc_mask = carry["enc_x"], carry["doc_mask"]
        h = self.norm_attn(x)
        mask = key_padding_mask(doc_mask, tf.shape(x)[1])
        x = x + self.dropout(self.self_attn(h, h, attention_mask=mask, training=training), training=training)
        x = x + self.dropout(self.ffn(self.norm_ffn(x), training=training), training=training)
        out = {"doc_mask": doc_mask, "dec_x": carry["dec_x"]}
        if self.last:
            out["memory"] = self.norm_out(x)
        else:
            out["enc_x"] = x
        return out


class DecoderBlock(Level):
    """y += Drop(CausalSelfAttn(LN(y))); y += Drop(CrossAttn(LN(y), memory)); y += Drop(FFN(LN(y)))."""

    def __init__(self, cfg: TransformerModel, *, last: bool, name: str) -> None:
        super().__init__(name=name)
        self.last = last
        self.norm_self = keras.layers.LayerNormalization(epsilon=1e-6, name="norm_self")
        self.self_attn = _mha(cfg, "self_attention")
        self.norm_cross = keras.layers.LayerNormalization(epsilon=1e-6, name="norm_cross")
        self.cross_attn = _mha(cfg, "cross_attention")
        self.norm_ffn = keras.layers.LayerNormalization(epsilon=1e-6, name="norm_ffn")
        self.ffn = FeedForward(cfg.d_model, cfg.ff_dim, cfg.dropout)
        self.dropout = Dropout(cfg.dropout, name="dropout")

    def call(self, carry: Carry, training: bool = False) -> Carry:
        y, memory, doc_mask = carry["dec_x"], carry["memory"], carry["doc_mask"]
        h = self.norm_self(y)
        y = y + self.dropout(self.self_attn(h, h, causal=True, training=training), training=training)
        h = self.norm_cross(y)
        cross_mask = key_padding_mask(doc_mask, tf.shape(y)[1])
        if self.last:
            h, scores = self.cross_attn(h, memory, attention_mask=cross_mask, return_weights=True, training=training)
        else:
            h = self.cross_attn(h, memory, attention_mask=cross_mask, training=training)
        y = y + self.dropout(h, training=training)
        y = y + self.dropout(self.ffn(self.norm_ffn(y), training=training), training=training)
        if self.last:
            return {"dec_x": y, "attention": tf.reduce_mean(tf.cast(scores, tf.float32), axis=1)}
        return {"dec_x": y, "memory": memory, "doc_mask": doc_mask}


class TransformerOutput(Level):
    """Final LayerNorm and Dense to the vocabulary, in float32 (logits; the loss applies softmax)."""

    def __init__(self, vocab_size: int, name: str = "output") -> None:
        super().__init__(name=name)
        self.norm = keras.layers.LayerNormalization(epsilon=1e-6, name="norm")
        self.dense = keras.layers.Dense(vocab_size, dtype="float32", name="dense")

    def call(self, carry: Carry, training: bool = False) -> Carry:
        return {"logits": self.dense(self.norm(carry["dec_x"])), "attention": carry["attention"]}


def build_transformer(
    cfg: TransformerModel, *, vocab_size: int, max_len: int, summary_len: int
) -> LevelModel:
    """Inputs `{"document": int32 [B, max_len], "summary_in": int32 [B, summary_len]}` (PAD 0, BOS 2)."""
    levels: list[Level] = [TransformerEmbed(vocab_size, cfg.d_model, cfg.dropout)]
    n_enc, n_dec = cfg.encoder_layers, cfg.decoder_layers
    levels += [EncoderBlock(cfg, last=i == n_enc - 1, name=f"encoder_block_{i}") for i in range(n_enc)]
    levels += [DecoderBlock(cfg, last=j == n_dec - 1, name=f"decoder_block_{j}") for j in range(n_dec)]
    levels.append(TransformerOutput(vocab_size))
    specs = {
        "document": tf.TensorSpec([None, max_len], tf.int32, name="document"),
        "summary_in": tf.TensorSpec([None, summary_len], tf.int32, name="summary_in"),
    }
    return LevelModel(levels, task="summarization", input_specs=specs, name="transformer")
