"""What a workload learns, seen from ONE replica: the interface every task implements.

In the style of TensorFlow Model Garden's `Task` (one replica's view; no strategy code here): which example
fields a data file holds, how examples become arrays, what the model reads, the per-example loss, the
additive evaluation counts and the metrics computed from their sums, evaluation beyond counts (ROUGE, an
attention image), what `strata <command>` answers, and the outputs of the exported SavedModel.

Per-example losses let the step normalise by the GLOBAL batch (trainer/strategy/base.py), and evaluation
returns additive counts so they are summed over replicas before any ratio (precision, recall, F1) is
taken: the metric of the whole validation set, not an average of per-rank ratios.

Importing a task module does not import TensorFlow: config validation (before TensorFlow loads) reads a
task's metric names and the data layer its example fields. Methods that build TensorFlow ops reach it
through `tf` below, imported at their first call.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, ClassVar


class _LazyModule:
    """A module imported at its first attribute access (TensorFlow costs seconds; tasks are read without it)."""

    def __init__(self, name: str) -> None:
        self._name, self._module = name, None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


tf: ModuleType = _LazyModule("tensorflow")  # type: ignore[assignment]


class Task:
    """One kind of learning problem. Subclasses set the class attributes and the methods marked abstract."""

    name: ClassVar[str]  # what run files and messages call it
    record_keys: ClassVar[tuple[str, ...]]  # the fields of an example (JSONL keys, CSV/TSV header), in order
    label_key: ClassVar[str | None] = None  # the field holding a class label (ids or names); None: all text
    input_keys: ClassVar[tuple[str, ...]]  # the batch arrays the model reads (labels and targets stay out)
    token_keys: ClassVar[tuple[str, ...]]  # the arrays whose non-padding tokens tokens/s counts
    counts: ClassVar[tuple[str, ...]]  # the additive evaluation counts (see `eval_counts`)
    metrics: ClassVar[tuple[str, ...]]  # validation metrics (early stopping may watch any, as val_<name>)
    reads_tfds: ClassVar[bool] = False  # whether data.source tfds can feed it
    reads_prepared: ClassVar[bool] = False  # trains on prepared token shards (data.source prepared) only
    command_options: ClassVar[tuple[str, ...]] = ()  # extra options of its command, passed to `answer`
    command: ClassVar[str]  # `strata <command> RUN TEXT...` runs the trained model on raw text
    command_help: ClassVar[str]  # what that command takes, for --help

    def __str__(self) -> str:
        return self.name

    @property
    def labelled(self) -> bool:
        """Examples carry class labels: the run saves its classes (labels.json) and reports their names."""
        return self.label_key is not None

    # ------------------------------------------------------------------------ data (no TensorFlow)
    def builtin_examples(self, builtin, n: int, seed: int) -> list[dict]:
        """`n` examples of the deterministic built-in corpus (`builtin`: the config's data.builtin)."""
        raise NotImplementedError

    def builtin_note(self, builtin) -> str:
        """What the start-up line should say about the built-in corpus ("" for nothing)."""
        return ""

    def training_texts(self, train: list[dict]) -> list[str]:
        """Texts the vocabulary is built from (the train split only)."""
        raise NotImplementedError

    def encode(self, examples: list[dict], vocab, data_cfg, num_classes: int) -> dict[str, Any]:
        """Fixed-shape numpy arrays of one split."""
        raise NotImplementedError

    def model_dims(self, *, max_len: int, summary_len: int, num_classes: int) -> dict[str, int]:
        """The sizes this task's model builders take besides the vocabulary (`trainer.models.build_model`)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ one replica (TensorFlow)
    def model_inputs(self, batch: dict) -> dict:
        """The features the model reads (labels and targets stay out)."""
        return {k: batch[k] for k in self.input_keys}

    def per_example_loss(self, batch: dict, outputs: dict):
        """float32 [B]: each example's loss."""
        raise NotImplementedError

    def tokens_in(self, batch: dict):
        """int64: non-padding tokens of a batch's `token_keys` (for tokens/s)."""
        first, *rest = self.token_keys
        n = tf.math.count_nonzero(batch[first], dtype=tf.int64)
        for key in rest:
            n += tf.math.count_nonzero(batch[key], dtype=tf.int64)
        return n

    def count_keys(self, num_classes: int = 2) -> tuple[str, ...]:
        """The additive counts `eval_counts` returns."""
        return self.counts

    def eval_counts(self, batch: dict, outputs: dict) -> dict:
        """Additive float64 counts of one batch: `loss_sum`, `examples` and the task's own."""
        loss = self.per_example_loss(batch, outputs)
        return {"loss_sum": tf.reduce_sum(tf.cast(loss, tf.float64)), "examples": tf.cast(tf.size(loss), tf.float64)}

    def metrics_from_counts(self, counts: dict[str, float]) -> dict[str, float]:
        """The metrics users read, from counts summed over every replica."""
        return {"loss": counts["loss_sum"] / max(counts["examples"], 1.0)}

    # --------------------------------------------------------- evaluation, inference, export
    def extra_metrics(self, exp, split: str) -> dict[str, float]:
        """Metrics that are not sums of per-batch counts (ROUGE of decoded text), on the chief's process."""
        return {}

    def eval_summaries(self, exp, tb, step: int) -> None:
        """TensorBoard summaries beyond scalars at an evaluation (the chief only): images, text."""

    def answer(self, exp, texts: list[str]) -> list[dict]:
        """`strata <command> RUN TEXT...`: one JSON-able answer per text, with the text."""
        raise NotImplementedError

    def serving_attributes(self, exp) -> dict[str, Any]:
        """What the exported module keeps besides the model and the encoder (tracked by the SavedModel)."""
        return {}

    def serve(self, module, ids) -> dict:
        """The serving signature's outputs for token ids `ids` (`module`: the exported tf.Module)."""
        raise NotImplementedError

    def serving_outputs(self, labels) -> str:
        """The serving signature's output names, as `strata export` lists them."""
        raise NotImplementedError
