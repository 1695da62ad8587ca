"""A word-level vocabulary, trained on the training split and saved with the run.

Standardization is defined once and implemented twice, identically: in Python (for training data) and
in the TensorFlow graph (so an exported SavedModel takes raw strings):

    lowercase ASCII letters -> replace every character not in [a-z0-9'] by a space -> split on spaces

Only ASCII letters are lowercased, because `tf.strings.lower` does exactly that; every non-ASCII
character becomes a separator in both implementations anyway, so no Unicode case rule can make them
disagree (Python's `str.lower` would map e.g. the Kelvin sign to "k").

TensorFlow is imported lazily, inside the functions that build graph ops, so the data pipeline and the
launcher can use the Python side without paying for (or having) TensorFlow.
"""
from __future__ import annotations

import functools
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from trainer.errors import DataError

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<s>", "</s>")

# The single source of truth for both implementations (RE2 and Python `re` agree on this class).
STRIP_PATTERN = r"[^a-z0-9']"
_STRIP_RE = re.compile(STRIP_PATTERN)
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def standardize(text: str) -> list[str]:
    """Split `text` into word tokens exactly as the in-graph encoder does."""
    return _STRIP_RE.sub(" ", text.translate(_ASCII_LOWER)).split()


class Vocabulary:
    """Token <-> id mapping with the four special ids first (PAD=0, UNK=1, BOS=2, EOS=3)."""

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary must start with {list(SPECIAL_TOKENS)}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary tokens must be unique")
        self._tokens = tokens
        self._ids = {t: i for i, t in enumerate(tokens)}

    # ------------------------------------------------------------------------------- building
    @classmethod
    def build(cls, texts: Iterable[str], max_size: int) -> "Vocabulary":
        """Most frequent words first (ties alphabetical, so builds are deterministic).

        `max_size` includes the 4 special tokens; rarer words map to UNK.
        """
        if max_size < len(SPECIAL_TOKENS):
            raise ValueError(f"max_size must be at least {len(SPECIAL_TOKENS)} (the special tokens)")
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(standardize(text))
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        words = [w for w, _ in ranked if w not in SPECIAL_TOKENS][: max_size - len(SPECIAL_TOKENS)]
        return cls(list(SPECIAL_TOKENS) + words)

    def save(self, path: str | Path) -> None:
        """Write the token list as JSON (index = id)."""
        Path(path).write_text(json.dumps(self._tokens, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        """Read a vocabulary written by `save`; a missing or corrupt file is a DataError."""
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{path}: vocabulary file not found; it is written with the run (vocab.json) "
                            "- point at the run directory that trained the model")
        try:
            tokens = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: corrupt vocabulary file ({type(e).__name__}); "
                            "restore it from the run directory or retrain") from None
        if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
            raise DataError(f"{path}: corrupt vocabulary file (expected a JSON list of strings); "
                            "restore it from the run directory or retrain")
        try:
            return cls(tokens)
        except ValueError as e:
            raise DataError(f"{path}: corrupt vocabulary file ({e}); restore it or retrain") from None

    # ------------------------------------------------------------------------------ accessors
    @property
    def size(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> list[str]:
        return list(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self._tokens == other._tokens

    def token_id(self, token: str) -> int:
        return self._ids.get(token, UNK)

    # ---------------------------------------------------------------------------- Python side
    def encode(self, text: str, max_len: int, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Ids of `text`, truncated to / padded with PAD up to `max_len`.

        When truncating with `add_eos`, EOS is kept as the last id (the decoder must learn to stop).
        """
        ids = [self._ids.get(w, UNK) for w in standardize(text)]
        if add_bos:
            ids.insert(0, BOS)
        if add_eos:
            ids = ids[: max_len - 1] + [EOS]
        ids = ids[:max_len]
        return ids + [PAD] * (max_len - len(ids))

    def encode_batch(self, texts: Iterable[str], max_len: int, **kw: Any) -> np.ndarray:
        """int32 array [n, max_len] of `encode(text, max_len, **kw)` rows."""
        rows = [self.encode(t, max_len, **kw) for t in texts]
        return np.asarray(rows, dtype=np.int32).reshape(len(rows), max_len)

    def decode(self, ids: Iterable[int]) -> str:
        """Words of `ids` joined by spaces: stops at EOS, skips PAD and BOS; unknown ids read <unk>."""
        words = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i in (PAD, BOS):
                continue
            words.append(self._tokens[i] if 0 <= i < len(self._tokens) else SPECIAL_TOKENS[UNK])
        return " ".join(words)


# ------------------------------------------------------------------------------ in-graph side
@functools.lru_cache(maxsize=None)
def _module_classes() -> tuple[type, type]:
    """Define the tf.Module classes on first use (tf.Module is needed as a base at definition time)."""
    import tensorflow as tf

    class TFEncoder(tf.Module):
        """Raw strings [B] -> int32 ids [B, max_len]; same standardization and ids as `Vocabulary.encode`."""

        def __init__(self, tokens: list[str], max_len: int, add_bos: bool, add_eos: bool):
            super().__init__(name="tf_encoder")
            self.max_len, self.add_bos, self.add_eos = max_len, add_bos, add_eos
            # A tracked resource: tf.saved_model.save stores the table with the module.
            self.table = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(
                    tf.constant(tokens, tf.string), tf.range(len(tokens), dtype=tf.int64)),
                default_value=UNK)

        def __call__(self, texts: Any) -> Any:
            texts = tf.convert_to_tensor(texts, tf.string)
            x = tf.strings.regex_replace(tf.strings.lower(texts), STRIP_PATTERN, " ")
            words = tf.strings.split(x)  # ragged [B, None]; splits on runs of whitespace
            ids = tf.ragged.map_flat_values(self.table.lookup, words)
            batch = tf.shape(texts, out_type=tf.int64)[:1]
            if self.add_bos:
                bos = tf.RaggedTensor.from_tensor(tf.fill(tf.concat([batch, [1]], 0), tf.constant(BOS, tf.int64)))
                ids = tf.concat([bos, ids], axis=1)
            if self.add_eos:
                eos = tf.RaggedTensor.from_tensor(tf.fill(tf.concat([batch, [1]], 0), tf.constant(EOS, tf.int64)))
                ids = tf.concat([ids[:, : self.max_len - 1], eos], axis=1)
            dense = ids.to_tensor(default_value=tf.constant(PAD, tf.int64), shape=[None, self.max_len])
            return tf.cast(dense, tf.int32)

    class TFDecoder(tf.Module):
        """int ids [B, T] -> strings [B]; same rules as `Vocabulary.decode`."""

        def __init__(self, tokens: list[str]):
            super().__init__(name="tf_decoder")
            # A plain list, turned into a graph constant when traced: no variable to checkpoint or to
            # place under a distribution strategy.
            self.token_list = list(tokens)

        def __call__(self, ids: Any) -> Any:
            ids = tf.cast(ids, tf.int32)
            # Everything from the first EOS on is dropped: count EOSs seen so far, keep where zero.
            before_eos = tf.equal(tf.cumsum(tf.cast(tf.equal(ids, EOS), tf.int32), axis=1), 0)
            keep = before_eos & tf.not_equal(ids, PAD) & tf.not_equal(ids, BOS)
            safe = tf.where((ids >= 0) & (ids < len(self.token_list)), ids, UNK)
            table = tf.constant(self.token_list, tf.string)
            words = tf.ragged.boolean_mask(tf.gather(table, safe), keep)
            return tf.strings.reduce_join(words, axis=1, separator=" ")

    return TFEncoder, TFDecoder


def tf_encoder(vocab: Vocabulary, max_len: int, *, add_bos: bool = False, add_eos: bool = False) -> Callable:
    """A tf.Module: `enc(tf.string [B]) -> tf.int32 [B, max_len]`, traceable and SavedModel-safe (a subword
    vocabulary brings its own: trainer/data/subword_vocab.py)."""
    if hasattr(vocab, "tf_encoder"):
        return vocab.tf_encoder(max_len, add_bos=add_bos, add_eos=add_eos)
    encoder_cls, _ = _module_classes()
    return encoder_cls(vocab.tokens, max_len, add_bos, add_eos)


def tf_decoder(vocab: Vocabulary) -> Callable:
    """A tf.Module: `dec(int [B, T]) -> tf.string [B]` (stops at EOS, skips PAD/BOS, joins with spaces)."""
    if hasattr(vocab, "tf_decoder"):
        return vocab.tf_decoder()
    _, decoder_cls = _module_classes()
    return decoder_cls(vocab.tokens)
