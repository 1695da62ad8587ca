"""The end-to-end text classifier: Embedding -> masked average -> Dense(relu) -> Dense(1, sigmoid), or
Dense(K, softmax) for K > 2 classes.

Levels and their carries:
  embed   {"tokens"}               -> {"embedded" [B,L,E], "mask" bool [B,L]}
  pool    {"embedded", "mask"}     -> {"pooled" float32 [B,E]}
  hidden  {"pooled"}               -> {"hidden" [B,H]}
  output  {"hidden"}               -> {"logit" float32 [B], "probability" float32 [B]}            (2 classes)
                                      {"class_logits" float32 [B,K], "probabilities" float32 [B,K]}  (K > 2)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import keras
import tensorflow as tf

from trainer.models.dropout import Dropout
from trainer.models.levels import PAD_ID, Carry, Level, LevelModel

if TYPE_CHECKING:
    from trainer.config import ClassifierModel


class ClassifierEmbed(Level):
    """Token embedding plus the non-PAD mask (explicit, not Keras' implicit `mask_zero` metadata,
    because implicit masks do not survive a carry dict or a device boundary)."""

    def __init__(self, vocab_size: int, embed_dim: int, name: str = "embed") -> None:
        super().__init__(name=name)
        self.embedding = keras.layers.Embedding(vocab_size, embed_dim, name="token_embedding")

    def call(self, carry: Carry, training: bool = False) -> Carry:
        tokens = carry["tokens"]
        return {"embedded": self.embedding(tokens), "mask": tf.not_equal(tokens, PAD_ID)}


class MaskedAveragePool(Level):
    """GlobalAveragePooling1D over non-PAD positions, computed in float32.

    Keras' masked GlobalAveragePooling1D divides by the mask count, which is 0 for an all-PAD text and
    gives NaN outputs and NaN gradients; here the count is clamped to 1 (an empty text pools to 0).
    Summing in float32 keeps the mean exact under bf16 and makes the result independent of how much
    trailing PAD there is.
    """

    def __init__(self, name: str = "pool") -> None:
        super().__init__(name=name)

    def call(self, carry: Carry, training: bool = False) -> Carry:
        mask = tf.cast(carry["mask"], tf.float32)[:, :, None]
        total = tf.reduce_sum(tf.cast(carry["embedded"], tf.float32) * mask, axis=1)
        count = tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)
        return {"pooled": total / count}


class ClassifierHidden(Level):
    """Dense(hidden, relu) followed by optional dropout."""

    def __init__(self, hidden_dim: int, dropout: float, name: str = "hidden") -> None:
        super().__init__(name=name)
        self.dense = keras.layers.Dense(hidden_dim, activation="relu", name="dense")
        self.dropout = Dropout(dropout, name="dropout")

    def call(self, carry: Carry, training: bool = False) -> Carry:
        return {"hidden": self.dropout(self.dense(carry["pooled"]), training=training)}


class ClassifierOutput(Level):
    """Dense(1) in float32: the logit, and its sigmoid as the probability (the binary head)."""

    def __init__(self, name: str = "output") -> None:
        super().__init__(name=name)
        # float32 regardless of the global policy: losses and metrics read these directly.
        self.dense = keras.layers.Dense(1, dtype="float32", name="dense")

    def call(self, carry: Carry, training: bool = False) -> Carry:
        logit = tf.squeeze(self.dense(carry["hidden"]), axis=-1)
        return {"logit": logit, "probability": tf.sigmoid(logit)}


class ClassifierSoftmaxOutput(Level):
    """Dense(K) in float32: one logit per class, and their softmax (the K-way head, K > 2)."""

    def __init__(self, num_classes: int, name: str = "output") -> None:
        super().__init__(name=name)
        self.dense = keras.layers.Dense(num_classes, dtype="float32", name="dense")

    def call(self, carry: Carry, training: bool = False) -> Carry:
        logits = self.dense(carry["hidden"])
        return {"class_logits": logits, "probabilities": tf.nn.softmax(logits)}


def build_classifier(cfg: ClassifierModel, *, vocab_size: int, max_len: int, num_classes: int = 2) -> LevelModel:
    """Build the classifier; inputs `{"tokens": int32 [B, max_len]}` with PAD id 0.

    Two classes keep the binary head (one sigmoid unit, binary cross-entropy); more get a softmax head.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    levels = [
        ClassifierEmbed(vocab_size, cfg.embed_dim),
        MaskedAveragePool(),
        ClassifierHidden(cfg.hidden_dim, cfg.dropout),
        ClassifierOutput() if num_classes == 2 else ClassifierSoftmaxOutput(num_classes),
    ]
    specs = {"tokens": tf.TensorSpec([None, max_len], tf.int32, name="tokens")}
    return LevelModel(levels, task="classification", input_specs=specs, name="classifier")
