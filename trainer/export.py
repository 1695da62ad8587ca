"""Serving export: a SavedModel whose `serving_default` signature takes raw text.

The outputs are the task's (`Task.serve`): classification returns {"label": int32 [B], "probability":
float32 [B]} with two classes, and {"label": int32 [B], "probabilities": float32 [B, K]} with K > 2; when the
training file named its classes, also {"label_name": string [B]}. Summarization returns {"summary": string
[B]}. Tokenization and greedy decoding are inside the graph, so a server needs only TensorFlow (no Strata,
no vocabulary file) to use it.

A language model (`lm`) exports `LanguageModelServing`: {"continuation": string [B]}, greedy, 32 tokens at
most (serving_default), or any sampling settings (the `generate` signature); its SentencePiece tokenizer is
in the graph through tensorflow-text, so a server imports TensorFlow and tensorflow_text.
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


_TEXT = tf.TensorSpec([None], tf.string, name="text")


class LanguageModelServing(tf.Module):
    """Raw text in, continuation out: tokenizer and generation loop (trainer/models/generation.py) in the graph."""

    def __init__(self, exp: Experiment):
        super().__init__()
        import tensorflow_text as tft

        self.model = exp.model
        self.tokenizer = tft.SentencepieceTokenizer(model=exp.vocab.tokenizer.model, out_type=tf.int32)
        self.window, self.eod_id = exp.cfg.data.seq_len, exp.vocab.tokenizer.eod_id

    @tf.function(input_signature=[_TEXT])
    def serve(self, text: tf.Tensor) -> dict[str, tf.Tensor]:
        return self.generate(text, tf.constant(32), tf.constant(0.0), tf.constant(0), tf.constant(0, tf.int64))

    @tf.function(input_signature=[_TEXT, tf.TensorSpec([], tf.int32, name="max_tokens"),
                                  tf.TensorSpec([], tf.float32, name="temperature"),
                                  tf.TensorSpec([], tf.int32, name="top_k"), tf.TensorSpec([], tf.int64, name="seed")])
    def generate(self, text, max_tokens, temperature, top_k, seed) -> dict[str, tf.Tensor]:
        from trainer.models.generation import continue_ids

        def one(prompt: tf.Tensor) -> tf.Tensor:
            new = continue_ids(self.model, self.tokenizer.tokenize(prompt), max_tokens, temperature, top_k, seed,
                               window=self.window, eod_id=self.eod_id)
            return self.tokenizer.detokenize(new)

        return {"continuation": tf.map_fn(one, text, fn_output_signature=tf.TensorSpec([], tf.string))}


def export_saved_model(exp: Experiment, out_dir: Path) -> Path:
    """Write the SavedModel to `out_dir` atomically (a temporary sibling renamed into place)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if exp.task.reads_prepared:
        module = LanguageModelServing(exp)
        signatures = {"serving_default": module.serve, "generate": module.generate}
    else:
        module = ServingModule(exp)
        signatures = {"serving_default": module.serve}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tf.saved_model.save(module, str(tmp), signatures=signatures)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
