"""The subword tokenizer: SentencePiece (BPE or unigram) that never loses a character.

decode(encode(x)) == x for every Unicode string (any sequence of code points that UTF-8 can encode),
because the model is trained with

- byte fallback: a character outside the vocabulary becomes its UTF-8 bytes (`<0x..>` pieces), never `<unk>`;
- identity normalisation: no NFKC, no case folding, no whitespace collapsing, no dummy prefix;
- an escape for U+2581 (`▁`), which SentencePiece uses internally for the space: `▁` is encoded as
  U+E000 U+E001 and U+E000 as U+E000 U+E000 (normalisation rules), and decoding maps them back
  (denormalisation rules stored in the model, so tensorflow-text's in-graph tokenizer does the same);
- `\\n` and `\\t` as single pieces (SentencePiece trains on lines, so they would otherwise cost a byte each).

Fixed special ids of every model trained here:

    0 <pad>   padding, never produced by encode
    1 <unk>   unknown (never produced by encode thanks to byte fallback)
    2 <s>     beginning of sequence (not added by encode)
    3 </s>    end of document: prepared corpora put it after every document

BPE models give the same ids under tensorflow-text's in-graph SentencepieceTokenizer (for exported models);
unigram models may split a tie (two segmentations of equal score) the other way there, so BPE is the default.

The model's content hash is the sha256 of its serialized bytes (`SubwordTokenizer.sha256`): prepared data
records it, so data and tokenizer cannot be mixed silently. No TensorFlow here.
"""
from __future__ import annotations

import hashlib
import heapq
import io
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from trainer.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOD_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")
# 4 special ids, 256 byte pieces and the 2 user-defined symbols are always in the vocabulary.
MIN_VOCAB = 4 + 256 + 2 + 1
MAX_VOCAB = 1 << 20
# Unigram training's result depends on its thread count (BPE's does not): fixed, so the model is the same
# on every machine.
_UNIGRAM_THREADS = 8
# Training sentences longer than SentencePiece's limit (4192 bytes) would be dropped: cut them to this.
_MAX_LINE_CHARS = 1000

_ESC, _ESC2 = "\ue000", "\ue001"
# source code points -> replacement (hex, tab-separated), SentencePiece's rule-file format.
_NORMALIZE = "2581\tE000 E001\nE000\tE000 E000\n"
_DENORMALIZE = "E000 E001\t2581\nE000 E000\tE000\n"


