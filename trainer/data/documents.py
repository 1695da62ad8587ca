"""Documents for `strata data prepare`: streamed from JSONL / CSV / TSV / plain-text files and folders.

Unlike `readers.py` (which loads a task's examples whole), everything here streams: memory does not grow
with the corpus. The order of documents is fixed (sources in the order given, folders walked in sorted
order, records in file order), so preparing twice gives the same data.

- JSONL (`.jsonl`, `.json`): one object per line; the text is the given field(s).
- CSV / TSV (`.csv`, `.tsv`): a header row naming the columns; the text is the given column(s).
- Anything else is plain UTF-8 text: one document per paragraph (lines up to a blank line), per line, or
  per file (`text_docs`).
Several fields are joined by a blank line (e.g. document, then summary). Empty documents are skipped.
Every problem is a one-line DataError naming the file (and line). No TensorFlow here.
"""
from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import DataError

TEXT_DOCS = ("paragraph", "line", "file")
FIELD_JOIN = "\n\n"
_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}


@dataclass(frozen=True)
class Source:
    """One input file: its path and how it is read."""

    path: Path
    kind: str  # jsonl | csv | tsv | text


def _one_line(message: str) -> DataError:
    return DataError(" ".join(message.splitlines()))


def list_sources(inputs: list[str]) -> list[Source]:
    """The files behind the given paths (folders walked recursively in sorted order, hidden files skipped)."""
    sources: list[Source] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            files = sorted((p for p in path.rglob("*") if p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                           key=lambda p: p.relative_to(path).as_posix())
            tfds = next((p.parent for p in files if p.name == "dataset_info.json"), None)
            if tfds is not None:
                raise DataError(f"{tfds}: a TensorFlow Datasets directory; reading TFDS needs tensorflow-datasets, "
                                "which is not installed: export the split to JSONL and prepare that")
            if not files:
                raise DataError(f"{given}: folder has no files; point --input at text, JSONL, CSV or TSV files")
        elif path.is_file():
            files = [path]
        else:
            raise DataError(f"{given}: no such file or folder; check the input path")
        sources += [Source(f, _KINDS.get(f.suffix.lower(), "text")) for f in files]
    return sources


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """The file's sha256, read in chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line, line endings kept; invalid UTF-8 is an error naming the line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _one_line(f"{path}:{number}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); "
                                "re-save the file as UTF-8") from None
            yield number, line.removeprefix("\ufeff") if number == 1 else line


def _join(values: list[str]) -> str:
    return FIELD_JOIN.join(v for v in values if v)


def _jsonl(path: Path, fields: list[str]) -> Iterator[str]:
    for number, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise _one_line(f"{path}:{number}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise _one_line(f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}")
        values = []
        for field in fields:
            if field not in record:
                raise _one_line(f"{path}:{number}: missing key {field!r} (keys here: {', '.join(sorted(record))}); "
                                "choose the text with --field NAME")
            if not isinstance(record[field], str):
                raise _one_line(f"{path}:{number}: {field!r} must be a string, got {type(record[field]).__name__}")
            values.append(record[field])
        yield _join(values)


def _table(path: Path, fields: list[str], delimiter: str) -> Iterator[str]:
    reader = csv.reader((line for _, line in _decoded_lines(path)), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return
        missing = [f for f in fields if f not in header]
        if missing:
            raise _one_line(f"{path}:1: no column {missing[0]!r} in the header ({', '.join(header)}); "
                            "choose the text with --field NAME")
        columns = [header.index(f) for f in fields]
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise _one_line(f"{path}:{reader.line_num}: {len(row)} columns, the header has {len(header)}")
            yield _join([row[c] for c in columns])
    except csv.Error as e:
        kind = "TSV" if delimiter == "\t" else "CSV"
        raise _one_line(f"{path}:{reader.line_num}: malformed {kind} ({e})") from None


def _text(path: Path, text_docs: str) -> Iterator[str]:
    """Plain text split into documents: per paragraph, per line or the whole file."""
    block: list[str] = []
    for _, line in _decoded_lines(path):
        if text_docs == "line":
            yield line.rstrip("\r\n")
        elif text_docs == "paragraph" and not line.strip():
            if block:
                yield "".join(block).rstrip("\r\n")
            block = []
        else:
            block.append(line)
    if block:
        yield "".join(block) if text_docs == "file" else "".join(block).rstrip("\r\n")


def iter_documents(sources: list[Source], *, fields: list[str], text_docs: str = "paragraph") -> Iterator[str]:
    """Every non-empty document of the sources, in order."""
    if text_docs not in TEXT_DOCS:
        raise DataError(f"--text-docs {text_docs!r}: use one of {', '.join(TEXT_DOCS)}")
    for source in sources:
        if source.kind == "jsonl":
            docs = _jsonl(source.path, fields)
        elif source.kind in ("csv", "tsv"):
            docs = _table(source.path, fields, "," if source.kind == "csv" else "\t")
        else:
            docs = _text(source.path, text_docs)
        for doc in docs:
            if doc.strip():
                yield doc
