"""Serving export: a SavedModel whose `serving_default` signature takes raw text.

The outputs are the task's (`Task.serve`): classification returns {"label": int32 [B], "probability":
float32 [B]} with two classes, and {"label": int32 [B], "probabilities": float32 [B, K]} with K > 2; when the
training file named its classes, also {"label_name": string [B]}. Summarization returns {"summary": string
[B]}. Tokenization and greedy decoding are inside the graph, so a server needs only TensorFlow (no Strata,
no vocabulary file) to use it.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import tensorflow as tf

from trainer.data.tokenizer import tf_encoder
from trainer.experiment import Experiment


class ServingModule(tf.Module):
    def __init__(self, exp: Experiment):
        super().__init__()
        self.model = exp.model
        self.task = exp.task
        self.encode = tf_encoder(exp.vocab, exp.cfg.data.max_len)
        for name, value in exp.task.serving_attributes(exp).items():  # tracked: a decoder's tables, ...
            setattr(self, name, value)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def serve(self, text: tf.Tensor) -> dict[str, tf.Tensor]:
        return self.task.serve(self, self.encode(text))


def export_saved_model(exp: Experiment, out_dir: Path) -> Path:
    """Write the SavedModel to `out_dir` atomically (a temporary sibling renamed into place)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    module = ServingModule(exp)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tf.saved_model.save(module, str(tmp), signatures={"serving_default": module.serve})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
