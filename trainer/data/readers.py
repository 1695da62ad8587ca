"""Reading users' examples: JSONL, CSV/TSV files and (lazily) TensorFlow Datasets.

Every problem is a `DataError` whose message is ONE line naming the file, the line number where one
applies, what is wrong and how to fix it, e.g.

    data/train.jsonl:12: missing key 'label'; each line needs keys text, label

Errors are raised `from None`: the user needs the file and line, not our stack. Blank lines are skipped.
This module must not import TensorFlow (tensorflow_datasets is imported only by `read_tfds`).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from trainer.errors import DataError

if TYPE_CHECKING:
    from trainer.tasks import Task

Format = Literal["jsonl", "csv", "tsv"]
_TRUE, _FALSE = ("1", "true"), ("0", "false")


def _error(message: str) -> DataError:
    """A DataError guaranteed to be one line (values from the file may contain line breaks)."""
    return DataError(" ".join(message.splitlines()))


def _read_text(path: str) -> str:
    """The file's text; missing, directory, non-UTF-8 (with its line) and empty files are errors."""
    p = Path(path)
    if p.is_dir():
        raise _error(f"{path}: is a directory, not a file; point at the examples file inside it")
    if not p.is_file():
        raise _error(f"{path}: file not found; check the data path in the config (relative paths are "
                        "resolved from the working directory)")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # spreadsheet tools may write a BOM
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise _error(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); "
                        "re-save the file as UTF-8") from None
    if not text.strip():
        raise _error(f"{path}: file is empty; it needs at least one example")
    return text


def _label(value: Any, where: str) -> int | str:
    """A class id (int >= 0) or a class name (str).

    Ids: 0, 1, 2, ... also written as strings ("2"); true/false (any case) are 1/0. Any other non-empty
    string is a class name (mapped to an id for the whole dataset by `splits.label_set`).
    """
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.strip():
        text = value.strip()
        if text.lower() in _TRUE + _FALSE:
            return int(text.lower() in _TRUE)
        return int(text) if text.isascii() and text.isdigit() else text
    raise _error(f"{where}: label {value!r} is invalid; labels must be class ids 0, 1, 2, ... "
                 "(or true/false) or class names (strings)")


def _example(record: dict, task: Task, where: str) -> dict:
    """Validate one record (keys already present) into a clean example dict."""
    out: dict[str, Any] = {}
    for key in (k for k in task.record_keys if k != task.label_key):
        value = record[key]
        if not isinstance(value, str):
            raise _error(f"{where}: {key!r} must be a string, got {type(value).__name__}; quote the value")
        if not value.strip():
            raise _error(f"{where}: {key!r} is empty; remove the example or fill in its {key}")
        out[key] = value
    if task.label_key is not None:
        out[task.label_key] = _label(record[task.label_key], where)
    return out


def _read_jsonl(path: str, text: str, task: Task) -> list[dict]:
    keys = task.record_keys
    expected = "{" + ", ".join(f'"{k}": ...' for k in keys) + "}"
    examples = []
    # Split on "\n" only: str.splitlines would also split on U+2028 etc., which JSON strings may contain.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise _error(f"{where}: malformed JSON ({e.msg} at column {e.colno}); "
                            f"each line must be one object like {expected}") from None
        if not isinstance(record, dict):
            raise _error(f"{where}: expected a JSON object like {expected}, got {type(record).__name__}")
        for key in keys:
            if key not in record:
                raise _error(f"{where}: missing key {key!r}; each line needs keys {', '.join(keys)}")
        examples.append(_example(record, task, where))
    return examples


