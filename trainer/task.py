"""What is learned, seen from ONE replica: losses and metric counts per task.

No strategy code here. Per-example losses let the step normalise by the global batch (see
strategy/base.py), and evaluation returns additive counts so they can be summed over replicas before
any ratio (precision, recall, F1) is taken: the metric of the whole validation set, not an average of
per-rank ratios.
"""
from __future__ import annotations

import math

import tensorflow as tf

from trainer.data.tokenizer import PAD

CLASSIFICATION_COUNTS = ("loss_sum", "examples", "tp", "fp", "fn", "tn")
SUMMARIZATION_COUNTS = ("loss_sum", "examples", "token_correct", "tokens")
COUNTS = {"classification": CLASSIFICATION_COUNTS, "summarization": SUMMARIZATION_COUNTS}


def count_keys(task: str, num_classes: int = 2) -> tuple[str, ...]:
    """The additive counts `eval_counts` returns: K > 2 classes count a confusion matrix, `cm_<true>_<pred>`."""
    if task == "classification" and num_classes > 2:
        return ("loss_sum", "examples", *(f"cm_{t}_{p}" for t in range(num_classes) for p in range(num_classes)))
    return COUNTS[task]


def per_example_loss(task: str, batch: dict, outputs: dict) -> tf.Tensor:
    """float32 [B]: binary or K-way (sparse softmax) cross-entropy, or token cross-entropy averaged over each
    summary's tokens."""
    if task == "classification" and "class_logits" in outputs:
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=batch["label"], logits=outputs["class_logits"])
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
    if task == "classification" and "class_logits" in outputs:
        k = outputs["class_logits"].shape[-1]
        pred = tf.argmax(outputs["class_logits"], axis=-1, output_type=tf.int32)
        matrix = tf.math.confusion_matrix(tf.cast(batch["label"], tf.int32), pred, num_classes=k, dtype=tf.float64)
        counts.update({f"cm_{t}_{p}": matrix[t, p] for t in range(k) for p in range(k)})
    elif task == "classification":
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
    if task == "classification" and "cm_0_0" in c:
        out.update(_multiclass_metrics(c))
    elif task == "classification":
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


def _multiclass_metrics(c: dict[str, float]) -> dict[str, float]:
    """Accuracy; precision, recall and F1 per class (`precision_<id>`, ...) and their macro averages
    (`precision`, ...), all from the summed confusion matrix."""
    k = math.isqrt(sum(1 for key in c if key.startswith("cm_")))
    cm = [[c[f"cm_{t}_{p}"] for p in range(k)] for t in range(k)]
    total = sum(map(sum, cm))
    out = {"accuracy": sum(cm[i][i] for i in range(k)) / max(total, 1.0)}
    per_class: dict[str, float] = {}
    for i in range(k):
        predicted, actual = sum(cm[t][i] for t in range(k)), sum(cm[i])
        precision = cm[i][i] / predicted if predicted else 0.0
        recall = cm[i][i] / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.update({f"precision_{i}": precision, f"recall_{i}": recall, f"f1_{i}": f1})
    for name in ("precision", "recall", "f1"):  # macro averages: every class counts the same
        out[name] = sum(per_class[f"{name}_{i}"] for i in range(k)) / k
    return {**out, **per_class}


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

