"""`data.source: prepared`: a prepared token-shard directory (trainer/data/shards.py) as a run's input.

Before TensorFlow loads (`check_prepared`, called by `load_splits`): the index is read, every shard's
size is checked against it (a truncated shard is named), rank 0 also checks every shard's sha256 (with
data.verify_shards: once per start, not once per rank), a configured data.tokenizer must be the one that
produced the data, and the train split must hold one global batch of sequences and val one sequence.
Each problem is one line (DataError, exit 2).

In the run (`PreparedInput`): the train split streams in the pure (seed, step) order of
trainer/data/stream.py, each data-parallel rank reading its rows of every global batch; the val split is
scored once, in order. The run keeps the tokenizer (run_dir/tokenizer.model), and a run whose tokenizer
differs from its data's is refused. No TensorFlow at import.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trainer.data.shards import TOKENIZER, PreparedData
from trainer.data.stream import TokenStream
from trainer.errors import DataError

if TYPE_CHECKING:
    from trainer.config import DataConfig


def open_prepared(data_cfg: DataConfig, *, verify: bool = False) -> PreparedData:
    """The configured prepared directory, sizes (and with `verify`, checksums) checked, and the configured
    tokenizer (if any) checked against it."""
    assert data_cfg.prepared_path
    data = PreparedData.open(Path(data_cfg.prepared_path), verify=verify)
    if data_cfg.tokenizer:
        from trainer.data.subword import SubwordTokenizer

        tok = SubwordTokenizer.load(data_cfg.tokenizer)
        data.expect_tokenizer(tok.sha256, f"{data_cfg.tokenizer} (data.tokenizer)")
    return data


def _val_sequences(data: PreparedData, seq_len: int) -> int:
    tokens = data.split("val").tokens
    n = (tokens - 1) // seq_len
    if n < 1:
        raise DataError(f"{data.directory}: the val split has {tokens:,} tokens, less than one sequence of "
                        f"data.seq_len {seq_len} + 1; prepare with a larger --val-fraction or lower data.seq_len")
    return n


def check_prepared(data_cfg: DataConfig, *, verify: bool = False) -> tuple[str, str]:
    """The checks of the module docstring: (the directory, a description of the data for the start-up line)."""
    data = open_prepared(data_cfg, verify=verify)
    train = TokenStream(data, "train", seq_len=data_cfg.seq_len, global_batch=data_cfg.batch_size)
    val = _val_sequences(data, data_cfg.seq_len)
    train.close()
    note = (f"prepared {data.directory}: train {train.tokens:,} tokens = {train.num_sequences:,} sequences of "
            f"{data_cfg.seq_len}+1 ({train.steps_per_epoch:,} steps per epoch), val {val:,} sequences"
            + (", sha256 of every shard checked" if verify else ""))
    return str(data.directory), note


class PreparedInput:
    """The input of a run on prepared data: its train stream, its val split, the data's tokenizer."""

    def __init__(self, data_cfg: DataConfig, *, seed: int) -> None:
        self.data = open_prepared(data_cfg)
        self.seq_len = data_cfg.seq_len
        self.train = TokenStream(self.data, "train", seq_len=self.seq_len, global_batch=data_cfg.batch_size, seed=seed)
        _val_sequences(self.data, self.seq_len)
        self.val = TokenStream(self.data, "val", seq_len=self.seq_len, global_batch=1, shuffle=False)

    def example_arrays(self) -> dict[str, np.ndarray]:
        """The first global batch's rows (what models are built and profiled on), not the corpus."""
        rows = self.train.rows(0)
        return {"tokens": rows[:, :-1], "targets": rows[:, 1:]}

    def train_dataset(self, *, start_step: int, shard_index: int, num_shards: int):
        return self.train.dataset(rank=shard_index, num_ranks=num_shards, start_step=start_step)

    def eval_dataset(self, split: str, *, batch_size: int, shard_index: int = 0, num_shards: int = 1):
        if split != "val":
            raise DataError(f"prepared data has train and val splits, not {split!r}; evaluate with --split val")
        return self.val.eval_dataset(batch_size=batch_size, rank=shard_index, num_ranks=num_shards)

    def tokenizer_for(self, run_dir: Path):
        """The run's tokenizer (run_dir/tokenizer.model once written, else the data's), as a vocabulary;
        refused when it did not produce this data (the directory was prepared again since)."""
        from trainer.data.subword_vocab import SubwordVocabulary

        saved = run_dir / SubwordVocabulary.file_name
        path = saved if saved.is_file() else self.data.directory / TOKENIZER
        vocab = SubwordVocabulary.load(path, size=self.data.vocab_size)
        self.data.expect_tokenizer(vocab.sha256, str(path))
        return vocab
