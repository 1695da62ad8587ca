"""Text classification: `{"text", "label"}` examples; binary (one sigmoid unit) or K-way (softmax) heads.

Labels are class ids or class names (trainer/data/splits.py `LabelSet`, saved with the run as labels.json);
two classes train the binary head, more a K-way softmax, whose evaluation counts a confusion matrix
(`cm_<true>_<pred>`) from which accuracy and per-class and macro precision, recall and F1 are taken.
"""
from __future__ import annotations

import math

import numpy as np

from trainer.data.corpora import best_accuracy, make_classification_corpus
from trainer.tasks.base import Task, tf

BINARY_COUNTS = ("loss_sum", "examples", "tp", "fp", "fn", "tn")


class ClassificationTask(Task):
    name = "classification"
    record_keys = ("text", "label")
    label_key = "label"
    input_keys = ("tokens",)
    token_keys = ("tokens",)
    counts = BINARY_COUNTS
    metrics = ("loss", "accuracy", "precision", "recall", "f1")
    command = "classify"
    command_help = "texts to classify"

    # ------------------------------------------------------------------------ data
    def builtin_examples(self, builtin, n: int, seed: int) -> list[dict]:
        return make_classification_corpus(n, seed, builtin.label_noise)

    def builtin_note(self, builtin) -> str:
        return (f"built-in reviews with {builtin.label_noise:.0%} of labels flipped (data.builtin.label_noise): best "
                f"achievable validation accuracy {best_accuracy(builtin.val_examples, builtin.label_noise):.3f}")

    def training_texts(self, train: list[dict]) -> list[str]:
        return [e["text"] for e in train]

    def encode(self, examples: list[dict], vocab, data_cfg, num_classes: int) -> dict[str, np.ndarray]:
        """`tokens` int32 [n, max_len]; `label` float32 [n] (binary: a sigmoid cross-entropy's target) or int32
        class ids [n] (K-way: a sparse softmax cross-entropy's)."""
        dtype = np.float32 if num_classes == 2 else np.int32
        return {
            "tokens": vocab.encode_batch([e["text"] for e in examples], data_cfg.max_len),
            "label": np.asarray([e["label"] for e in examples], dtype=dtype).reshape(len(examples)),
        }

    def model_dims(self, *, max_len: int, summary_len: int, num_classes: int) -> dict[str, int]:
        return {"max_len": max_len, "num_classes": num_classes}

    # ------------------------------------------------------------------------ one replica
    def per_example_loss(self, batch: dict, outputs: dict):
        """Binary or K-way (sparse softmax) cross-entropy."""
        if "class_logits" in outputs:
            return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=batch["label"], logits=outputs["class_logits"])
        return tf.nn.sigmoid_cross_entropy_with_logits(labels=batch["label"], logits=outputs["logit"])

    def count_keys(self, num_classes: int = 2) -> tuple[str, ...]:
        """K > 2 classes count a confusion matrix, `cm_<true>_<pred>`."""
        if num_classes > 2:
            return ("loss_sum", "examples", *(f"cm_{t}_{p}" for t in range(num_classes) for p in range(num_classes)))
        return self.counts

    def eval_counts(self, batch: dict, outputs: dict) -> dict:
        counts = super().eval_counts(batch, outputs)
        if "class_logits" in outputs:
            k = outputs["class_logits"].shape[-1]
            pred = tf.argmax(outputs["class_logits"], axis=-1, output_type=tf.int32)
            matrix = tf.math.confusion_matrix(tf.cast(batch["label"], tf.int32), pred, num_classes=k, dtype=tf.float64)
            counts.update({f"cm_{t}_{p}": matrix[t, p] for t in range(k) for p in range(k)})
            return counts
        pred = outputs["probability"] >= 0.5
        true = batch["label"] >= 0.5

        def count(mask):
            return tf.reduce_sum(tf.cast(mask, tf.float64))

        counts.update(tp=count(pred & true), fp=count(pred & ~true), fn=count(~pred & true), tn=count(~pred & ~true))
        return counts

    def metrics_from_counts(self, counts: dict[str, float]) -> dict[str, float]:
        out = super().metrics_from_counts(counts)
        if "cm_0_0" in counts:
            out.update(_multiclass_metrics(counts))
            return out
        tp, fp, fn, tn = counts["tp"], counts["fp"], counts["fn"], counts["tn"]
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        out.update(
            accuracy=(tp + tn) / max(tp + fp + fn + tn, 1.0),
            precision=precision,
            recall=recall,
            f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        )
        return out

    # ------------------------------------------------------------------ inference, export
    def answer(self, exp, texts: list[str]) -> list[dict]:
        """The label (a class id), its name if the data named classes, the probability of class 1 (two classes)
        or of every class (K > 2), and the text."""
        tokens = tf.constant(exp.vocab.encode_batch(texts, exp.cfg.data.max_len))
        outputs = exp.model({"tokens": tokens}, training=False)
        answers = []
        for i, text in enumerate(texts):
            if "probabilities" in outputs:
                probabilities = outputs["probabilities"][i].numpy()
                label = int(probabilities.argmax())
                answer = {"label": label, "probabilities": [round(float(p), 4) for p in probabilities]}
            else:
                p = float(outputs["probability"][i])
                label = int(p >= 0.5)
                answer = {"label": label, "probability": round(p, 4)}
            if exp.labels.names:
                answer = {"label": label, "label_name": exp.labels.name(label), **answer}
            answers.append({**answer, "text": text})
        return answers

    def serving_attributes(self, exp) -> dict:
        return {"label_names": list(exp.labels.names) if exp.labels.names else None}  # a graph constant when traced

    def serve(self, module, ids) -> dict:
        """{"label": int32 [B], "probability": float32 [B]} with two classes, {"label", "probabilities":
        float32 [B, K]} with K > 2; and {"label_name": string [B]} when the training file named its classes."""
        outputs = module.model({"tokens": ids}, training=False)
        if "probabilities" in outputs:  # K > 2 classes
            probabilities = tf.cast(outputs["probabilities"], tf.float32)
            result = {"label": tf.argmax(probabilities, axis=-1, output_type=tf.int32), "probabilities": probabilities}
        else:
            probability = tf.cast(outputs["probability"], tf.float32)
            result = {"label": tf.cast(probability >= 0.5, tf.int32), "probability": probability}
        if module.label_names:
            result["label_name"] = tf.gather(tf.constant(module.label_names, tf.string), result["label"])
        return result

    def serving_outputs(self, labels) -> str:
        outputs = "label, probability" if labels.num_classes == 2 else "label, probabilities"
        return outputs + (", label_name" if labels.names else "")


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


__all__ = ["BINARY_COUNTS", "ClassificationTask"]
