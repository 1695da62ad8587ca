"""A SentencePiece tokenizer behind the word `Vocabulary`'s interface (size, encode_batch, decode, save, load),
so runs can hold either. It is saved with the run as tokenizer.model (the model's bytes: exact, hashable).
The model is parsed at its first use: training on prepared data needs only its size (the data's index
gives it) and its sha256, so a run trains even where the tokenizer is a stand-in (bench/input.py).

Ids: 0 <pad>, 1 <unk>, 2 <s>, 3 </s> as in the word vocabulary (trainer/data/subword.py). No TensorFlow.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from trainer.data.subword import BOS_ID, EOD_ID, PAD_ID, SubwordTokenizer, write_atomic
from trainer.errors import DataError


class SubwordVocabulary:
    file_name = "tokenizer.model"

    def __init__(self, model: bytes, *, name: str = "tokenizer", size: int | None = None) -> None:
        self.model, self.name, self._size = bytes(model), name, size
        self.sha256 = hashlib.sha256(self.model).hexdigest()
        self._tokenizer: SubwordTokenizer | None = None

    @classmethod
    def load(cls, path: str | os.PathLike, *, size: int | None = None) -> "SubwordVocabulary":
        """The model file at `path` (`size`: its vocabulary, if known without parsing it)."""
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{path}: tokenizer model not found; pass the .model file of a SentencePiece tokenizer")
        return cls(p.read_bytes(), name=str(path), size=size)

    @property
    def tokenizer(self) -> SubwordTokenizer:
        if self._tokenizer is None:
            self._tokenizer = SubwordTokenizer(self.model, name=self.name)
        return self._tokenizer

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(Path(path), self.model)

    @property
    def size(self) -> int:
        return self._size if self._size is not None else self.tokenizer.vocab_size

    @property
    def tokens(self) -> list[str]:
        sp = self.tokenizer._sp
        return [sp.id_to_piece(i) for i in range(self.size)]

    def encode(self, text: str, max_len: int, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Ids of `text`, optionally between <s> and </s>, cut to `max_len` (the end marker kept), PAD-filled."""
        ids = self.tokenizer.encode(text)
        body = max_len - add_bos - add_eos
        ids = [BOS_ID] * add_bos + ids[:max(body, 0)] + [EOD_ID] * add_eos
        return (ids + [PAD_ID] * max_len)[:max_len]

    def encode_batch(self, texts: Iterable[str], max_len: int, **kw) -> np.ndarray:
        return np.asarray([self.encode(t, max_len, **kw) for t in texts], dtype=np.int32).reshape(-1, max_len)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids up to the first </s>, PAD and <s> skipped (as the word vocabulary decodes)."""
        out = []
        for i in map(int, ids):
            if i == EOD_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                out.append(i)
        return self.tokenizer.decode(out)

    # ------------------------------------------------------------------ in the graph (tensorflow-text)
    def tf_encoder(self, max_len: int, *, add_bos: bool = False, add_eos: bool = False):
        """A tf.Module: raw strings [B] -> int32 [B, max_len], the ids of `encode_batch` (BPE models; see
        trainer/data/subword.py), with the SentencePiece model inside (a server needs tensorflow_text)."""
        return _graph_classes()[0](self.model, max_len, add_bos, add_eos)

    def tf_decoder(self):
        """A tf.Module: int ids [B, T] -> strings [B], as `decode` (stops at </s>, skips PAD and <s>)."""
        return _graph_classes()[1](self.model)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SubwordVocabulary) and other.sha256 == self.sha256


@functools.lru_cache(maxsize=None)
def _graph_classes() -> tuple[type, type]:
    """The tf.Module classes, defined at first use (TensorFlow and tensorflow_text load only then)."""
    import tensorflow as tf
    import tensorflow_text as tft

    class SubwordEncoder(tf.Module):
        def __init__(self, model: bytes, max_len: int, add_bos: bool, add_eos: bool) -> None:
            super().__init__(name="subword_encoder")
            self.tokenizer = tft.SentencepieceTokenizer(model=model, out_type=tf.int32)
            self.max_len, self.add_bos, self.add_eos = max_len, add_bos, add_eos

        def __call__(self, texts):
            ids = self.tokenizer.tokenize(tf.convert_to_tensor(texts, tf.string))  # ragged [B, None]
            ids = ids[:, :max(self.max_len - self.add_bos - self.add_eos, 0)]
            def column(value: int):  # one marker per row, also in rows of no tokens
                return tf.RaggedTensor.from_tensor(tf.fill([ids.nrows(out_type=tf.int32), 1], value))

            if self.add_bos:
                ids = tf.concat([column(BOS_ID), ids], axis=1)
            if self.add_eos:
                ids = tf.concat([ids, column(EOD_ID)], axis=1)
            return ids.to_tensor(default_value=PAD_ID, shape=[None, self.max_len])

    class SubwordDecoder(tf.Module):
        def __init__(self, model: bytes) -> None:
            super().__init__(name="subword_decoder")
            self.tokenizer = tft.SentencepieceTokenizer(model=model, out_type=tf.int32)

        def __call__(self, ids):
            ids = tf.cast(ids, tf.int32)
            before_eos = tf.equal(tf.cumsum(tf.cast(tf.equal(ids, EOD_ID), tf.int32), axis=1), 0)
            keep = before_eos & tf.not_equal(ids, PAD_ID) & tf.not_equal(ids, BOS_ID)
            return self.tokenizer.detokenize(tf.ragged.boolean_mask(ids, keep))

    return SubwordEncoder, SubwordDecoder
