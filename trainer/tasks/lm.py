"""Language modelling: next-token prediction over sequences streamed from prepared token shards.

A batch is `{"tokens", "targets"}`, int32 [B, L]: targets are the tokens shifted by one
(trainer/data/stream.py). Loss: token cross-entropy averaged over each sequence's non-pad targets (prepared
sequences have none, but a padded batch would be scored right). Evaluation sums token losses and token
counts over the whole validation split, so `loss` is per token and `perplexity` = exp(loss). `strata
generate` and the exported SavedModel continue raw text (trainer/models/generation.py).
"""
from __future__ import annotations

import math

from trainer.data.tokenizer import PAD as PAD_ID  # 0 in the word vocabulary and every subword model
from trainer.tasks.base import Task, tf


def _per_sequence(losses, mask):
    """Each sequence's mean token loss over its non-pad targets."""
    return tf.reduce_sum(losses, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)


class LanguageModelTask(Task):
    name = "language_modeling"
    record_keys = ("text",)
    input_keys = ("tokens",)
    token_keys = ("tokens",)
    counts = ("loss_sum", "examples", "token_loss_sum", "tokens")
    metrics = ("loss", "perplexity")
    reads_prepared = True
    command = "generate"
    command_help = "prompts to continue"
    command_options = ("max_tokens", "temperature", "top_k", "seed")

    def model_dims(self, *, max_len: int, summary_len: int, num_classes: int) -> dict[str, int]:
        return {"seq_len": max_len}  # experiment.py passes data.seq_len as max_len for this task

    # ------------------------------------------------------------------------ one replica
    def _token_losses(self, batch: dict, outputs: dict):
        target = batch["targets"]
        mask = tf.cast(tf.not_equal(target, PAD_ID), tf.float32)
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target, logits=outputs["logits"])
        return losses * mask, mask

    def per_example_loss(self, batch: dict, outputs: dict):
        """Mean next-token cross-entropy of each sequence's non-pad targets."""
        return _per_sequence(*self._token_losses(batch, outputs))

    def eval_counts(self, batch: dict, outputs: dict) -> dict:
        losses, mask = self._token_losses(batch, outputs)
        per_example = _per_sequence(losses, mask)
        return {"loss_sum": tf.reduce_sum(tf.cast(per_example, tf.float64)),
                "examples": tf.cast(tf.size(per_example), tf.float64),
                "token_loss_sum": tf.reduce_sum(tf.cast(losses, tf.float64)),
                "tokens": tf.reduce_sum(tf.cast(mask, tf.float64))}

    def metrics_from_counts(self, counts: dict[str, float]) -> dict[str, float]:
        """Per-token loss over every scored token, and its perplexity."""
        loss = counts["token_loss_sum"] / max(counts["tokens"], 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}

    # ------------------------------------------------------------------ inference, export
    def answer(self, exp, texts: list[str], max_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
               seed: int = 0) -> list[dict]:
        """Each prompt continued: `{"text": prompt, "continuation": new text, "tokens": new token count,
        "prompt_tokens": ..., "completion": decode(prompt ids + new ids)}` (the prompt survives byte-exact)."""
        from trainer.models.generation import generate_ids

        answers = []
        for text in texts:
            prompt = exp.vocab.tokenizer.encode(text)
            new = generate_ids(exp.model, prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                               seed=seed, window=exp.cfg.data.seq_len, eod_id=exp.vocab.tokenizer.eod_id)
            answers.append({"text": text, "continuation": exp.vocab.tokenizer.decode(new), "tokens": len(new),
                            "prompt_tokens": len(prompt), "completion": exp.vocab.tokenizer.decode(prompt + new)})
        return answers

    def serving_attributes(self, exp) -> dict:
        return {"window": exp.cfg.data.seq_len, "eod_id": exp.vocab.tokenizer.eod_id}

    def serve(self, module, ids) -> dict:
        raise NotImplementedError("the lm export has its own module (trainer/models/generation.py)")

    def serving_outputs(self, labels) -> str:
        return "continuation"