def _read_delimited(path: str, text: str, task: Task, delimiter: str) -> list[dict]:
    keys = task.record_keys
    kind = "TSV" if delimiter == "\t" else "CSV"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
        while not any(h.strip() for h in header):  # leading blank lines
            header = next(reader)
    except StopIteration:
        raise _error(f"{path}: file is empty; it needs a header row and at least one example") from None
    except csv.Error as e:
        raise _error(f"{path}:{reader.line_num}: malformed {kind} ({e}); fix the quoting") from None
    header = [h.strip() for h in header]
    missing = [k for k in keys if k not in header]
    other = "\t" if delimiter == "," else ","
    if missing and len(header) == 1 and all(k in [h.strip() for h in header[0].split(other)] for k in keys):
        # The header names the right columns, split by the other delimiter: the source is wrong, not the file.
        fmt, name = ("tsv", "tab") if other == "\t" else ("csv", "comma")
        raise _error(f"{path}:{reader.line_num}: this file is {name}-separated (its header splits on {name}s "
                     f"into {', '.join(keys)}) but data.source is {kind.lower()}; set data.source={fmt}")
    if missing:
        got = ", ".join(header)
        raise _error(f"{path}:{reader.line_num}: header has columns [{got}] but needs {', '.join(keys)} "
                        f"(missing {', '.join(missing)}); make the first row '{delimiter.join(keys)}'"
                        .replace("\t", "\\t"))
    index = {k: header.index(k) for k in keys}
    examples = []
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            where = f"{path}:{reader.line_num}"
            if len(row) != len(header):
                raise _error(f"{where}: expected {len(header)} fields ({', '.join(header)}), got {len(row)}; "
                                f"quote values that contain the delimiter")
            examples.append(_example({k: row[i] for k, i in index.items()}, task, where))
    except csv.Error as e:
        raise _error(f"{path}:{reader.line_num}: malformed {kind} ({e}); fix the quoting") from None
    return examples


def read_examples(path: str, fmt: Format, task: Task) -> list[dict]:
    """Examples from a user's file, with the task's `record_keys` (the keys, in JSONL, or header columns, in
    CSV/TSV, an example needs, in the order shown in messages).

    classification: `{"text": str, "label": int | str}`; summarization: `{"document": str, "summary": str}`.
    JSONL has one object per line; CSV/TSV have a header row naming those columns (extras are ignored).
    Labels are class ids (0, 1, 2, ..., "2", true/false) or class names (any other string); `load_splits`
    checks them across files and maps names to ids. Raises DataError (one line, with file:line).
    """
    if fmt not in ("jsonl", "csv", "tsv"):
        raise ValueError(f"unknown format {fmt!r}")
    text = _read_text(path)
    if fmt == "jsonl":
        examples = _read_jsonl(path, text, task)
    else:
        examples = _read_delimited(path, text, task, "," if fmt == "csv" else "\t")
    if not examples:
        raise _error(f"{path}: no examples (only blank lines or a header); add at least one example")
    return examples


def read_tfds(name: str, data_dir: str, split: str, text_key: str, summary_key: str) -> list[dict]:
    """`{"document", "summary"}` examples of a TensorFlow Datasets split already prepared in `data_dir`.

    Nothing is downloaded (download=False): prepare the dataset beforehand, e.g. on a login node,
    with `tfds build <name> --data_dir <data_dir>`.
    """
    try:
        import tensorflow_datasets as tfds  # heavy and optional: only this source needs it
    except ImportError:
        raise _error(f"data.source tfds ({name}) needs TensorFlow Datasets; "
                        "pip install tensorflow-datasets") from None
    try:
        dataset = tfds.load(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types (AssertionError, DatasetNotFoundError, ...)
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _error(f"{data_dir}: TFDS dataset {name!r} split {split!r} not available ({detail}); "
                        f"prepare it with `tfds build {name} --data_dir {data_dir}`") from None
    examples = []
    for i, record in enumerate(tfds.as_numpy(dataset)):
        for key in (text_key, summary_key):
            if key not in record:
                raise _error(f"{name}[{split}] example {i}: no feature {key!r} (has {', '.join(sorted(record))}); "
                                "set data.tfds_text_key / data.tfds_summary_key")
        document, summary = (_as_str(record[k]) for k in (text_key, summary_key))
        if document.strip() and summary.strip():  # public datasets contain a few empty rows: skip them
            examples.append({"document": document, "summary": summary})
    if not examples:
        raise _error(f"{name}[{split}] in {data_dir}: no examples; check the dataset was prepared fully")
    return examples


def _as_str(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
