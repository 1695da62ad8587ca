"""Train/validation/test splits from any data source, and their encoding into fixed-shape arrays.

`load_splits` gives lists of example dicts (`{"text", "label"}` or `{"document", "summary"}`);
`training_texts` gives what the vocabulary is built from (the train split only, so nothing about
validation or test leaks into it); `encode_splits` turns the splits into numpy arrays that every
backend (single device, mirrored, multi-worker, Horovod, pipeline) feeds the same way.

This module must not import TensorFlow.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field

import numpy as np

from trainer.config import DataConfig
from trainer.data.corpora import make_classification_corpus, make_summarization_corpus
from trainer.data.readers import read_examples, read_tfds
from trainer.data.tokenizer import Vocabulary
from trainer.errors import DataError

TASKS = ("classification", "summarization")
# Seed of the deterministic validation carve from a train file. Fixed (not data.builtin.seed) so that
# changing the built-in corpus seed never silently reshuffles a user's own validation set.
CARVE_SEED = 0


@dataclass
class Splits:
    """Example dicts per split. `test` may be the same list as `val` (see `load_splits`)."""

    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)


def derive_seed(seed: int, split: str) -> int:
    """An independent 63-bit seed per split (hash-derived, so no split's stream is a shifted copy of another's)."""
    digest = hashlib.sha256(f"strata:{seed}:{split}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def carve(examples: list[dict], fraction: float, seed: int = CARVE_SEED, *, source: str = "train") -> tuple[list[dict], list[dict]]:
    """Split `examples` into (train, val) deterministically: a seeded shuffle, val = ceil(fraction * n)."""
    n = len(examples)
    if n < 2:
        raise DataError(f"{source}: only {n} example(s); at least 2 are needed to carve a validation split "
                        "- add examples or set data.val_path")
    n_val = min(n - 1, max(1, math.ceil(fraction * n)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    # Keep the file order inside each split: easier to reason about, and the input pipeline shuffles.
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    val = [e for i, e in enumerate(examples) if i in val_idx]
    return train, val


def load_splits(data_cfg: DataConfig, task: str) -> Splits:
    """Examples of the train, validation and test splits of `data_cfg.source`.

    * builtin: generated from `data_cfg.builtin`, each split with its own seed derived from
      `builtin.seed` (`derive_seed`), so val/test never replay the train generator's stream.
    * jsonl/csv/tsv: read `train_path`, plus `val_path`/`test_path` when given. A missing validation
      split is carved from train (`val_fraction` of it, deterministic seeded shuffle); a missing test
      split is the validation split itself (so "test" metrics then equal validation metrics).
    * tfds: the dataset's "train", "validation" and "test" splits from the local `tfds_data_dir`.
    """
    _check_task(task)
    source = data_cfg.source
    if source == "builtin":
        b = data_cfg.builtin
        make = make_classification_corpus if task == "classification" else make_summarization_corpus
        return Splits(
            train=make(b.train_examples, derive_seed(b.seed, "train")),
            val=make(b.val_examples, derive_seed(b.seed, "val")),
            test=make(b.test_examples, derive_seed(b.seed, "test")),
        )
    if source in ("jsonl", "csv", "tsv"):
        assert data_cfg.train_path  # guaranteed by DataConfig's validator
        train = read_examples(data_cfg.train_path, source, task)  # type: ignore[arg-type]
        if data_cfg.val_path:
            val = read_examples(data_cfg.val_path, source, task)  # type: ignore[arg-type]
        else:
            train, val = carve(train, data_cfg.val_fraction, source=data_cfg.train_path)
        test = read_examples(data_cfg.test_path, source, task) if data_cfg.test_path else val  # type: ignore[arg-type]
        return Splits(train=train, val=val, test=test)
    if source == "tfds":
        if task != "summarization":
            raise DataError("data.source tfds is supported for the summarizers only; use jsonl/csv/tsv or builtin")
        assert data_cfg.tfds_name and data_cfg.tfds_data_dir

        def read(split: str) -> list[dict]:
            return read_tfds(data_cfg.tfds_name, data_cfg.tfds_data_dir, split,  # type: ignore[arg-type]
                             data_cfg.tfds_text_key, data_cfg.tfds_summary_key)

        return Splits(train=read("train"), val=read("validation"), test=read("test"))
    raise ValueError(f"unknown data source {source!r}")


def training_texts(splits: Splits, task: str) -> list[str]:
    """Texts the vocabulary is built from: the train split only (texts, or documents then summaries)."""
    _check_task(task)
    if task == "classification":
        return [e["text"] for e in splits.train]
    return [e["document"] for e in splits.train] + [e["summary"] for e in splits.train]


def encode_examples(examples: list[dict], vocab: Vocabulary, data_cfg: DataConfig, task: str) -> dict[str, np.ndarray]:
    """Arrays of one split (see `encode_splits`)."""
    _check_task(task)
    if task == "classification":
        return {
            "tokens": vocab.encode_batch([e["text"] for e in examples], data_cfg.max_len),
            "label": np.asarray([e["label"] for e in examples], dtype=np.float32).reshape(len(examples)),
        }
    summaries = [e["summary"] for e in examples]
    # Teacher forcing: the decoder reads <s> w1 .. wk and must predict w1 .. wk </s>; both truncate
    # the same words, so summary_in[:, t + 1] == summary_out[:, t] wherever summary_out is not PAD.
    return {
        "document": vocab.encode_batch([e["document"] for e in examples], data_cfg.max_len),
        "summary_in": vocab.encode_batch(summaries, data_cfg.summary_len, add_bos=True),
        "summary_out": vocab.encode_batch(summaries, data_cfg.summary_len, add_eos=True),
    }


def encode_splits(splits: Splits, vocab: Vocabulary, data_cfg: DataConfig, task: str) -> dict[str, dict[str, np.ndarray]]:
    """`{"train"|"val"|"test": arrays}`.

    classification: `tokens` int32 [n, max_len], `label` float32 [n].
    summarization: `document` int32 [n, max_len], `summary_in` int32 [n, summary_len] (BOS + words),
    `summary_out` int32 [n, summary_len] (words + EOS, then PAD).
    """
    return {name: encode_examples(getattr(splits, name), vocab, data_cfg, task) for name in ("train", "val", "test")}