class SubwordTokenizer:
    """A loaded SentencePiece model: encode/decode text, its content hash and its special ids."""

    def __init__(self, model: bytes, *, name: str = "tokenizer") -> None:
        self.model = bytes(model)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self.model)
        except (RuntimeError, OSError) as err:
            raise DataError(f"{name}: not a SentencePiece model ({_first_line(err)}); pass a .model file "
                            "written by sentencepiece or `strata data prepare`") from None
        self.sha256 = hashlib.sha256(self.model).hexdigest()
        if self._sp.eos_id() < 0:
            raise DataError(f"{name}: the model has no end-of-sequence piece (</s>), which prepared data "
                            "needs between documents; train it with eos_id >= 0")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SubwordTokenizer":
        """Load a `.model` file; a missing or invalid file is a one-line DataError."""
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{path}: tokenizer model not found; pass the .model file of a SentencePiece tokenizer")
        return cls(p.read_bytes(), name=str(path))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod_id(self) -> int:
        """The id put after every document (the model's `</s>`)."""
        return self._sp.eos_id()

    @property
    def special_ids(self) -> dict[str, int]:
        return {"pad": self._sp.pad_id(), "unk": self._sp.unk_id(), "bos": self._sp.bos_id(), "eod": self.eod_id}

    @property
    def byte_fallback(self) -> bool:
        """Whether unknown characters become bytes (True for every model trained here) instead of <unk>."""
        byte0 = self._sp.piece_to_id("<0x00>")
        return byte0 != self._sp.unk_id() and self._sp.is_byte(byte0)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def save(self, path: str | os.PathLike) -> None:
        """Write the model atomically (a crash leaves the old file or the new one, never half of one)."""
        write_atomic(Path(path), self.model)


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to `path` through a temporary file in the same folder, fsync'd, then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _fingerprint(line: str, seed: int) -> int:
    digest = hashlib.blake2b(line.encode("utf-8", "surrogatepass"), digest_size=8, key=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little")


def _lines(texts: Iterable[str]) -> Iterator[str]:
    """Training lines: the non-blank lines of every text, long ones cut to _MAX_LINE_CHARS."""
    for text in texts:
        for line in text.splitlines():
            for start in range(0, len(line), _MAX_LINE_CHARS):
                piece = line[start:start + _MAX_LINE_CHARS]
                if piece.strip():
                    yield piece


def sample_lines(texts: Iterable[str], *, max_chars: int, seed: int = 0) -> list[str]:
    """A deterministic sample of the texts' lines, at most ~max_chars characters, in bounded memory.

    Bottom-k sampling by a keyed hash of each line: the lines with the smallest hashes are kept (a spread
    over the whole corpus, not its first max_chars), and memory stays under max_chars plus one line.
    """
    heap: list[tuple[int, str]] = []  # max-heap on the hash (heapq is a min-heap: keys are negated)
    total = 0
    for line in _lines(texts):
        key = -_fingerprint(line, seed)
        if total + len(line) <= max_chars:
            heapq.heappush(heap, (key, line))
            total += len(line)
        elif heap and key > heap[0][0]:  # a smaller hash than the largest kept one: swap them
            total += len(line) - len(heap[0][1])
            heapq.heapreplace(heap, (key, line))
            while total > max_chars and len(heap) > 1:
                total -= len(heapq.heappop(heap)[1])
    return [line for _, line in sorted(heap, reverse=True)]


def train_tokenizer(texts: Iterable[str], *, model_type: str = "bpe", vocab_size: int = 8000,
                    sample_chars: int = 20_000_000, seed: int = 0, threads: int = 1) -> SubwordTokenizer:
    """Train a round-trip-exact SentencePiece model (see the module docstring) on a sample of `texts`."""
    if model_type not in MODEL_TYPES:
        raise DataError(f"tokenizer type {model_type!r} is unknown; use one of {', '.join(MODEL_TYPES)}")
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise DataError(f"--vocab-size {vocab_size}: must be between {MIN_VOCAB} (special ids, 256 bytes and "
                        f"a few pieces) and {MAX_VOCAB}")
    lines = sample_lines(texts, max_chars=sample_chars, seed=seed)
    if not lines:
        raise DataError("no text to train a tokenizer on (no training documents, or all of them empty)")
    out = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="strata-spm-") as tmp:
        norm, denorm = Path(tmp, "normalize.tsv"), Path(tmp, "denormalize.tsv")
        norm.write_text(_NORMALIZE)
        denorm.write_text(_DENORMALIZE)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=out, model_type=model_type, vocab_size=vocab_size,
                byte_fallback=True, normalization_rule_tsv=str(norm), denormalization_rule_tsv=str(denorm),
                remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
                split_digits=True, user_defined_symbols=["\n", "\t"], character_coverage=0.9995,
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOD_ID, input_sentence_size=0,
                shuffle_input_sentence=False, minloglevel=2,
                num_threads=_UNIGRAM_THREADS if model_type == "unigram" else max(1, threads))
        except RuntimeError as err:
            too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", str(err))
            if too_high:
                raise DataError(f"--vocab-size {too_high[1]} is too large for this corpus's sample (at most "
                                f"{too_high[2]}); lower --vocab-size or give more text") from None
            too_low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(err))
            if too_low:
                raise DataError(f"--vocab-size {too_low[1]} is too small for the distinct characters of this corpus "
                                f"(needs at least {too_low[2]}); raise --vocab-size") from None
            raise DataError(f"training the tokenizer failed: {_first_line(err)}") from None
    return SubwordTokenizer(_reproducible(out.getvalue()), name=f"{model_type} tokenizer")


def _reproducible(model: bytes) -> bytes:
    """The model without what varies between runs but not its behaviour (the rule files' temporary paths,
    the thread count), so the same sample and options give the same bytes and the same sha256."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    proto.trainer_spec.ClearField("num_threads")
    proto.normalizer_spec.ClearField("normalization_rule_tsv")
    proto.denormalizer_spec.ClearField("normalization_rule_tsv")
    return proto.SerializeToString(deterministic=True)
