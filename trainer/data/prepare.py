"""`strata data prepare`: documents -> subword tokenizer -> fixed-size token shards + index (see shards.py).

Deterministic: documents are read in a fixed order, each goes to train or val by a keyed hash of its text
(`doc_split`: identical documents always land in the same split, so duplicates cannot leak from train into
val), and each split's token stream is cut every `shard_tokens` tokens. Running twice, with any number
of workers, writes identical bytes.

Resumable: every shard is written atomically, then recorded in index.partial.json (also atomic), with the
position in the document stream after it. A re-run with the same settings keeps the finished shards and
starts from the earliest unfinished position of the two splits. index.json is written last.

Parallel: the main process reads documents and writes shards in order; worker processes (spawned, every
core by default) hash and tokenize chunks of documents, at most a few chunks ahead (bounded memory).
No TensorFlow here.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.data import documents as docs_mod
from trainer.data import pydocs
from trainer.data.shards import (FORMAT, INDEX, PARTIAL_INDEX, SPLITS, TOKENIZER, VERSION, dtype_for, read_index,
                                 shard_name, write_json_atomic)
from trainer.data.subword import MAX_VOCAB, MIN_VOCAB, SubwordTokenizer, train_tokenizer, write_atomic
from trainer.errors import DataError

BUILTINS = ("pydocs",)
_CHUNK_CHARS = 1 << 20  # documents per worker task: about this many characters
_SKIPPED = 255  # split code of a document that a resumed run does not need


@dataclass
class PrepareSpec:
    """What to prepare (the command line's options, validated by `validate`)."""

    out: Path
    inputs: list[str] = field(default_factory=list)
    builtin: str | None = None
    fields: list[str] = field(default_factory=lambda: ["text"])
    text_docs: str = "paragraph"
    tokenizer: str = "bpe"
    vocab_size: int = 8000
    tokenizer_model: str | None = None
    sample_chars: int = 10_000_000
    shard_tokens: int = 1 << 24
    val_fraction: float = 0.05
    seed: int = 0
    workers: int = 0  # 0: every core
    progress: bool = True


def validate(spec: PrepareSpec) -> None:
    """Cheap checks of the options, before anything is read or written."""
    if bool(spec.inputs) == bool(spec.builtin):
        raise DataError("give input files/folders or --builtin NAME (exactly one of them)")
    if spec.builtin and spec.builtin not in BUILTINS:
        raise DataError(f"--builtin {spec.builtin!r} is unknown; built-in corpora: {', '.join(BUILTINS)}")
    if not 0 <= spec.val_fraction < 1:
        raise DataError(f"--val-fraction {spec.val_fraction}: must be in [0, 1)")
    if spec.shard_tokens < 1:
        raise DataError(f"--shard-tokens {spec.shard_tokens}: must be a positive number of tokens")
    if spec.workers < 0:
        raise DataError(f"--workers {spec.workers}: must be >= 1 (or 0 for every core)")
    if not 0 <= spec.seed < 1 << 63:
        raise DataError(f"--seed {spec.seed}: must be a non-negative integer")
    if spec.sample_chars < 1:
        raise DataError(f"--sample-chars {spec.sample_chars}: must be positive")
    if not spec.tokenizer_model and not MIN_VOCAB <= spec.vocab_size <= MAX_VOCAB:
        raise DataError(f"--vocab-size {spec.vocab_size}: must be between {MIN_VOCAB} (special ids, 256 bytes and "
                        f"a few pieces) and {MAX_VOCAB}")
    if spec.tokenizer_model and not Path(spec.tokenizer_model).is_file():
        raise DataError(f"--tokenizer-model {spec.tokenizer_model}: file not found")
    if not spec.fields or not all(f.strip() for f in spec.fields):
        raise DataError("--field: give the name of the text field (e.g. --field text)")
    if spec.out.exists() and not spec.out.is_dir():
        raise DataError(f"--out {spec.out}: exists and is not a folder; choose a new folder")


def doc_split(text: str, *, seed: int, val_fraction: float) -> int:
    """0 (train) or 1 (val), from a keyed hash of the document's text: deterministic and order-free."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=seed.to_bytes(8, "little", signed=False)).digest()
    return int(int.from_bytes(digest, "little") < val_fraction * 2.0**64)


# ---- sources and settings ----------------------------------------------------------------------

def _sources(spec: PrepareSpec) -> tuple[list[dict], Callable[[], Iterator[str]]]:
    """The sources' records for the index and a factory of the document iterator."""
    if spec.builtin:
        return [pydocs.fingerprint()], pydocs.documents
    files = docs_mod.list_sources(spec.inputs)
    records = [{"path": str(s.path.resolve()), "kind": s.kind, "bytes": s.path.stat().st_size,
                "sha256": docs_mod.sha256_file(s.path)} for s in files]
    return records, lambda: docs_mod.iter_documents(files, fields=spec.fields, text_docs=spec.text_docs)


def _settings(spec: PrepareSpec) -> dict:
    """Everything the shards depend on besides the sources and the tokenizer (compared separately)."""
    reading = {} if spec.builtin else {"fields": spec.fields, "text_docs": spec.text_docs}
    return {**reading, "seed": spec.seed, "shard_tokens": spec.shard_tokens, "val_fraction": spec.val_fraction}


def _tokenizer_spec(spec: PrepareSpec) -> dict:
    if spec.tokenizer_model:
        return {"given": str(Path(spec.tokenizer_model).resolve())}
    return {"train": {"type": spec.tokenizer, "vocab_size": spec.vocab_size, "sample_chars": spec.sample_chars,
                      "seed": spec.seed}}


def _existing(out: Path) -> dict | None:
    """The finished or partial index already in --out, None for a new or empty folder."""
    if (out / INDEX).is_file():
        return read_index(out)
    if (out / PARTIAL_INDEX).is_file():
        return json.loads((out / PARTIAL_INDEX).read_text(encoding="utf-8"))
    if out.is_dir() and any(out.iterdir()):
        raise DataError(f"--out {out}: folder is not empty and holds no prepared data; choose a new or empty folder")
    return None


def _check_existing(out: Path, existing: dict, sources: list[dict], settings: dict, tok_spec: dict,
                    given: SubwordTokenizer | None) -> None:
    """Refuse to continue a preparation made from other inputs, settings or tokenizer (one line)."""
    old_sha = existing["tokenizer"]["sha256"]
    if given is not None and given.sha256 != old_sha:
        raise DataError(f"--tokenizer-model {tok_spec['given']} (sha256 {given.sha256[:12]}) did not produce the data "
                        f"in {out} (tokenizer sha256 {old_sha[:12]}); use another --out or delete {out}")
    if given is None and existing["tokenizer"].get("spec") != tok_spec:
        raise DataError(f"--out {out} was prepared with another tokenizer ({existing['tokenizer'].get('spec')}); "
                        "use another --out or delete it")
    if existing["sources"] != sources:
        raise DataError(f"--out {out} was prepared from other inputs (or they changed since); use another --out "
                        "or delete it")
    for key, value in settings.items():
        if existing["settings"].get(key) != value:
            what = f"{key} was {existing['settings'].get(key)!r}, now {value!r}"
            raise DataError(f"--out {out} holds a different preparation ({what}); use another --out or delete it")


# ---- tokenizing in worker processes -------------------------------------------------------------

_W: dict = {}


def _init_worker(model: bytes, seed: int, val_fraction: float, resume_docs: tuple[int, int], dtype: str,
                 in_child: bool = True) -> None:
    if in_child:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _W.update(tok=SubwordTokenizer(model), seed=seed, val_fraction=val_fraction, resume=resume_docs, dtype=dtype)


def _encode_chunk(start: int, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(split code per document, token count per document, all tokens with an end-of-document id after each).
    Documents a resumed run has already written (before its split's resume position) are not tokenized."""
    tok: SubwordTokenizer = _W["tok"]
    splits = np.array([doc_split(t, seed=_W["seed"], val_fraction=_W["val_fraction"]) for t in texts], np.uint8)
    ordinals = start + np.arange(len(texts))
    needed = ordinals >= np.array(_W["resume"])[splits]
    splits[~needed] = _SKIPPED
    encoded = tok.encode_batch([t for t, keep in zip(texts, needed) if keep])
    lengths = np.zeros(len(texts), np.int64)
    lengths[needed] = [len(ids) + 1 for ids in encoded]
    tokens = np.empty(int(lengths.sum()), dtype=_W["dtype"])
    pos = 0
    for ids in encoded:
        tokens[pos:pos + len(ids)] = ids
        tokens[pos + len(ids)] = tok.eod_id
        pos += len(ids) + 1
    return splits, lengths, tokens


class _Pool:
    """Chunks tokenized in order, in worker processes (or in this one for workers=1), few in flight."""

    def __init__(self, workers: int, initargs: tuple) -> None:
        self.pool = None
        if workers > 1:
            self.pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=initargs)
        else:
            _init_worker(*initargs, in_child=False)
        self.limit = 2 * workers + 2
        self.pending: deque = deque()

    def map(self, chunks: Iterable[tuple[int, list[str]]]) -> Iterator:
        for chunk in chunks:
            if self.pool is None:
                yield chunk, _encode_chunk(*chunk)
                continue
            self.pending.append((chunk, self.pool.apply_async(_encode_chunk, chunk)))
            while len(self.pending) >= self.limit:
                yield self._next()
        while self.pending:
            yield self._next()

    def _next(self):
        chunk, result = self.pending.popleft()
        return chunk, result.get()

    def close(self, *, terminate: bool = False) -> None:
        if self.pool is not None:
            (self.pool.terminate if terminate else self.pool.close)()
            self.pool.join()


# ---- shards ---------------------------------------------------------------------------------------

class _SplitWriter:
    """One split's token stream, cut into shards of `shard_tokens`; continues after its finished shards."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int, done: list[dict],
                 on_shard: Callable[[dict], None]) -> None:
        self.out, self.split, self.dtype, self.shard_tokens, self.on_shard = out, split, dtype, shard_tokens, on_shard
        self.number = len(done)
        # Resume position: documents before `resume_doc` are written, and `resume_offset` tokens of it.
        self.resume_doc, self.resume_offset = done[-1]["next"] if done else (0, 0)
        self.tokens: list[np.ndarray] = []
        self.ordinals: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        self.first_offset = 0  # tokens of the first pending document already in an earlier shard
        self.pending = 0

    def add(self, ordinals: np.ndarray, lengths: np.ndarray, tokens: np.ndarray) -> None:
        """Append documents (ordinals, token counts with their end-of-document id, tokens) in stream order."""
        if self.resume_offset:  # the first document was cut by the last finished shard: drop its written part
            assert ordinals[0] == self.resume_doc, (ordinals[0], self.resume_doc)
            tokens, lengths = tokens[self.resume_offset:], lengths.copy()
            lengths[0] -= self.resume_offset
            self.first_offset, self.resume_offset = self.resume_offset, 0
        self.tokens.append(tokens)
        self.ordinals.append(ordinals)
        self.lengths.append(lengths)
        self.pending += len(tokens)
        while self.pending >= self.shard_tokens:
            self._cut(self.shard_tokens)

    def finish(self) -> None:
        """Write what is left as the split's last (shorter) shard."""
        if self.pending:
            self._cut(self.pending)

    def _cut(self, count: int) -> None:
        tokens, ordinals, lengths = (x[0] if len(x) == 1 else np.concatenate(x)  # no copy after the first cut
                                     for x in (self.tokens, self.ordinals, self.lengths))
        ends = np.cumsum(lengths)
        ended = int(np.searchsorted(ends, count, side="right"))  # documents that end inside this shard
        if ended and ends[ended - 1] == count:  # cut on a document boundary
            nxt, first_offset = (int(ordinals[ended - 1]) + 1, 0), 0
        else:  # document `ended` continues in the next shard
            into = count - (int(ends[ended - 1]) if ended else 0)
            first_offset = (self.first_offset if ended == 0 else 0) + into
            nxt = (int(ordinals[ended]), first_offset)
            lengths = lengths.copy()
            lengths[ended] -= into
        self._write(tokens[:count], documents=ended, nxt=nxt)
        self.tokens, self.ordinals, self.lengths = [tokens[count:]], [ordinals[ended:]], [lengths[ended:]]
        self.first_offset, self.pending = first_offset, self.pending - count

    def _write(self, shard: np.ndarray, *, documents: int, nxt: tuple[int, int]) -> None:
        name = shard_name(self.split, self.number)
        data = np.ascontiguousarray(shard, dtype=self.dtype).tobytes()
        write_atomic(self.out / name, data)
        self.number += 1
        self.on_shard({"file": name, "split": self.split, "tokens": len(shard), "documents": documents,
                       "sha256": hashlib.sha256(data).hexdigest(), "next": list(nxt)})


# ---- the whole preparation --------------------------------------------------------------------------

def _chunks(documents: Iterator[str], restart: int, bar) -> Iterator[tuple[int, list[str]]]:
    """(first ordinal, texts) of about _CHUNK_CHARS characters each, from document `restart` on."""
    start, texts, chars = restart, [], 0
    for ordinal, text in enumerate(documents):
        bar.update(len(text))
        if ordinal < restart:
            continue
        if not texts:
            start = ordinal
        texts.append(text)
        chars += len(text)
        if chars >= _CHUNK_CHARS:
            yield start, texts
            texts, chars = [], 0
    if texts:
        yield start, texts


def _progress(spec: PrepareSpec, total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="char", unit_scale=True, file=sys.stderr, dynamic_ncols=True,
                disable=None if spec.progress else True)  # None: shown on a terminal only


def _tokenize(spec: PrepareSpec, documents: Callable[[], Iterator[str]], tok: SubwordTokenizer, index: dict,
              total_chars: int | None) -> None:
    """Write every missing shard of both splits (resuming after the finished ones listed in `index`)."""
    out = spec.out

    def on_shard(entry: dict) -> None:
        index["shards"].append(entry)
        write_json_atomic(out / PARTIAL_INDEX, index)

    dtype = np.dtype(index["dtype"])
    writers = {s: _SplitWriter(out, s, dtype, spec.shard_tokens, [e for e in index["shards"] if e["split"] == s],
                               on_shard) for s in SPLITS}
    resume = tuple(writers[s].resume_doc for s in SPLITS)
    workers = spec.workers or len(os.sched_getaffinity(0))
    pool = _Pool(workers, (tok.model, spec.seed, spec.val_fraction, resume, dtype.str))
    try:
        with _progress(spec, total_chars, "tokenizing") as bar:
            for (start, texts), (codes, lengths, tokens) in pool.map(_chunks(documents(), min(resume), bar)):
                token_codes = np.repeat(codes, lengths)
                for code, split in enumerate(SPLITS):
                    mask = codes == code
                    if mask.any():
                        writers[split].add(start + np.flatnonzero(mask), lengths[mask], tokens[token_codes == code])
        for writer in writers.values():
            writer.finish()
    except BaseException:
        pool.close(terminate=True)
        raise
    pool.close()


def _tokenizer(spec: PrepareSpec, documents: Callable[[], Iterator[str]], given: SubwordTokenizer | None,
               existing: dict | None) -> SubwordTokenizer:
    """The given model, the one an interrupted run already trained, or one trained on a sample of the
    training documents (held-out documents stay unseen by the tokenizer too)."""
    if given is not None:
        return given
    if existing is not None:
        model = spec.out / TOKENIZER
        if model.is_file():
            tok = SubwordTokenizer.load(model)
            if tok.sha256 == existing["tokenizer"]["sha256"]:
                return tok
        raise DataError(f"{model}: missing or changed since the interrupted run; delete {spec.out} and prepare again")
    print(f"strata: training a {spec.tokenizer} tokenizer (vocab {spec.vocab_size}) on a sample of at most "
          f"{spec.sample_chars:,} characters", file=sys.stderr, flush=True)
    workers = spec.workers or len(os.sched_getaffinity(0))
    train_docs = (d for d in documents() if doc_split(d, seed=spec.seed, val_fraction=spec.val_fraction) == 0)
    return train_tokenizer(train_docs, model_type=spec.tokenizer, vocab_size=spec.vocab_size,
                           sample_chars=spec.sample_chars, seed=spec.seed, threads=workers)


def _new_index(spec: PrepareSpec, tok: SubwordTokenizer, sources: list[dict], settings: dict) -> dict:
    return {"format": FORMAT, "version": VERSION, "dtype": dtype_for(tok.vocab_size).str,
            "vocab_size": tok.vocab_size, "special_ids": tok.special_ids, "byte_fallback": tok.byte_fallback,
            "tokenizer": {"file": TOKENIZER, "sha256": tok.sha256, "spec": _tokenizer_spec(spec)},
            "sources": sources, "settings": settings, "shards": []}


def _finish(out: Path, index: dict) -> dict:
    """Sort the shard list, add per-split totals and write index.json (the mark of a finished preparation)."""
    index["shards"].sort(key=lambda e: (SPLITS.index(e["split"]), e["file"]))
    index["splits"] = {s: {"tokens": sum(e["tokens"] for e in index["shards"] if e["split"] == s),
                           "documents": sum(e["documents"] for e in index["shards"] if e["split"] == s),
                           "shards": sum(e["split"] == s for e in index["shards"])} for s in SPLITS}
    write_json_atomic(out / INDEX, index)
    (out / PARTIAL_INDEX).unlink(missing_ok=True)
    return index


def prepare(spec: PrepareSpec) -> tuple[dict, bool]:
    """Prepare (or resume, or find already prepared) `spec.out`; returns (index, whether work was done)."""
    validate(spec)
    sources, documents = _sources(spec)
    if spec.builtin:  # parse the standard library once, not once per pass
        cached = list(documents())
        documents = lambda: iter(cached)  # noqa: E731
    settings = _settings(spec)
    given = SubwordTokenizer.load(spec.tokenizer_model) if spec.tokenizer_model else None
    existing = _existing(spec.out)
    if existing is not None:
        _check_existing(spec.out, existing, sources, settings, _tokenizer_spec(spec), given)
        if (spec.out / INDEX).is_file():
            return existing, False
    elif next(documents(), None) is None:
        raise DataError("no documents: every input is empty" + ("" if spec.builtin else
                        f" or has no text in field(s) {', '.join(spec.fields)}"))
    tok = _tokenizer(spec, documents, given, existing)
    if tok.vocab_size > 1 << 32:
        raise DataError(f"tokenizer vocabulary {tok.vocab_size} does not fit uint32 token ids")
    spec.out.mkdir(parents=True, exist_ok=True)
    for stale in spec.out.glob("*.tmp"):  # half-written files of a killed run
        stale.unlink()
    index = existing or _new_index(spec, tok, sources, settings)
    if existing is None:
        tok.save(spec.out / TOKENIZER)
        write_json_atomic(spec.out / PARTIAL_INDEX, index)
    total = sum(len(d) for d in documents()) if spec.builtin else sum(s["bytes"] for s in sources)
    _tokenize(spec, documents, tok, index, total)
    return _finish(spec.out, index), True
