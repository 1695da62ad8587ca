"""The prepared-dataset format (what `strata data prepare` writes and training reads). No TensorFlow here.

A prepared directory holds

    tokenizer.model       the SentencePiece model that produced every token below
    train-00000.bin ...   token shards: raw little-endian uint16 (vocab <= 65536) or uint32 arrays,
    val-00000.bin ...     `shard_tokens` tokens each (the last one of a split may be shorter)
    index.json            written last: its presence means the preparation finished

Each split is one token stream: its documents in order, each followed by the end-of-document id,
cut into shards at fixed token counts (a document may continue in the next shard). index.json lists, per
shard: file, split, tokens, documents (that end in it), sha256, and `next` (the position in the document
stream after it, used to resume an interrupted preparation); and for the whole: format and version,
dtype, vocab size, special ids, the tokenizer's sha256, the sources with their sha256, the settings.

Why raw arrays: sequence i of a split is tokens [i*L, i*L + L + 1) of its stream, so a reader finds it by
arithmetic and reads exactly those bytes (`os.pread`) from any offset without loading or parsing anything,
and any tool can memory-map a shard (`np.memmap(f, "<u2")`). TFRecord would need an index of record
offsets and a parse per record; ArrayRecord is an extra native dependency for the same random access.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.errors import DataError

FORMAT = "strata-token-shards"
VERSION = 1
INDEX = "index.json"
PARTIAL_INDEX = "index.partial.json"
TOKENIZER = "tokenizer.model"
SPLITS = ("train", "val")


def dtype_for(vocab_size: int) -> np.dtype:
    """The smallest little-endian unsigned dtype that holds every id."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.bin"


def write_json_atomic(path: Path, data: dict) -> None:
    """Replace `path` with `data` as JSON atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_of(path: Path, chunk: int = 1 << 23) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_index(directory: str | os.PathLike) -> dict:
    """The finished index of a prepared directory; every problem is a one-line DataError naming the path."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"{directory}: no such prepared dataset directory; create it with `strata data prepare`")
    path = d / INDEX
    if not path.is_file():
        if (d / PARTIAL_INDEX).is_file():
            raise DataError(f"{directory}: preparation did not finish (no {INDEX}); run the same "
                            "`strata data prepare` command again to resume it")
        raise DataError(f"{directory}: no {INDEX}, so not a prepared dataset directory; create it with "
                        "`strata data prepare`")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); re-run `strata data prepare`") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} index; create the directory with `strata data prepare`")
    if index.get("version") != VERSION:
        raise DataError(f"{path}: format version {index.get('version')}, this Strata reads version {VERSION}; "
                        "re-prepare the data with this version")
    return index


@dataclass(frozen=True)
class SplitShards:
    """One split's shards in stream order: their paths and token counts (offsets[i] = first token of shard i)."""

    name: str
    paths: tuple[Path, ...]
    offsets: np.ndarray  # int64 [n_shards + 1]

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])


class PreparedData:
    """A prepared directory opened for reading, its shards checked against the index (see `open`)."""

    def __init__(self, directory: Path, index: dict) -> None:
        self.directory = directory
        self.index = index
        self.dtype = np.dtype(index["dtype"])
        self.vocab_size = int(index["vocab_size"])
        self.eod_id = int(index["special_ids"]["eod"])
        self.tokenizer_sha256 = index["tokenizer"]["sha256"]

    @classmethod
    def open(cls, directory: str | os.PathLike, *, verify: bool = True) -> "PreparedData":
        """Open a prepared directory. Sizes are always checked against the index (a truncated shard is an
        error naming it); with verify=True every shard's and the tokenizer's sha256 are checked too (one
        sequential read of the corpus, constant memory), so a corrupted byte cannot train silently."""
        data = cls(Path(directory), read_index(directory))
        data.check(verify=verify)
        return data

    def check(self, *, verify: bool) -> None:
        """Every shard exists with the size the index gives (and, with verify, its sha256)."""
        for entry in self.index["shards"]:
            path = self.directory / entry["file"]
            expected = int(entry["tokens"]) * self.dtype.itemsize
            if not path.is_file():
                raise DataError(f"{path}: shard missing (the index lists it); re-run `strata data prepare`")
            size = path.stat().st_size
            if size != expected:
                raise DataError(f"{path}: {size} bytes, the index says {expected} ({entry['tokens']} tokens of "
                                f"{self.dtype.name}): truncated or replaced; re-run `strata data prepare`")
            if verify and sha256_of(path) != entry["sha256"]:
                raise DataError(f"{path}: sha256 differs from the index: the shard is corrupted; "
                                "re-run `strata data prepare` into a new directory")
        if verify:
            model = self.directory / TOKENIZER
            if not model.is_file() or sha256_of(model) != self.tokenizer_sha256:
                raise DataError(f"{model}: missing or its sha256 differs from the index; the tokenizer must be "
                                "the one that produced the data: re-run `strata data prepare`")

    def expect_tokenizer(self, sha256: str, name: str) -> None:
        """Refuse a tokenizer that did not produce this data (one line, naming both)."""
        if sha256 != self.tokenizer_sha256:
            raise DataError(f"tokenizer {name} (sha256 {sha256[:12]}) did not produce the data in {self.directory} "
                            f"(tokenizer sha256 {self.tokenizer_sha256[:12]}); use {self.directory / TOKENIZER} "
                            "or prepare the data again with your tokenizer")

    def split(self, name: str) -> SplitShards:
        """The shards of one split; an unknown or empty split is a one-line DataError."""
        if name not in SPLITS:
            raise DataError(f"split {name!r} is unknown; prepared data has {', '.join(SPLITS)}")
        entries = [e for e in self.index["shards"] if e["split"] == name]
        counts = np.array([int(e["tokens"]) for e in entries], dtype=np.int64)
        if counts.sum() == 0:
            raise DataError(f"{self.directory}: the {name} split is empty (0 tokens); prepare more documents"
                            + (" or a larger --val-fraction" if name == "val" else ""))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return SplitShards(name, tuple(self.directory / e["file"] for e in entries), offsets)
