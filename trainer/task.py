"""What is learned, seen from ONE replica: losses and metric counts per task.

No strategy code here. Per-example losses let the step normalise by the global batch (see
strategy/base.py), and evaluation returns additive counts so they can be summed over replicas before
any ratio (precision, recall, F1) is taken: the metric of the whole validation set, not an average of
per-rank ratios.
"""
from __future__ import annotations

import tensorflow as tf

from trainer.data.tokenizer import PAD

CLASSIFICATION_COUNTS = ("loss_sum", "examples", "tp", "fp", "fn", "tn")
SUMMARIZATION_COUNTS = ("loss_sum", "examples", "token_correct", "tokens")
COUNTS = {"classification": CLASSIFICATION_COUNTS, "summarization": SUMMARIZATION_COUNTS}


def per_example_loss(task: str, batch: dict, outputs: dict) -> tf.Tensor:
    """float32 [B]: binary cross-entropy, or token cross-entropy averaged over each summary's tokens."""
    if task == "classification":
        return tf.nn.sigmoid_cross_entropy_with_logits(labels=batch["label"], logits=outputs["logit"])
    target = batch["summary_out"]
    mask = tf.cast(tf.not_equal(target, PAD), tf.float32)
    token_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target, logits=outputs["logits"])
    return tf.reduce_sum(token_loss * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)


def tokens_in(task: str, batch: dict) -> tf.Tensor:
    """Non-padding input tokens in a batch (for tokens/s)."""
    key = "tokens" if task == "classification" else "document"
    n = tf.math.count_nonzero(batch[key], dtype=tf.int64)
    if task == "summarization":
        n += tf.math.count_nonzero(batch["summary_in"], dtype=tf.int64)
    return n


def eval_counts(task: str, batch: dict, outputs: dict) -> dict[str, tf.Tensor]:
    """Additive float64 counts for one batch (see CLASSIFICATION_COUNTS / SUMMARIZATION_COUNTS)."""
    loss = per_example_loss(task, batch, outputs)
    counts = {"loss_sum": tf.reduce_sum(tf.cast(loss, tf.float64)), "examples": tf.cast(tf.size(loss), tf.float64)}
    if task == "classification":
        pred = outputs["probability"] >= 0.5
        true = batch["label"] >= 0.5

        def count(mask):
            return tf.reduce_sum(tf.cast(mask, tf.float64))

        counts.update(
            tp=count(pred & true), fp=count(pred & ~true), fn=count(~pred & true), tn=count(~pred & ~true)
        )
    else:
        target = batch["summary_out"]
        mask = tf.not_equal(target, PAD)
        correct = tf.equal(tf.argmax(outputs["logits"], axis=-1, output_type=target.dtype), target)
        counts.update(
            token_correct=tf.reduce_sum(tf.cast(correct & mask, tf.float64)),
            tokens=tf.reduce_sum(tf.cast(mask, tf.float64)),
        )
    return counts


def metrics_from_counts(task: str, c: dict[str, float]) -> dict[str, float]:
    """Turn summed counts into the metrics users read."""
    out = {"loss": c["loss_sum"] / max(c["examples"], 1.0)}
    if task == "classification":
        tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        out.update(
            accuracy=(tp + tn) / max(tp + fp + fn + tn, 1.0),
            precision=precision,
            recall=recall,
            f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        )
    else:
        out["token_accuracy"] = c["token_correct"] / max(c["tokens"], 1.0)
    return out


def rouge(references: list[str], predictions: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure with Google's `rouge_score` (the reference ROUGE-1.5.5 port)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for ref, pred in zip(references, predictions):
        for key, score in scorer.score(ref, pred).items():
            totals[key] += score.fmeasure
    n = max(len(references), 1)
    return {k: v / n for k, v in totals.items()}


def lead_baseline(documents: list[str], summary_words: int) -> list[str]:
    """The classic 'lead' baseline: the document's first words, as many as a summary has."""
    return [" ".join(d.split()[:summary_words]) for d in documents]

