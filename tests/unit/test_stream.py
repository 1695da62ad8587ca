"""Streaming input: the order is a pure bijection of (seed, step), ranks split each global batch exactly,
resume costs nothing, the rows are the shards' tokens, and damaged or unusable data is a one-line error."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.textdata import documents, tokenizer, write_jsonl
from trainer.data.prepare import PrepareSpec, prepare
from trainer.data.shards import PreparedData
from trainer.data.stream import TokenStream, epoch_key, permute
from trainer.errors import DataError

SEQ, BATCH = 16, 8


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """~30k tokens of real text in shards of 997 tokens (so many sequences span two shards)."""
    d = tmp_path_factory.mktemp("stream")
    model = d / "tok.model"
    tokenizer("bpe", 400).save(model)
    prepare(PrepareSpec(out=d / "prepared", inputs=[str(write_jsonl(d / "docs.jsonl", documents()))],
                        tokenizer_model=str(model), shard_tokens=997, val_fraction=0.1, workers=1, progress=False))
    return d / "prepared"


def _all_tokens(directory: Path, split: str) -> np.ndarray:
    index = json.loads((directory / "index.json").read_text())
    return np.concatenate([np.fromfile(directory / e["file"], index["dtype"]) for e in index["shards"]
                           if e["split"] == split]).astype(np.int32)


@pytest.mark.parametrize("n", list(range(1, 70)) + [255, 256, 257, 1000, 4097])
def test_permutation_is_a_bijection(n):
    for key in (0, 1, 2**63 + 12345):
        assert sorted(permute(np.arange(n), n, key).tolist()) == list(range(n))
    if n >= 10:  # a real shuffle, and another key gives another order
        assert not np.array_equal(permute(np.arange(n), n, 7), np.arange(n))
        assert not np.array_equal(permute(np.arange(n), n, 7), permute(np.arange(n), n, 8))


def test_rows_are_the_shards_tokens_and_each_epoch_visits_every_sequence_once(prepared):
    stream = TokenStream.open(prepared, "train", seq_len=SEQ, global_batch=BATCH, seed=3)
    tokens = _all_tokens(prepared, "train")
    n = (len(tokens) - 1) // SEQ
    assert stream.num_sequences == n and n > 1000 and stream.tokens == len(tokens)
    for step in (0, 1, 57, stream.steps_per_epoch + 2):
        ids = stream.sequence_ids(step)
        want = tokens[ids[:, None] * SEQ + np.arange(SEQ + 1)]
        assert np.array_equal(stream.rows(step), want)
    first_epoch = np.concatenate([stream.sequence_ids(s) for s in range(stream.steps_per_epoch + 1)])[:n]
    assert sorted(first_epoch.tolist()) == list(range(n))
    second = np.concatenate([stream.sequence_ids(s) for s in range(2 * stream.steps_per_epoch + 3)])[n:2 * n]
    assert sorted(second.tolist()) == list(range(n)) and not np.array_equal(first_epoch, second)
    other_seed = TokenStream.open(prepared, "train", seq_len=SEQ, global_batch=BATCH, seed=4, verify=False)
    assert not np.array_equal(other_seed.sequence_ids(0), stream.sequence_ids(0))
    ordered = TokenStream.open(prepared, "val", seq_len=SEQ, global_batch=BATCH, shuffle=False, verify=False)
    assert ordered.sequence_ids(2).tolist() == list(range(16, 24))


@pytest.mark.parametrize("ranks", [2, 4])
def test_ranks_read_disjoint_rows_whose_union_is_the_one_rank_batch(prepared, ranks):
    stream = TokenStream.open(prepared, "train", seq_len=SEQ, global_batch=BATCH, seed=1, verify=False)
    for step in (0, 1, 2, 250, 1000):
        parts = [stream.sequence_ids(step, r, ranks) for r in range(ranks)]
        assert len(set(np.concatenate(parts).tolist())) == BATCH  # disjoint
        assert np.array_equal(np.concatenate(parts), stream.sequence_ids(step))
        assert np.array_equal(np.concatenate([stream.rows(step, r, ranks) for r in range(ranks)]), stream.rows(step))


def test_resuming_at_step_k_gives_the_rows_of_the_uninterrupted_stream(prepared):
    whole = TokenStream.open(prepared, "train", seq_len=SEQ, global_batch=BATCH, seed=9, verify=False)
    uninterrupted = [whole.rows(s, 1, 2) for s in range(12)]
    resumed = TokenStream.open(prepared, "train", seq_len=SEQ, global_batch=BATCH, seed=9, verify=False)
    assert all(np.array_equal(resumed.rows(s, 1, 2), uninterrupted[s]) for s in range(7, 12))
    assert epoch_key(9, 0) != epoch_key(9, 1) != epoch_key(10, 0)


def _copy(prepared: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(prepared, tmp_path / "copy"))


def test_a_truncated_shard_is_named(prepared, tmp_path):
    d = _copy(prepared, tmp_path)
    with open(d / "train-00003.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match=r"train-00003.bin: 100 bytes, the index says 1994 .*truncated"):
        TokenStream.open(d, "train", seq_len=SEQ, global_batch=BATCH, verify=False)


def test_a_corrupted_shard_is_named_by_its_sha256_or_by_an_impossible_id(prepared, tmp_path):
    d = _copy(prepared, tmp_path)
    with open(d / "train-00002.bin", "r+b") as f:
        f.seek(10)
        f.write(b"\xff\xff")  # id 65535 >= vocab 400
    with pytest.raises(DataError, match="train-00002.bin: sha256 differs from the index: the shard is corrupted"):
        TokenStream.open(d, "train", seq_len=SEQ, global_batch=BATCH)
    unverified = TokenStream.open(d, "train", seq_len=SEQ, global_batch=BATCH, verify=False, shuffle=False)
    unverified.rows(0)  # elsewhere the data is fine
    with pytest.raises(DataError, match="train-00002.bin: token id 65535 >= vocabulary 400"):
        unverified.rows((2 * 997 + 5) // (SEQ * BATCH))  # the step whose rows hold the damaged token


def test_unusable_directories_and_too_small_splits_are_one_line_errors(prepared, tmp_path):
    d = _copy(prepared, tmp_path)
    with pytest.raises(DataError, match="a global batch of 1000000|fewer than one global batch of 100000"):
        TokenStream.open(d, "train", seq_len=SEQ, global_batch=100000, verify=False)
    with pytest.raises(DataError, match="not divisible by 3 data-parallel ranks"):
        TokenStream.open(d, "train", seq_len=SEQ, global_batch=BATCH, verify=False).rows(0, 0, 3)
    (d / "index.json").rename(d / "index.partial.json")
    with pytest.raises(DataError, match="preparation did not finish"):
        PreparedData.open(d)
    (d / "index.partial.json").unlink()
    with pytest.raises(DataError, match=r"copy: no index.json, so not a prepared dataset directory"):
        PreparedData.open(d)
    model = tmp_path / "tok.model"
    tokenizer("bpe", 400).save(model)
    no_val = tmp_path / "no_val"
    prepare(PrepareSpec(out=no_val, inputs=[str(write_jsonl(tmp_path / "d.jsonl", documents()[:20]))],
                        tokenizer_model=str(model), val_fraction=0.0, workers=1, progress=False))
    with pytest.raises(DataError, match="the val split is empty .0 tokens.; prepare more documents or a larger"):
        TokenStream.open(no_val, "val", seq_len=SEQ, global_batch=BATCH)
