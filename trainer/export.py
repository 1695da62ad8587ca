"""Serving export: a SavedModel whose `serving_default` signature takes raw text.

Classification returns {"label": int32 [B], "probability": float32 [B]} with two classes, and
{"label": int32 [B], "probabilities": float32 [B, K]} with K > 2; when the training file named its classes,
also {"label_name": string [B]}. Summarization returns {"summary": string [B]}. Tokenization and greedy
decoding are inside the graph, so a server needs only TensorFlow (no Strata, no vocabulary file) to use it.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import tensorflow as tf

from trainer.data.tokenizer import tf_decoder, tf_encoder
from trainer.experiment import Experiment
from trainer.models.decoding import greedy_decode


class ServingModule(tf.Module):
    def __init__(self, exp: Experiment):
        super().__init__()
        self.model = exp.model
        self.task = exp.cfg.task
        self.summary_len = exp.cfg.data.summary_len
        self.encode = tf_encoder(exp.vocab, exp.cfg.data.max_len)
        self.decode = tf_decoder(exp.vocab) if self.task == "summarization" else None
        self.label_names = list(exp.labels.names) if exp.labels.names else None  # a graph constant when traced

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def serve(self, text: tf.Tensor) -> dict[str, tf.Tensor]:
        ids = self.encode(text)
        if self.task == "summarization":
            return {"summary": self.decode(greedy_decode(self.model, ids, self.summary_len))}
        outputs = self.model({"tokens": ids}, training=False)
        if "probabilities" in outputs:  # K > 2 classes
            probabilities = tf.cast(outputs["probabilities"], tf.float32)
            result = {"label": tf.argmax(probabilities, axis=-1, output_type=tf.int32), "probabilities": probabilities}
        else:
            probability = tf.cast(outputs["probability"], tf.float32)
            result = {"label": tf.cast(probability >= 0.5, tf.int32), "probability": probability}
        if self.label_names:
            result["label_name"] = tf.gather(tf.constant(self.label_names, tf.string), result["label"])
        return result


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
