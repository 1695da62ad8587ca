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
from pathlib import Path

import numpy as np

from typing import TYPE_CHECKING

from trainer.data.readers import read_examples, read_tfds
from trainer.data.tokenizer import Vocabulary
from trainer.errors import DataError

if TYPE_CHECKING:
    from trainer.config import DataConfig
    from trainer.tasks import Task
# Seed of the deterministic validation carve from a train file. Fixed (not data.builtin.seed) so that
# changing the built-in corpus seed never silently reshuffles a user's own validation set.
CARVE_SEED = 0


@dataclass(frozen=True)
class LabelSet:
    """The classes of a classification dataset: how many, and their names when the files named them.

    Two classes train the binary head (one sigmoid unit), more a K-way softmax. Derived from the training
    file's labels (`label_set`) and saved with the run (labels.json), so a trained model is rebuilt with
    the same K and its answers carry the same names.
    """

    num_classes: int = 2
    names: tuple[str, ...] | None = None  # names[i] is class i; None: the files gave ids

    def name(self, class_id: int) -> str:
        """What users read for a class: its name, else its id."""
        return self.names[class_id] if self.names else str(class_id)

    def to_json(self) -> dict:
        return {"num_classes": self.num_classes, "names": list(self.names) if self.names else None}

    @classmethod
    def from_json(cls, raw: dict) -> "LabelSet":
        names = raw.get("names")
        return cls(int(raw["num_classes"]), tuple(names) if names else None)


BINARY = LabelSet()


@dataclass
class Splits:
    """Example dicts per split (labels already class ids), where each came from, and the label set.

    `test` is None when there is no test split (a file source without data.test_path): it is never
    replaced by the validation split, so no metric can be reported under the wrong name.
    """

    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    test: list[dict] | None = field(default_factory=list)
    origin: dict[str, str] = field(default_factory=dict)  # split -> where its examples came from
    labels: LabelSet | None = None  # classification only
    note: str = ""  # what else the start-up line should say about the data


