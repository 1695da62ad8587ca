"""The experiment config: typed, validated, frozen.

An experiment is one YAML file plus optional `--set a.b=value` overrides. Everything is checked here,
before TensorFlow is imported, so a typo costs a second, not a GPU hour. Errors are `ConfigError`s with
a one-line message naming the dotted path and the fix.

This module must not import TensorFlow (the launcher validates configs through it in a subprocess).
"""
from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from launch.contract import RUN_CONFIG_FILE, run_dir_of
from trainer import tasks
from trainer.errors import ConfigError
from trainer.parallel.layout import config_layout


class SafeYaml12Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` (no tags, no code) whose booleans are YAML 1.2's: only true/false.

    YAML 1.1 also reads off/on/yes/no as booleans, so `mixed_precision: off` arrived as False and was
    refused; here they stay strings (pydantic still accepts "yes"/"no"/"on"/"off" for real bool fields).
    """


SafeYaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
SafeYaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def safe_load_yaml(text: str) -> Any:
    """Parse YAML safely (SafeLoader semantics) with YAML 1.2 booleans; what configs and --set values use."""
    return yaml.load(text, Loader=SafeYaml12Loader)  # noqa: S506 - a SafeLoader subclass


PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Probability = Annotated[float, Field(ge=0.0, lt=1.0)]


class _Strict(BaseModel):
    """Base for every section: unknown keys are errors, values are not coerced loosely, frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, validate_default=True)


# ----------------------------------------------------------------------------------------- model
class ClassifierModel(_Strict):
    """End-to-end classifier: Embedding -> GlobalAveragePooling1D -> Dense(relu) -> Dense(1, sigmoid)."""

    kind: Literal["classifier"] = "classifier"
    embed_dim: PositiveInt = 32
    hidden_dim: PositiveInt = 32
    dropout: Probability = 0.0

    def level_names(self) -> list[str]:
        """The model's levels in order (what pipeline stages are made of); must match the built model."""
        return ["embed", "pool", "hidden", "output"]


class SummarizerModel(_Strict):
    """Hierarchical seq2seq summarizer: embed -> encoder levels -> decoder -> attention -> output."""

    kind: Literal["summarizer"] = "summarizer"
    embed_dim: PositiveInt = 64
    hidden_dim: PositiveInt = 128
    encoder_layers: PositiveInt = 1
    dropout: Probability = 0.0

    def level_names(self) -> list[str]:
        """The model's levels in order (what pipeline stages are made of); must match the built model."""
        encoders = [f"encoder_{i}" for i in range(1, self.encoder_layers + 1)]
        return ["embed", *encoders, "decoder", "attention", "output"]


def _check_heads(d_model: int, num_heads: int) -> None:
    """Attention splits d_model over its heads: the width must divide (transformer and lm)."""
    if d_model % num_heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")


class TransformerModel(_Strict):
    """Transformer encoder-decoder summarizer; depth, width, heads and lengths scale by config."""

    kind: Literal["transformer"] = "transformer"
    d_model: PositiveInt = 64
    num_heads: PositiveInt = 4
    ff_dim: PositiveInt = 128
    encoder_layers: PositiveInt = 2
    decoder_layers: PositiveInt = 2
    dropout: Probability = 0.1

    def level_names(self) -> list[str]:
        """The model's levels in order (what pipeline stages are made of); must match the built model."""
        encoders = [f"encoder_block_{i}" for i in range(self.encoder_layers)]
        decoders = [f"decoder_block_{j}" for j in range(self.decoder_layers)]
        return ["embed", *encoders, *decoders, "output"]

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "TransformerModel":
        _check_heads(self.d_model, self.num_heads)
        return self


class LMModel(_Strict):
    """Decoder-only causal language model (trainer/models/lm.py): pre-norm blocks, rotary or learned
    positions, input and output embeddings tied (one matrix) unless tie_embeddings is false."""

    kind: Literal["lm"] = "lm"
    d_model: PositiveInt = 128
    num_heads: PositiveInt = 4
    ff_dim: PositiveInt = 512
    layers: PositiveInt = 2
    dropout: Probability = 0.0
    positions: Literal["rotary", "learned"] = "rotary"
    # One matrix for the input embedding and the output projection. A pipeline cuts `embed` and `head`
    # onto different stages, which cannot share a variable: such configs must set this to false.
    tie_embeddings: bool = True

    def level_names(self) -> list[str]:
        """The model's levels in order (what pipeline stages are made of); must match the built model."""
        return ["embed", *(f"block_{i}" for i in range(1, self.layers + 1)), "head"]

    def parameter_count(self, vocab_size: int, seq_len: int) -> int:
        """Trainable parameters of the built model (trainer/models/lm.py), counted without building it."""
        d, f = self.d_model, self.ff_dim
        block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * f + f) + (f * d + d)
        embed = vocab_size * d + (seq_len * d if self.positions == "learned" else 0)
        head = 2 * d + (0 if self.tie_embeddings else d * vocab_size)
        return embed + self.layers * block + head

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "LMModel":
        _check_heads(self.d_model, self.num_heads)
        if self.positions == "rotary" and (self.d_model // self.num_heads) % 2:
            raise ValueError(f"rotary positions need an even head width; d_model / num_heads is "
                             f"{self.d_model // self.num_heads}: change num_heads or set model.positions=learned")
        return self


# One section per model kind (trainer/tasks/ WORKLOADS registers what each learns and builds).
MODEL_SECTIONS = (ClassifierModel, SummarizerModel, TransformerModel, LMModel)
ModelConfig = Annotated[Union[MODEL_SECTIONS], Field(discriminator="kind")]


# ------------------------------------------------------------------------------------------ data
class BuiltinData(_Strict):
    """Sizes of the deterministic built-in corpus (generated, never downloaded)."""

    train_examples: PositiveInt = 4000
    val_examples: PositiveInt = 500
    test_examples: PositiveInt = 500
    seed: NonNegInt = 1234
    # Classification only: the fraction of labels flipped at random, whatever the text says, so the best
    # achievable accuracy is known, 1 - label_noise (trainer/data/corpora.py); 0 gives clean labels.
    label_noise: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.1


class DataConfig(_Strict):
    """Where examples come from and how they are tokenized and batched."""

    source: Literal["builtin", "jsonl", "csv", "tsv", "tfds", "prepared"] = "builtin"
    builtin: BuiltinData = BuiltinData()
    # Files for jsonl/csv/tsv. validation/test are optional: missing splits are carved from train.
    train_path: str | None = None
    val_path: str | None = None
    test_path: str | None = None
    # TensorFlow Datasets: a dataset name and a local data directory (no downloads at train time).
    tfds_name: str | None = None
    tfds_data_dir: str | None = None
    tfds_text_key: str = "article"
    tfds_summary_key: str = "highlights"
    # A prepared token-shard directory (`strata data prepare`), streamed without loading it (model kind lm).
    prepared_path: str | None = None
    seq_len: PositiveInt = 128  # prepared: tokens per training sequence
    # prepared: check every shard's sha256 before training (rank 0 only; `strata data verify` does the same).
    verify_shards: bool = True
    # word (default): the word vocabulary; bpe | unigram: a SentencePiece model (byte fallback: no character
    # is lost) trained on the training texts at the run's start, data.vocab_size pieces; or a .model file.
    # With source prepared: the .model the data must have been prepared with (default: the directory's own).
    tokenizer: str | None = None
    vocab_size: Annotated[int, Field(ge=8)] = 2000
    max_len: PositiveInt = 64  # tokens per text / document
    summary_len: PositiveInt = 16  # tokens per summary, including the start/end markers
    batch_size: PositiveInt = 32  # the GLOBAL batch: summed over all replicas
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1

    @property
    def model_len(self) -> int:
        """The sequence length a model is built for: seq_len on prepared data, else max_len."""
        return self.seq_len if self.source == "prepared" else self.max_len

    @model_validator(mode="after")
    def _paths_for_source(self) -> "DataConfig":
        if self.source in ("jsonl", "csv", "tsv") and not self.train_path:
            raise ValueError(f"source '{self.source}' needs data.train_path (a file of examples)")
        if self.source == "tfds" and not (self.tfds_name and self.tfds_data_dir):
            raise ValueError("source 'tfds' needs data.tfds_name and data.tfds_data_dir")
        if self.source == "prepared" and not self.prepared_path:
            raise ValueError("source 'prepared' needs data.prepared_path (a directory written by "
                             "`strata data prepare`)")
        self._check_tokenizer()
        if self.prepared_path and self.source != "prepared":
            raise ValueError(f"data.prepared_path is ignored with data.source {self.source}; set "
                             "data.source=prepared to read it, or remove data.prepared_path")
        # A setting the source never reads would be silently ignored: refuse it, naming both ways out.
        unread = [k for k in ("train_path", "val_path", "test_path") if getattr(self, k)] \
            if self.source in ("builtin", "tfds") else []
        unread += [k for k in ("tfds_name", "tfds_data_dir") if getattr(self, k)] if self.source != "tfds" else []
        if unread:
            key = unread[0]
            fix = "data.source=tfds" if key.startswith("tfds") else "data.source=jsonl (or csv/tsv)"
            used = " (the built-in corpus is used)" if self.source == "builtin" else ""
            raise ValueError(f"data.{key} is ignored with data.source {self.source}{used}; "
                             f"set {fix} to read it, or remove data.{key}")
        return self


    def _check_tokenizer(self) -> None:
        tok = self.tokenizer
        if tok is None or tok == "word" and self.source != "prepared":
            return
        if not tok.endswith(".model") and (self.source == "prepared" or tok not in ("bpe", "unigram")):
            choices = "a SentencePiece .model file" if self.source == "prepared" else \
                "word, bpe, unigram or a SentencePiece .model file"
            raise ValueError(f"data.tokenizer {tok!r}: expected {choices}")
        if tok in ("bpe", "unigram") and self.vocab_size < 263:  # trainer/data/subword.py MIN_VOCAB
            raise ValueError(f"data.vocab_size ({self.vocab_size}) is too small for a {tok} tokenizer: it holds "
                             "4 special ids and 256 bytes; use at least 263")


# ------------------------------------------------------------------------------------- optimizer
class OptimizerConfig(_Strict):
    """Adam/AdamW or SGD (with momentum) with warmup then a decay schedule, optional clipping and weight decay."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = 1e-3
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: NonNegInt = 0
    min_lr_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    clip_norm: Annotated[float, Field(gt=0.0)] | None = None
    scale_lr_with_replicas: bool = False
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # sgd only

    @model_validator(mode="after")
    def _decay_needs_adamw(self) -> "OptimizerConfig":
        if self.weight_decay > 0 and self.name != "adamw":
            raise ValueError("weight_decay needs optimizer.name: adamw (Adam's L2 is not decoupled)")
        if self.momentum > 0 and self.name != "sgd":
            raise ValueError("momentum needs optimizer.name: sgd (Adam keeps its own moments)")
        return self


# ----------------------------------------------------------------------------- training schedule
class EarlyStopping(_Strict):
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    patience: PositiveInt = 3  # evaluations without improvement


class TrainConfig(_Strict):
    steps: PositiveInt = 1000
    grad_accum: PositiveInt = 1  # micro-steps per optimizer step (splits each replica's batch)
    mixed_precision: Literal["off", "bfloat16", "float16"] = "off"
    deterministic: bool = True
    log_every: PositiveInt = 10
    # A step with a non-finite loss or gradient on any rank is skipped on all ranks; this many in a row stop
    # the run with one line naming the step and the variable (trainer/nonfinite.py).
    max_bad_steps: PositiveInt = 10
    # Elastic Horovod (`strata launch --elastic`): commit the training state to host memory every this many
    # steps; a lost worker costs the survivors at most this many steps, redone (trainer/elastic_loop.py).
    elastic_commit_every: PositiveInt = 10
    early_stopping: EarlyStopping | None = None
    # Hang watchdog (trainer/heartbeat.py): a rank that stays in one phase longer than this is hung and the
    # job is aborted with every rank's phase shown; 0 disables. The first step of a process (graph build,
    # rendezvous) is allowed watchdog_startup_s instead, if that is longer.
    watchdog_timeout_s: Annotated[float, Field(ge=0)] = 600.0
    watchdog_startup_s: Annotated[float, Field(ge=0)] = 900.0
    # XLA for each replica's forward and backward pass (the all-reduce and the update stay outside: Horovod's
    # ops cannot run inside XLA); a first step that compiles takes longer (trainer/loop.py).
    jit_compile: bool = False
    # Optimizer steps per compiled call (a while loop in the graph: one Python dispatch for several steps);
    # a call is cut at every step where logging, checkpoints, evaluation or another hook acts (trainer/loop.py).
    steps_per_call: PositiveInt = 1
    # MFU's peak: TFLOP/s of ONE device at the run's dtype (e.g. from a datasheet). Unset: measured by a
    # matmul probe on each device, cached per host, device and TensorFlow version (trainer/peak.py).
    peak_tflops: Annotated[float, Field(gt=0)] | None = None


class EvalConfig(_Strict):
    every: PositiveInt = 200  # steps between evaluations (and at the end)
    max_batches: PositiveInt | None = None
    rouge_examples: PositiveInt = 64  # validation examples decoded for ROUGE


class CheckpointConfig(_Strict):
    every: PositiveInt = 200
    keep: PositiveInt = 3
    # Refuse to start when the run directory's disk cannot hold keep + 1 checkpoints (false: skip the check,
    # e.g. when the filesystem reports its free space wrongly; a full disk then fails at the save instead).
    check_free_space: bool = True


class LoggingConfig(_Strict):
    progress_bar: bool = True
    profile_steps: tuple[PositiveInt, PositiveInt] | None = None  # [first, last] step to trace

    @model_validator(mode="after")
    def _ordered(self) -> "LoggingConfig":
        if self.profile_steps and self.profile_steps[0] > self.profile_steps[1]:
            a, b = self.profile_steps
            raise ValueError(f"profile_steps [{a}, {b}]: the first step must not exceed the last")
        return self


class HorovodOptions(_Strict):
    """Passed to Horovod (as its HOROVOD_* environment variables) before hvd.init()."""

    compression: Literal["none", "fp16"] = "none"  # fp16: halve all-reduce bytes
    fusion_threshold_mb: Annotated[float, Field(ge=0)] | None = None  # Horovod's default is 64 MB
    cycle_time_ms: Annotated[float, Field(gt=0)] | None = None  # Horovod's default is 1 ms (5 ms on Gloo)
    hierarchical_allreduce: bool = False
    timeline: str | None = None  # a JSON trace of every collective, for chrome://tracing


_DEVICE = re.compile(r"^(/job:[^/]+(/replica:\d+)?(/task:\d+)?)?/(device:)?(cpu|gpu|CPU|GPU):\d+$")


def _device_name(name: str) -> str:
    if not _DEVICE.match(name):
        raise ValueError("must name one device, like /gpu:0 or /cpu:1")
    return name


class PipelineConfig(_Strict):
    """Pipeline parallelism inside each replica: the model's levels cut into `stages` on their own devices.

    Each replica's batch is split into `micro_batches`; stages work on different micro-batches at once.
    partition: `auto` (balance measured per-level cost) or one list of level names per stage.
    devices: one per stage (`/gpu:0`, ...); default: the GPUs of this process's local rank, or logical CPUs.
    """

    stages: PositiveInt = 2
    micro_batches: PositiveInt = 4
    schedule: Literal["gpipe", "1f1b"] = "1f1b"
    partition: Union[Literal["auto"], list[list[str]]] = "auto"
    devices: list[Annotated[str, AfterValidator(_device_name)]] | None = None
    recompute: bool = False  # keep only stage-boundary activations; re-run each stage's forward in backward
    profile_steps: PositiveInt = 3  # partition=auto: timed repeats per level
    device_memory_gb: Annotated[float, Field(gt=0)] | None = None  # per device; default: what the GPU reports


class DistributionConfig(_Strict):
    """How replicas are formed.

    single: one device. mirrored: replicas on the GPUs of one process (logical CPUs without GPUs).
    multi_worker: one process per worker, cluster from TF_CONFIG. horovod: one process per replica.
    data.batch_size is always the GLOBAL batch; each replica gets batch_size / replicas.
    """

    backend: Literal["single", "mirrored", "multi_worker", "horovod"] = "single"
    devices: PositiveInt | None = None  # mirrored: replicas in this process (default: all GPUs, or 1 CPU)
    horovod: HorovodOptions = HorovodOptions()
    pipeline: PipelineConfig | None = None  # absent: no pipeline (one stage, the whole model per replica)
    # Sharded data parallel (ZeRO, backend horovod): 0 replicated; 1 optimizer state sharded over the ranks;
    # 2 gradients too (reduce-scatter). Rules: trainer/parallel/layout.py; how: trainer/strategy/zero.py.
    zero: Literal[0, 1, 2, 3] = 0


def effective_warmup(warmup_steps: int, total_steps: int) -> tuple[int, str | None]:
    """Warm-up steps to use, and a note when `warmup_steps` had to be capped.

    A warm-up as long as the run would never reach the peak learning rate; instead of refusing (which made
    every short run, e.g. `--set train.steps=50`, need a second flag), it is capped at 10% of the run and
    the start-up line says so.
    """
    if warmup_steps < total_steps:
        return warmup_steps, None
    capped = total_steps // 10
    return capped, (f"optimizer.warmup_steps ({warmup_steps}) is not below train.steps ({total_steps}): "
                    f"warm-up capped at {capped} step(s), 10% of the run; set optimizer.warmup_steps to choose")


# ----------------------------------------------------------------------------------- experiment
def _check_tied_pipeline(cfg: "ExperimentConfig") -> None:
    """Tied embeddings are one variable used by the first level (embed) and the last (head); a pipeline of 2+
    stages puts them on different stages (stages are contiguous and non-empty), and a variable cannot live on
    two devices. Refused here, before anything runs, rather than copied and gradient-summed across stages
    (Megatron's way): that needs a cross-stage all-reduce every step for a matrix worth a few percent of a
    large model's parameters."""
    pipe = cfg.distribution.pipeline
    if getattr(cfg.model, "tie_embeddings", False) and pipe is not None and pipe.stages > 1:
        raise ValueError(f"model.tie_embeddings: the tied embedding is used by level embed (stage 1) and level "
                         f"head (stage {pipe.stages}), and pipeline stages cannot share a variable; set "
                         "model.tie_embeddings=false to pipeline this model")


class ExperimentConfig(_Strict):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")]
    run_dir: str | None = None  # default: runs/<name>
    seed: NonNegInt = 0
    model: ModelConfig
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    distribution: DistributionConfig = DistributionConfig()

    @model_validator(mode="after")
    def _cross_field(self) -> "ExperimentConfig":
        if self.train.jit_compile and self.distribution.pipeline is not None:
            raise ValueError("train.jit_compile does not compile a pipeline (its stages run on several devices); "
                             "set train.jit_compile=false or remove distribution.pipeline")
        if self.train.steps_per_call > 1 and self.distribution.pipeline is not None:
            raise ValueError("train.steps_per_call above 1 does not run a pipeline yet; set train.steps_per_call=1 "
                             "or remove distribution.pipeline")
        config_layout(self)  # how the batch and the model split (trainer/parallel/layout.py: every rule there)
        if self.data.source == "tfds" and not self.task.reads_tfds:
            raise ValueError("data.source tfds is supported for the summarizers only")
        if self.task.reads_prepared != (self.data.source == "prepared"):
            if self.task.reads_prepared:
                raise ValueError(f"data.source: model.kind {self.model.kind} trains on prepared token shards; set "
                                 "data.source=prepared and data.prepared_path=DIR (made by `strata data prepare`)")
            raise ValueError(f"data.source prepared is read by model.kind lm only, not {self.model.kind}")
        _check_tied_pipeline(self)
        es = self.train.early_stopping
        if es:
            known = self.task.metrics
            if es.metric.removeprefix("val_") not in known:
                raise ValueError(f"train.early_stopping.metric {es.metric!r} is not computed for {self.task}; "
                                 f"choose one of {', '.join('val_' + m for m in known)}")
        return self

    def warmup(self) -> tuple[int, str | None]:
        """(warm-up steps the schedule uses, a note to print when that differs from optimizer.warmup_steps)."""
        return effective_warmup(self.optimizer.warmup_steps, self.train.steps)

    @property
    def task(self) -> tasks.Task:
        """What the model kind learns (trainer/tasks/): its data fields, loss, metrics, inference, export."""
        return tasks.task_for(self.model.kind)

    def resolved_run_dir(self) -> Path:
        return run_dir_of(self.name, self.run_dir)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------------------- loading
def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (['a','b','c'], value); the value is parsed as YAML (safely)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optimizer.lr=3e-4")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text!r}: empty key part; use dotted keys like data.batch_size=64")
    try:
        value = safe_load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of `raw` with each `a.b=value` override set (creating sections as needed)."""
    out = json.loads(json.dumps(raw))  # deep copy of plain data
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"--set {text!r}: {where} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping safely (no tags, no code): configs are data."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found; pass a YAML file such as configs/classifier.yaml")
    try:
        raw = safe_load_yaml(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}:{where}: {problem}; fix the YAML syntax") from None
    if raw is None:
        raise ConfigError(f"{path}: config is empty; it needs at least `name:` and `model: {{kind: ...}}`")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, not a {type(raw).__name__}")
    return raw


_MODEL_KINDS = {section.model_fields["kind"].default: section for section in MODEL_SECTIONS}


def _section_fields(loc: tuple) -> list[str]:
    """The valid keys of the config section at pydantic error location `loc` ([] if it cannot tell)."""
    section: Any = ExperimentConfig
    for part in loc:
        if part in _MODEL_KINDS:  # the discriminator tag pydantic puts into the model union's path
            section = _MODEL_KINDS[part]
            continue
        field = section.model_fields.get(part) if section is not None else None
        section = _model_in(field.annotation) if field else None
    return list(section.model_fields) if section is not None else []


def _model_in(annotation: Any) -> Any:
    """The one config section class inside an annotation like `X | None` or `Annotated[X, ...]` (else None)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    found = [m for m in map(_model_in, get_args(annotation)) if m is not None]
    return found[0] if len(found) == 1 else None


def _did_you_mean(key: str, fields: list[str]) -> str | None:
    """The field a misspelt or foreign key most likely means: a close spelling (difflib), the
    initials of its words (learning_rate -> lr), or the one field containing it (warmup -> warmup_steps)."""
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    if close:
        return close[0]
    initials = "".join(word[0] for word in key.lower().split("_") if word)
    if len(initials) > 1 and initials in fields:
        return initials
    containing = [f for f in fields if len(key) >= 3 and (key in f or (len(f) >= 3 and f in key))]
    return containing[0] if len(containing) == 1 else None


def _format_error(source: str, err: ValidationError) -> str:
    """One line: the first problem, its dotted path, what was given and the fix."""
    e = err.errors()[0]
    # Drop the discriminator tag pydantic inserts into union paths (model.classifier.x -> model.x).
    loc = [str(p) for p in e["loc"] if p not in _MODEL_KINDS]
    path = ".".join(loc) or "(top level)"
    msg = e["msg"].removeprefix("Value error, ")
    kind = e["type"]
    if kind == "extra_forbidden":
        guess = _did_you_mean(loc[-1], _section_fields(e["loc"][:-1]))
        msg = (f"unknown key; did you mean {'.'.join([*loc[:-1], guess])}?" if guess else
               "unknown key; check the spelling (see configs/*.yaml for the valid keys)")
    elif kind == "missing":
        msg = "required but missing"
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        path, msg = f"{path}.kind", f"must be one of: {', '.join(_MODEL_KINDS)}"
    given = e.get("input")
    shown = "" if kind in ("missing", "extra_forbidden") or isinstance(given, dict) else f" (got {given!r})"
    if (not loc and kind not in ("missing",)) or msg.startswith(f"{path}."):  # the message names its own field
        return f"{source}: {msg}"
    return f"{source}: {path}: {msg}{shown}"


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load, override and validate an experiment config. Raises ConfigError (one line) on any problem.

    `path` may also be a run directory: its saved config.yaml, with run_dir set to that directory, so
    `strata train runs/x` (or launch / slurm submit) resumes that run as it was configured.
    """
    p = Path(path)
    if p.is_dir():
        saved = p / RUN_CONFIG_FILE
        if not saved.is_file():
            raise ConfigError(f"{path}: a directory without {RUN_CONFIG_FILE}, so neither a config file nor a run "
                              "directory; pass a YAML file such as configs/classifier.yaml or a directory "
                              "`strata train` created")
        raw = {**read_yaml(saved), "run_dir": str(p)}
        return config_from_dict(apply_overrides(raw, overrides or []), source=str(saved))
    raw = apply_overrides(read_yaml(path), overrides or [])
    return config_from_dict(raw, source=str(path))


def load_run_config(run_dir: str | Path) -> ExperimentConfig:
    """The resolved config a run was trained with (for evaluate / classify / export), without TensorFlow."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a Strata run directory (no {RUN_CONFIG_FILE}); pass the directory "
                          "`strata train` created")
    cfg = config_from_dict(read_yaml(path), source=str(path))
    return cfg.model_copy(update={"run_dir": str(run_dir)})


def config_from_dict(raw: dict, *, source: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None
