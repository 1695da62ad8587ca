"""Hierarchical GRU seq2seq summarizer with Luong-style attention.

Levels and their carries (E embed_dim, H hidden_dim, L document length, S summary length):
  embed       {"document", "summary_in"}                 -> {"doc_embedded" [B,L,E], "doc_mask" bool [B,L],
                                                             "summary_embedded" [B,S,E]}
  encoder_1   {"doc_embedded", "doc_mask", "summary_embedded"} -> {"encoded" [B,L,2H], "doc_mask",
                                                             "summary_embedded"}
  encoder_k   {"encoded", ...} -> same keys; the last encoder also adds "decoder_state" [B,H]
  decoder     {"encoded", "doc_mask", "summary_embedded", "decoder_state"}
                                                         -> {"encoded", "doc_mask", "decoder_out" [B,S,H]}
  attention   {"encoded", "doc_mask", "decoder_out"}    -> {"attended" [B,S,H], "attention" f32 [B,S,L]}
  output      {"attended", "attention"}                 -> {"logits" f32 [B,S,V], "attention" f32 [B,S,L]}

The decoder is a left-to-right GRU under teacher forcing, so position t depends only on
summary_in[:, :t+1]; greedy decoding by re-running on a growing buffer is therefore exact.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import keras
import tensorflow as tf

from trainer.models.dropout import Dropout
from trainer.models.levels import PAD_ID, Carry, Level, LevelModel

if TYPE_CHECKING:
    from trainer.config import SummarizerModel


def encoder_mask(document: tf.Tensor) -> tf.Tensor:
    """bool [B, L]: True up to and including the last non-PAD token, and always at position 0.

    cuDNN's GRU accepts only strictly right-padded masks with at least one valid step (Keras asserts
    this on GPU). Deriving the mask from the last real token guarantees both, even for an empty
    document or a stray PAD id inside the text.
    """
    length = tf.shape(document)[1]
    positions = tf.range(1, length + 1)[None, :]
    last = tf.reduce_max(tf.where(tf.not_equal(document, PAD_ID), positions, 0), axis=1)
    return tf.sequence_mask(tf.maximum(last, 1), maxlen=length)


class SummarizerEmbed(Level):
    """One token embedding shared by document and decoder input (both live on this level's device)."""

    def __init__(self, vocab_size: int, embed_dim: int, dropout: float, name: str = "embed") -> None:
        super().__init__(name=name)
        self.embedding = keras.layers.Embedding(vocab_size, embed_dim, name="token_embedding")
        self.dropout = Dropout(dropout, name="dropout")

    def call(self, carry: Carry, training: bool = False) -> Carry:
        document, summary_in = carry["document"], carry["summary_in"]
        return {
            "doc_embedded": self.dropout(self.embedding(document), training=training),
            "doc_mask": encoder_mask(document),
            "summary_embedded": self.dropout(self.embedding(summary_in), training=training),
        }


class EncoderLevel(Level):
    """A bidirectional GRU over the document; the last one also makes the decoder's initial state."""

    def __init__(self, hidden_dim: int, dropout: float, *, first: bool, last: bool, name: str) -> None:
        super().__init__(name=name)
        self.first, self.last = first, last
        gru = keras.layers.GRU(hidden_dim, return_sequences=True, return_state=last, name="gru")
        self.rnn = keras.layers.Bidirectional(gru, merge_mode="concat", name="bigru")
        self.dropout = Dropout(dropout, name="dropout")
        if last:
            # Bridge [fwd; bwd] final states (2H) to the decoder's width H.
            self.bridge = keras.layers.Dense(hidden_dim, activation="tanh", name="bridge")

    def call(self, carry: Carry, training: bool = False) -> Carry:
        x = carry["doc_embedded"] if self.first else carry["encoded"]
        mask = carry["doc_mask"]
        out = {"doc_mask": mask, "summary_embedded": carry["summary_embedded"]}
        if self.last:
            seq, fwd, bwd = self.rnn(x, mask=mask, training=training)
            out["decoder_state"] = self.bridge(tf.concat([fwd, bwd], axis=-1))
        else:
            seq = self.rnn(x, mask=mask, training=training)
        out["encoded"] = self.dropout(seq, training=training)
        return out


class DecoderLevel(Level):
    """A causal GRU over the embedded `summary_in` (teacher forcing), started from the encoder."""

    def __init__(self, hidden_dim: int, dropout: float, name: str = "decoder") -> None:
        super().__init__(name=name)
        self.rnn = keras.layers.GRU(hidden_dim, return_sequences=True, name="gru")
        self.dropout = Dropout(dropout, name="dropout")

    def call(self, carry: Carry, training: bool = False) -> Carry:
        seq = self.rnn(carry["summary_embedded"], initial_state=carry["decoder_state"], training=training)
        return {
            "encoded": carry["encoded"],
            "doc_mask": carry["doc_mask"],
            "decoder_out": self.dropout(seq, training=training),
        }


class AttentionLevel(Level):
    """Luong "general" attention: score(h_t, e_j) = h_t · W e_j, masked to the document's tokens,
    then attended_t = tanh(W_c [h_t; context_t])."""

    def __init__(self, hidden_dim: int, dropout: float, name: str = "attention") -> None:
        super().__init__(name=name)
        # No bias: a key bias adds the same score to every key and cancels in the softmax.
        self.key_proj = keras.layers.Dense(hidden_dim, use_bias=False, name="key_proj")
        self.attention = keras.layers.Attention(score_mode="dot", name="dot_attention")
        self.combine = keras.layers.Dense(hidden_dim, activation="tanh", name="combine")
        self.dropout = Dropout(dropout, name="dropout")

    def call(self, carry: Carry, training: bool = False) -> Carry:
        encoded, query = carry["encoded"], carry["decoder_out"]
        context, weights = self.attention(
            [query, encoded, self.key_proj(encoded)],
            mask=[None, carry["doc_mask"]],
            return_attention_scores=True,
            training=training,
        )
        attended = self.combine(tf.concat([query, context], axis=-1))
        return {
            "attended": self.dropout(attended, training=training),
            "attention": tf.cast(weights, tf.float32),
        }


class SummarizerOutput(Level):
    """Dense over the vocabulary in float32; logits, not probabilities (the loss applies softmax)."""

    def __init__(self, vocab_size: int, name: str = "output") -> None:
        super().__init__(name=name)
        self.dense = keras.layers.Dense(vocab_size, dtype="float32", name="dense")

    def call(self, carry: Carry, training: bool = False) -> Carry:
        return {"logits": self.dense(carry["attended"]), "attention": carry["attention"]}


def build_summarizer(
    cfg: SummarizerModel, *, vocab_size: int, max_len: int, summary_len: int
) -> LevelModel:
    """Inputs `{"document": int32 [B, max_len], "summary_in": int32 [B, summary_len]}` (PAD 0, BOS 2)."""
    n = cfg.encoder_layers
    levels: list[Level] = [SummarizerEmbed(vocab_size, cfg.embed_dim, cfg.dropout)]
    levels += [
        EncoderLevel(cfg.hidden_dim, cfg.dropout, first=i == 1, last=i == n, name=f"encoder_{i}")
        for i in range(1, n + 1)
    ]
    levels += [
        DecoderLevel(cfg.hidden_dim, cfg.dropout),
        AttentionLevel(cfg.hidden_dim, cfg.dropout),
        SummarizerOutput(vocab_size),
    ]
    specs = {
        "document": tf.TensorSpec([None, max_len], tf.int32, name="document"),
        "summary_in": tf.TensorSpec([None, summary_len], tf.int32, name="summary_in"),
    }
    return LevelModel(levels, task="summarization", input_specs=specs, name="summarizer")
