"""Streaming token input from a prepared directory: the corpus is never loaded, the order is pure.

A split's shards are one token stream (documents already separated by the end-of-document id). Sequence i
is tokens [i*L, i*L + L + 1) of that stream (L = seq_len; one extra token for the input/target shift), so
there are n = (T - 1) // L sequences of T tokens (the tail shorter than a sequence is not used).

Order: epoch e visits the n sequences in the order of `permute(., n, key(seed, e))`, a keyed bijection of
[0, n) (a Feistel network on the next even power of two with cycle walking): O(1) memory and O(1) time per
position, no index array whose size grows with the corpus. Position p of the whole run is sequence
permute(p mod n, n, key(seed, p div n)); the global batch of step s is positions [s*B, (s+1)*B), and rank r
of R data-parallel ranks takes its rows [r*B/R, (r+1)*B/R). So the rows of (step, rank) are a pure function
of (seed, step, rank): resuming at step k starts there at no cost, and R ranks read disjoint rows whose
union is what one rank reads.

Reading: each sequence's bytes are read with `os.pread` at its offset (a sequence may span two shards),
so the process holds one batch, never the corpus; memory-mapping would be as fast but its touched pages
count in the process's resident memory. Token ids >= the vocabulary are an error naming the shard.

Only `TokenStream.dataset` imports TensorFlow.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from trainer.data.shards import PreparedData, SplitShards
from trainer.errors import DataError

_M64 = (1 << 64) - 1
# A DataError raised inside tf.data reaches Python as a TensorFlow error whose text holds the original
# message after this mark (`data_error_in` finds it), so training can still end with one line.
DATA_ERROR_MARK = "strata data error: "
_ROUNDS = 6


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a well-mixed round function."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def epoch_key(seed: int, epoch: int) -> int:
    """The permutation key of one epoch: a 64-bit hash of (seed, epoch)."""
    x = np.array([(seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + 1) & _M64], dtype=np.uint64)
    return int(_mix(x)[0])


def permute(index: np.ndarray, n: int, key: int) -> np.ndarray:
    """A keyed bijection of [0, n), applied element-wise to `index` (int array with values in [0, n))."""
    index = np.asarray(index, dtype=np.int64)
    if n <= 1:
        return np.zeros_like(index)
    bits = max(2, (n - 1).bit_length())
    half = (bits + 1) // 2  # the Feistel domain is 4**half >= n (at most 4n): few cycle-walking steps
    mask = np.uint64((1 << half) - 1)
    keys = [np.uint64(epoch_key(key, r)) for r in range(_ROUNDS)]

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    x = feistel(index.astype(np.uint64))
    outside = x >= np.uint64(n)
    while outside.any():  # cycle walking: values outside [0, n) are mapped again until they fall inside
        x[outside] = feistel(x[outside])
        outside = x >= np.uint64(n)
    return x.astype(np.int64)


class _Reader:
    """Token ranges of a split's stream read with pread (thread-safe; a few file descriptors kept open)."""

    def __init__(self, shards: SplitShards, dtype: np.dtype, vocab_size: int, max_open: int = 64) -> None:
        self.shards, self.dtype, self.vocab_size, self.max_open = shards, dtype, vocab_size, max_open
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._lock = threading.Lock()

    def _fd(self, shard: int) -> int:
        with self._lock:
            if shard in self._fds:
                self._fds.move_to_end(shard)
                return self._fds[shard]
            try:
                fd = os.open(self.shards.paths[shard], os.O_RDONLY)
            except OSError as e:
                raise DataError(f"{self.shards.paths[shard]}: cannot be read ({e.strerror})") from None
            self._fds[shard] = fd
            while len(self._fds) > self.max_open:
                os.close(self._fds.popitem(last=False)[1])
            return fd

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) of the stream (may span shards)."""
        parts, offsets, size = [], self.shards.offsets, self.dtype.itemsize
        shard = int(np.searchsorted(offsets, start, side="right")) - 1
        while count > 0:
            take = min(count, int(offsets[shard + 1]) - start)
            raw = os.pread(self._fd(shard), take * size, (start - int(offsets[shard])) * size)
            if len(raw) != take * size:
                raise DataError(f"{self.shards.paths[shard]}: shorter than the index says (truncated while "
                                "reading); re-run `strata data prepare`")
            part = np.frombuffer(raw, dtype=self.dtype)
            if part.size and int(part.max()) >= self.vocab_size:
                raise DataError(f"{self.shards.paths[shard]}: token id {int(part.max())} >= vocabulary "
                                f"{self.vocab_size}: the shard is corrupted; check it with `strata data verify`")
            parts.append(part)
            start, count, shard = start + take, count - take, shard + 1
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class TokenStream:
    """Fixed-length sequences of one split, in a pure (seed, step) order, batched for data-parallel ranks."""

    def __init__(self, data: PreparedData, split: str, *, seq_len: int, global_batch: int, seed: int = 0,
                 shuffle: bool = True) -> None:
        if seq_len < 1 or global_batch < 1:
            raise DataError(f"seq_len {seq_len} and global batch {global_batch} must be positive")
        self.data, self.split, self.seq_len, self.global_batch = data, split, seq_len, global_batch
        self.seed, self.shuffle = seed, shuffle
        shards = data.split(split)
        self.tokens = shards.tokens
        self.num_sequences = (self.tokens - 1) // seq_len
        if self.num_sequences < global_batch:
            raise DataError(f"{data.directory}: the {split} split has {self.tokens:,} tokens = {self.num_sequences} "
                            f"sequences of {seq_len}+1 tokens, fewer than one global batch of {global_batch}; "
                            "use more data, a smaller batch (data.batch_size) or shorter sequences (data.seq_len)")
        self._reader = _Reader(shards, data.dtype, data.vocab_size)

    @classmethod
    def open(cls, directory: str | os.PathLike, split: str, *, verify: bool = True, **kwargs) -> "TokenStream":
        """Open a prepared directory (sizes checked, sha256 too with verify) and stream one split of it."""
        return cls(PreparedData.open(Path(directory), verify=verify), split, **kwargs)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_sequences // self.global_batch

    def _rank_rows(self, rank: int, num_ranks: int) -> tuple[int, int]:
        if num_ranks < 1 or not 0 <= rank < num_ranks:
            raise DataError(f"rank {rank} of {num_ranks}: need 0 <= rank < num_ranks")
        if self.global_batch % num_ranks:
            raise DataError(f"global batch {self.global_batch} is not divisible by {num_ranks} data-parallel ranks")
        per = self.global_batch // num_ranks
        return rank * per, (rank + 1) * per

    def sequence_ids(self, step: int, rank: int = 0, num_ranks: int = 1) -> np.ndarray:
        """The sequence indices (into [0, num_sequences)) of rank `rank`'s rows at `step` (pure)."""
        lo, hi = self._rank_rows(rank, num_ranks)
        positions = step * self.global_batch + np.arange(lo, hi, dtype=np.int64)
        epochs, within = np.divmod(positions, self.num_sequences)
        if not self.shuffle:
            return within
        out = np.empty_like(within)
        for epoch in np.unique(epochs):  # a batch spans at most two epochs
            at = epochs == epoch
            out[at] = permute(within[at], self.num_sequences, epoch_key(self.seed, int(epoch)))
        return out

    def rows(self, step: int, rank: int = 0, num_ranks: int = 1) -> np.ndarray:
        """int32 [global_batch / num_ranks, seq_len + 1]: the token rows of (step, rank), read from the shards."""
        return self.sequences(self.sequence_ids(step, rank, num_ranks))

    def sequences(self, ids) -> np.ndarray:
        """int32 [len(ids), seq_len + 1]: sequences `ids` (indices into [0, num_sequences)), read from the shards."""
        width = self.seq_len + 1
        out = np.empty((len(ids), width), dtype=np.int32)
        for row, i in enumerate(ids):
            out[row] = self._reader.read(int(i) * self.seq_len, width)
        return out

    def dataset(self, *, rank: int = 0, num_ranks: int = 1, start_step: int = 0, steps: int | None = None):
        """tf.data.Dataset of {"tokens", "targets"}: int32 [global_batch / num_ranks, seq_len], from
        `start_step` on (endless unless `steps`), each element the rows of one step for this rank."""
        import tensorflow as tf

        lo, hi = self._rank_rows(rank, num_ranks)
        shape = [hi - lo, self.seq_len + 1]

        def fetch(step):
            return marked(self.rows, int(step), rank, num_ranks)

        def example(step):
            rows = tf.ensure_shape(tf.numpy_function(fetch, [step], tf.int32, stateful=False), shape)
            return {"tokens": rows[:, :-1], "targets": rows[:, 1:]}

        stop = start_step + steps if steps is not None else 1 << 62
        ds = tf.data.Dataset.range(start_step, stop)
        ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE)

    def eval_dataset(self, *, batch_size: int, rank: int = 0, num_ranks: int = 1):
        """tf.data.Dataset of {"tokens", "targets"}: every sequence of the split once, in order, this rank's
        share (sequences rank, rank + num_ranks, ...), in batches of `batch_size` (the last may be smaller)."""
        import tensorflow as tf

        def fetch(ids):
            return marked(self.sequences, ids)

        def batch(ids):
            rows = tf.numpy_function(fetch, [ids], tf.int32, stateful=False)
            rows = tf.ensure_shape(rows, [None, self.seq_len + 1])
            return {"tokens": rows[:, :-1], "targets": rows[:, 1:]}

        ds = tf.data.Dataset.range(rank, self.num_sequences, num_ranks).batch(batch_size)
        return ds.map(batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)

    def close(self) -> None:
        self._reader.close()


def marked(fn, *args):
    """`fn(*args)`, a DataError re-raised with DATA_ERROR_MARK in front (for code run inside tf.data)."""
    try:
        return fn(*args)
    except DataError as err:
        raise ValueError(f"{DATA_ERROR_MARK}{err}\n") from None


def data_error_in(err: BaseException) -> DataError | None:
    """The DataError a TensorFlow error carries from inside tf.data (see `marked`), or None."""
    text = str(err)
    at = text.find(DATA_ERROR_MARK)
    if at < 0:
        return None
    return DataError(text[at + len(DATA_ERROR_MARK):].splitlines()[0])