def derive_seed(seed: int, split: str) -> int:
    """An independent 63-bit seed per split (hash-derived, so no split's stream is a shifted copy of another's)."""
    digest = hashlib.sha256(f"strata:{seed}:{split}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


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


def load_splits(data_cfg: DataConfig, task: Task, *, verify: bool = False) -> Splits:
    """Examples of the train, validation and test splits of `data_cfg.source`.

    * builtin: generated from `data_cfg.builtin`, each split with its own seed derived from
      `builtin.seed` (`derive_seed`), so val/test never replay the train generator's stream.
    * jsonl/csv/tsv: read `train_path`, plus `val_path`/`test_path` when given. A missing validation
      split is carved from train (`val_fraction` of it, deterministic seeded shuffle); a missing test
      split stays missing (`Splits.test` is None: evaluating "test" is refused, see `check_split`).
    * tfds: the dataset's "train", "validation" and "test" splits from the local `tfds_data_dir`.

    * prepared: no examples in memory: the directory is checked (trainer/data/prepared.py; shard
      checksums too with `verify`) and described in the note.

    A labelled task's labels are checked across the files and turned into class ids (`label_set`).
    """
    source = data_cfg.source
    if source == "prepared":
        from trainer.data.prepared import check_prepared

        directory, note = check_prepared(data_cfg, verify=verify)  # streamed later: no examples in memory
        return Splits(train=[], val=[], test=None, origin={"prepared": directory}, note=note)
    if source == "builtin":
        return _builtin_splits(data_cfg, task)
    if source in ("jsonl", "csv", "tsv"):
        return _file_splits(data_cfg, task)
    if source == "tfds":
        if not task.reads_tfds:
            raise DataError("data.source tfds is supported for the summarizers only; use jsonl/csv/tsv or builtin")
        assert data_cfg.tfds_name and data_cfg.tfds_data_dir

        def read(split: str) -> list[dict]:
            return read_tfds(data_cfg.tfds_name, data_cfg.tfds_data_dir, split,  # type: ignore[arg-type]
                             data_cfg.tfds_text_key, data_cfg.tfds_summary_key)

        where = f"TFDS {data_cfg.tfds_name}"
        return Splits(train=read("train"), val=read("validation"), test=read("test"),
                      origin={"train": f"{where} train", "val": f"{where} validation", "test": f"{where} test"})
    raise ValueError(f"unknown data source {source!r}")


def _builtin_splits(data_cfg: DataConfig, task: Task) -> Splits:
    b = data_cfg.builtin
    origin = {"train": f"built-in, data.builtin.seed {b.seed}", "val": "built-in, own seed",
              "test": "built-in, own seed"}

    def make(n: int, split: str) -> list[dict]:
        return task.builtin_examples(b, n, derive_seed(b.seed, split))

    return Splits(train=make(b.train_examples, "train"), val=make(b.val_examples, "val"),
                  test=make(b.test_examples, "test"), origin=origin, labels=BINARY if task.labelled else None,
                  note=task.builtin_note(b))


def _file_splits(data_cfg: DataConfig, task: Task) -> Splits:
    fmt = data_cfg.source
    train_path = data_cfg.train_path
    assert train_path  # guaranteed by DataConfig's validator
    train = read_examples(train_path, fmt, task)  # type: ignore[arg-type]
    labels = label_set(train, train_path) if task.labelled else None
    named = Path(train_path).name
    origin = {"train": named}
    if data_cfg.val_path:
        val = read_examples(data_cfg.val_path, fmt, task)  # type: ignore[arg-type]
        origin["val"] = Path(data_cfg.val_path).name
    else:
        n = len(train)
        train, val = carve(train, data_cfg.val_fraction, source=train_path)
        origin["train"] = f"{named}, {len(train) / n:.0%} after carving val"
        origin["val"] = f"carved {data_cfg.val_fraction:.0%} from {named}, data.val_fraction"
    test = None
    if data_cfg.test_path:
        test = read_examples(data_cfg.test_path, fmt, task)  # type: ignore[arg-type]
        origin["test"] = Path(data_cfg.test_path).name
    splits = Splits(train=train, val=val, test=test, origin=origin, labels=labels)
    if labels is not None:
        paths = {"train": train_path, "val": data_cfg.val_path or train_path, "test": data_cfg.test_path}
        for name in ("train", "val", "test"):
            examples = getattr(splits, name)
            if examples is not None:
                setattr(splits, name, to_class_ids(examples, labels, paths[name] or name))
    return splits


def label_set(examples: list[dict], source: str) -> LabelSet:
    """The classes of a training file: ids 0..max (at least 2: binary), or its sorted distinct names."""
    ids = [e["label"] for e in examples if isinstance(e["label"], int)]
    names = sorted({e["label"] for e in examples if isinstance(e["label"], str)})
    if ids and names:
        raise DataError(f"{source}: labels mix class ids (e.g. {ids[0]}) and class names (e.g. {names[0]!r}); "
                        "use ids 0, 1, 2, ... or names throughout")
    if names:
        if len(names) < 2:
            raise DataError(f"{source}: every label is {names[0]!r}; a classifier needs at least two classes")
        return LabelSet(len(names), tuple(names))
    return LabelSet(max(2, max(ids) + 1))


def to_class_ids(examples: list[dict], labels: LabelSet, source: str) -> list[dict]:
    """Examples with their labels as class ids of `labels`; a class the training file lacks is an error."""
    index = {name: i for i, name in enumerate(labels.names)} if labels.names else None
    out = []
    for e in examples:
        raw = e["label"]
        known = (raw in index) if index is not None else (isinstance(raw, int) and raw < labels.num_classes)
        if not known:
            classes = ", ".join(map(repr, labels.names)) if labels.names else f"0..{labels.num_classes - 1}"
            raise DataError(f"{source}: label {raw!r} is not a class of the training file (classes: {classes}); "
                            "fix the label or add examples of that class to the training file")
        out.append({**e, "label": index[raw] if index is not None else raw})
    return out


def describe_splits(splits: Splits) -> str:
    """The start-up line's data facts: examples per split and where each came from."""
    if "prepared" in splits.origin:  # streamed token shards: no examples in memory, the note says it all
        return "data: " + splits.note
    parts = [f"{name} {len(examples)} ({splits.origin.get(name, '?')})"
             for name in ("train", "val", "test") if (examples := getattr(splits, name)) is not None]
    if splits.test is None:
        parts.append("test none (no data.test_path: `strata evaluate --split test` is refused)")
    if splits.labels is not None:
        names = f": {', '.join(splits.labels.names)}" if splits.labels.names else ""
        parts.append(f"{splits.labels.num_classes} classes{names}")
    return "data: " + ", ".join(parts) + (f"; {splits.note}" if splits.note else "")


def check_split(data_cfg: DataConfig, split: str, run_dir: str) -> None:
    """Refuse to evaluate a split the run does not have (only `test`, when no test file was given)."""
    if split == "test" and data_cfg.source == "prepared":
        raise DataError(f"{run_dir}: prepared data has train and val splits only; evaluate with --split val")
    if split == "test" and data_cfg.source in ("jsonl", "csv", "tsv") and not data_cfg.test_path:
        raise DataError(
            f"{run_dir}: this run has no test split (trained without data.test_path), and validation scores are "
            f"never reported as test scores; evaluate with --split val, or add test_path: FILE under data: "
            f"in {run_dir}/config.yaml")


def training_texts(splits: Splits, task: Task) -> list[str]:
    """Texts the vocabulary is built from: the train split only (the task says which fields)."""
    return task.training_texts(splits.train)


def encode_examples(examples: list[dict], vocab: Vocabulary, data_cfg: DataConfig, task: Task,
                    num_classes: int = 2) -> dict[str, np.ndarray]:
    """Arrays of one split (see `encode_splits`)."""
    return task.encode(examples, vocab, data_cfg, num_classes)


def encode_splits(splits: Splits, vocab: Vocabulary, data_cfg: DataConfig,
                  task: Task) -> dict[str, dict[str, np.ndarray]]:
    """`{"train"|"val"|"test": arrays}` (no "test" when the run has no test split); each task's `encode`
    says which arrays, e.g. classification `tokens` and `label`, summarization `document`, `summary_in`
    and `summary_out`."""
    k = splits.labels.num_classes if splits.labels else 2
    return {name: encode_examples(examples, vocab, data_cfg, task, k)
            for name in ("train", "val", "test") if (examples := getattr(splits, name)) is not None}
