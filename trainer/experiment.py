"""Assembling a run: data, vocabulary, run directory, model, optimizer, checkpoint.

Order matters for "nothing half written": every check that can fail on user input (config, data files,
an incompatible existing run directory) happens before the run directory is created.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
import yaml

from launch.contract import CHECKPOINT_DIR, RUN_CONFIG_FILE
from trainer.checkpoint import Checkpointer, random_state
from trainer.config import ExperimentConfig
from trainer.data.prepared import PreparedInput
from trainer.data.subword_vocab import SubwordVocabulary
from trainer.data.splits import BINARY, LabelSet, Splits, encode_splits, load_splits, training_texts
from trainer.data.tokenizer import Vocabulary
from trainer.errors import ConfigError, StorageError
from trainer.models import LevelModel
from trainer.parallel.layout import Layout
from trainer.resume import check_frozen
from trainer.strategy import replica_layout
from trainer.strategy.base import Strategy
from trainer.strategy.engine import GradientEngine
from trainer.strategy.replica import build_replica
from trainer.tasks import Task, build_model

VOCAB_FILE = "vocab.json"
LABELS_FILE = "labels.json"  # a labelled task's number of classes and their names (absent in older runs: binary)


@dataclass
class Experiment:
    cfg: ExperimentConfig
    run_dir: Path
    splits: Splits
    vocab: Vocabulary
    arrays: dict[str, dict[str, np.ndarray]]  # split -> feature -> array
    model: LevelModel
    optimizer: keras.optimizers.Optimizer
    checkpointer: Checkpointer
    layout: Layout  # how the batch and the model split over replicas, stages and micro-steps
    engine: GradientEngine  # one replica's loss and gradients (accumulating, or pipelined over stages)
    labels: LabelSet = BINARY  # a labelled task's classes, which the model was built for
    prepared: PreparedInput | None = None  # data.source prepared: the streamed input (arrays: examples only)

    @property
    def task(self) -> Task:
        return self.cfg.task


def configure_runtime(cfg: ExperimentConfig) -> None:
    """Seeds, determinism and numeric policy: before any model variable exists."""
    keras.utils.set_random_seed(cfg.seed)
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    policy = {"off": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
    keras.mixed_precision.set_global_policy(policy[cfg.train.mixed_precision])


def check_resume_compatible(cfg: ExperimentConfig, run_dir: Path) -> None:
    """Refuse to resume a run directory that was trained with a different model, data or seed (also checked
    before TensorFlow loads, by trainer/resume.py; kept here for callers of `prepare` that skip that)."""
    saved_file = run_dir / RUN_CONFIG_FILE
    if saved_file.is_file():
        check_frozen(yaml.safe_load(saved_file.read_text(encoding="utf-8")), cfg.model_dump(mode="json"), run_dir)


def ensure_writable(run_dir: Path) -> None:
    """Refuse a run directory that cannot be created or written, before anything is written.

    Permission bits are not enough (root ignores them, a read-only mount does not show in them), so this
    creates and removes a probe file in the nearest directory that exists.
    """
    existing = _nearest_existing(run_dir)
    if not existing.is_dir():
        raise StorageError(f"{run_dir}: cannot create the run directory: {existing} is a file, not a directory; "
                           "choose another run_dir")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise StorageError(f"{run_dir}: cannot write here ({existing}: {err.strerror}); choose another run_dir") from None


def _nearest_existing(path: Path) -> Path:
    return next((p for p in [path, *path.parents] if p.exists()), Path("."))


def checkpoint_bytes(variables) -> int:
    """Bytes of one checkpoint of `variables` (their values; TensorFlow's index adds a little)."""
    return sum(tf.as_dtype(v.dtype).size * int(np.prod(v.shape)) for v in variables)


def check_free_space(run_dir: Path, *, per_checkpoint: int, keep: int) -> None:
    """Refuse to start a run whose checkpoints cannot fit on the disk of its run directory.

    A save writes the new checkpoint before deleting the oldest, so keep + 1 must fit; space the run's
    existing checkpoints already take is counted as available (resuming replaces them).
    """
    checkpoints = run_dir / CHECKPOINT_DIR
    used = sum(f.stat().st_size for f in checkpoints.iterdir() if f.is_file()) if checkpoints.is_dir() else 0
    needed = (keep + 1) * (per_checkpoint + per_checkpoint // 20 + (64 << 10)) - used  # 5% + 64 KiB margin
    existing = _nearest_existing(run_dir)
    free = shutil.disk_usage(existing).free
    if needed > free:
        mib = 1 << 20
        raise StorageError(
            f"{run_dir}: not enough disk space for checkpoints: {keep + 1} x {per_checkpoint / mib:.2f} MiB "
            f"(checkpoint.keep + 1) need {needed / mib:.2f} MiB, {existing} has {free / mib:.2f} MiB free; "
            "free space, lower checkpoint.keep, or set checkpoint.check_free_space=false")


def run_labels(cfg: ExperimentConfig, run_dir: Path, splits: Splits) -> LabelSet:
    """The classes of a run: those saved with it (labels.json), else the training data's.

    A saved set that differs from the data's means the data files changed under a trained model: refused,
    since its outputs would be read against the wrong classes."""
    derived = splits.labels or BINARY
    path = run_dir / LABELS_FILE
    if not cfg.task.labelled or not path.is_file():
        return derived
    try:
        saved = LabelSet.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: corrupt ({type(err).__name__}); restore it from the run directory or retrain") from None
    if saved != derived:
        raise ConfigError(f"{run_dir}: the model was trained for {saved.num_classes} classes "
                          f"{list(saved.names or range(saved.num_classes))}, the data now has {derived.num_classes} "
                          f"{list(derived.names or range(derived.num_classes))}; use the original data files or "
                          "start a new run with --set run_dir=<new dir>")
    return saved


def write_run_files(cfg: ExperimentConfig, run_dir: Path, vocab: Vocabulary, labels: LabelSet | None = None) -> None:
    """Create the run directory with its resolved config, vocabulary and (classification) classes; a full
    disk is a one-line error."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_CONFIG_FILE).write_text(cfg.to_yaml(), encoding="utf-8")
        vocab_file = run_dir / getattr(vocab, "file_name", VOCAB_FILE)  # tokenizer.model for a subword one
        if not vocab_file.is_file():
            vocab.save(vocab_file)
        if labels is not None and not (run_dir / LABELS_FILE).is_file():
            (run_dir / LABELS_FILE).write_text(json.dumps(labels.to_json()) + "\n", encoding="utf-8")
    except OSError as err:
        raise StorageError(f"{run_dir}: cannot write the run directory ({err.strerror}); "
                           "free space or choose another run_dir") from None


def prepare(cfg: ExperimentConfig, strategy: Strategy, *, training: bool, splits: Splits | None = None) -> Experiment:
    """Build everything a run needs; create the run directory only once every input check passed.

    Training lays the model out over the strategy's replicas as the config says (a pipeline included);
    evaluation and serving (`training=False`) run the whole model on one device."""
    run_dir = cfg.resolved_run_dir()
    layout = replica_layout(cfg, strategy.num_replicas, training=training)
    if training:
        check_resume_compatible(cfg, run_dir)
        ensure_writable(run_dir)
    splits = splits or load_splits(cfg.data, cfg.task)
    prepared, arrays, vocab = _inputs(cfg, run_dir, splits, training=training)
    labels = run_labels(cfg, run_dir, splits)

    def new_model() -> LevelModel:
        return build_model(cfg.model, vocab_size=vocab.size, max_len=model_len(cfg),
                           summary_len=cfg.data.summary_len, num_classes=labels.num_classes)

    replica = build_replica(cfg, layout, strategy, new_model, arrays["train"])
    model, optimizer = replica.model, replica.optimizer
    rng = random_state(model)
    if training and strategy.is_chief:  # the run directory appears only now that every check has passed
        if cfg.checkpoint.check_free_space:
            # ZeRO: this rank's optimizer holds 1/N of the checkpoint's optimizer state
            shards = strategy.world_size if strategy.zero_state is not None else 1
            per_checkpoint = (checkpoint_bytes([*model.variables, *rng.states])
                              + shards * checkpoint_bytes(optimizer.variables))
            check_free_space(run_dir, per_checkpoint=per_checkpoint, keep=cfg.checkpoint.keep)
        write_run_files(cfg, run_dir, vocab, labels if cfg.task.labelled else None)
    checkpointer = Checkpointer(run_dir / CHECKPOINT_DIR, keep=cfg.checkpoint.keep,
                                write=training and strategy.is_chief, sharded=strategy.zero_state if training else None,
                                model=model, optimizer=optimizer, rng=rng)
    return Experiment(cfg, run_dir, splits, vocab, arrays, model, optimizer, checkpointer, layout, replica.engine,
                      labels, prepared)


def model_len(cfg: ExperimentConfig) -> int:
    """The sequence length a model is built for: data.seq_len on prepared data, else data.max_len."""
    return cfg.data.model_len


def _inputs(cfg: ExperimentConfig, run_dir: Path, splits: Splits, *, training: bool):
    """(prepared input or None, arrays per split, vocabulary). Prepared data streams: its arrays are only the
    first batch's rows (to build the model on) and its vocabulary the data's tokenizer."""
    if cfg.data.source == "prepared":
        prepared = PreparedInput(cfg.data, seed=cfg.seed)
        return prepared, {"train": prepared.example_arrays()}, prepared.tokenizer_for(run_dir)
    vocab = _vocabulary(cfg, run_dir, splits, training=training)
    arrays = encode_splits(splits, vocab, cfg.data, cfg.task)
    if training and len(arrays["train"][next(iter(arrays["train"]))]) < cfg.data.batch_size:
        n = len(splits.train)
        raise ConfigError(f"data.batch_size ({cfg.data.batch_size}) exceeds the {n} training examples; lower it")
    return None, arrays, vocab


def _vocabulary(cfg: ExperimentConfig, run_dir: Path, splits: Splits, *, training: bool) -> Vocabulary:
    """The run's saved vocabulary (or subword tokenizer), else (training) a new one (`new_vocabulary`)."""
    subword = cfg.data.tokenizer not in (None, "word")
    saved = run_dir / (SubwordVocabulary.file_name if subword else VOCAB_FILE)
    if saved.is_file():
        return SubwordVocabulary.load(saved) if subword else Vocabulary.load(saved)
    if training:
        return new_vocabulary(cfg, splits)
    raise ConfigError(f"{run_dir}: no {saved.name}; was this run trained to completion of its first step?")


def new_vocabulary(cfg: ExperimentConfig, splits: Splits):
    """data.tokenizer's vocabulary for a new run: words, or a SentencePiece model trained on the training
    texts (bpe, unigram: data.vocab_size pieces, byte fallback) or read from a .model file."""
    tokenizer, texts = cfg.data.tokenizer, training_texts(splits, cfg.task)
    if tokenizer in (None, "word"):
        return Vocabulary.build(texts, cfg.data.vocab_size)
    if tokenizer.endswith(".model"):
        return SubwordVocabulary.load(tokenizer)
    from trainer.data.subword import train_tokenizer

    return SubwordVocabulary(train_tokenizer(texts, model_type=tokenizer, vocab_size=cfg.data.vocab_size,
                                             seed=cfg.seed).model)
