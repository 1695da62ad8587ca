"""The data order contract behind resume and data-parallel equivalence (trainer/data/batches.py)."""
from __future__ import annotations

import numpy as np

from trainer.data.batches import eval_dataset, global_index_batches, train_dataset

N, B = 50, 8


def _arrays() -> dict[str, np.ndarray]:
    return {"x": np.arange(N, dtype=np.int64), "y": np.arange(N, dtype=np.float32) * 10}


def _take(ds, k: int) -> list[dict]:
    return [{key: v.numpy() for key, v in batch.items()} for batch in ds.take(k)]


def test_each_epoch_is_a_permutation_without_repeats():
    per_epoch = N // B
    batches = [b.numpy() for b in global_index_batches(N, global_batch=B, seed=3).take(2 * per_epoch)]
    first = np.concatenate(batches[:per_epoch])
    second = np.concatenate(batches[per_epoch:])
    for epoch in (first, second):  # no example twice, none missing but the N % B left over
        assert len(set(epoch)) == len(epoch) == per_epoch * B and set(epoch) <= set(range(N))
    assert not np.array_equal(first, second), "each epoch gets its own order"


def test_resuming_at_step_k_continues_the_same_stream():
    full = _take(train_dataset(_arrays(), global_batch=B, seed=1), 15)
    resumed = _take(train_dataset(_arrays(), global_batch=B, seed=1, start_step=9), 6)
    assert len(full) == 15 and len(resumed) == 6  # zip over an empty stream would check nothing
    for a, b in zip(full[9:], resumed, strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])


def test_shards_are_disjoint_and_make_up_the_global_batch():
    whole = _take(train_dataset(_arrays(), global_batch=B, seed=2), 10)
    shards = [_take(train_dataset(_arrays(), global_batch=B, seed=2, shard_index=r, num_shards=2), 10) for r in (0, 1)]
    for step in range(10):
        a, b = shards[0][step]["x"], shards[1][step]["x"]
        assert not set(a) & set(b)
        np.testing.assert_array_equal(np.concatenate([a, b]), whole[step]["x"])
        np.testing.assert_array_equal(shards[0][step]["y"], a * 10.0)


def test_eval_shards_cover_every_example_once():
    seen = []
    for r in range(3):
        for batch in eval_dataset(_arrays(), batch_size=4, shard_index=r, num_shards=3):
            seen.extend(batch["x"].numpy().tolist())
    assert sorted(seen) == list(range(N))
