"""Summarization: `{"document", "summary"}` examples; a decoder trained with teacher forcing.

Loss: token cross-entropy averaged over each summary's tokens. Evaluation counts correct tokens; ROUGE of
greedy summaries of the first `eval.rouge_examples` examples and the attention of the first validation
example (an image in TensorBoard) are computed on the chief. `strata summarize` and the exported
SavedModel decode greedily inside the graph.
"""
from __future__ import annotations

import numpy as np

from trainer.data.corpora import make_summarization_corpus
from trainer.data.tokenizer import PAD
from trainer.tasks.base import Task, tf


class SummarizationTask(Task):
    name = "summarization"
    record_keys = ("document", "summary")
    input_keys = ("document", "summary_in")
    token_keys = ("document", "summary_in")
    counts = ("loss_sum", "examples", "token_correct", "tokens")
    metrics = ("loss", "token_accuracy", "rouge1", "rouge2", "rougeL")
    reads_tfds = True
    command = "summarize"
    command_help = "documents to summarize"

    # ------------------------------------------------------------------------ data
    def builtin_examples(self, builtin, n: int, seed: int) -> list[dict]:
        return make_summarization_corpus(n, seed)

    def training_texts(self, train: list[dict]) -> list[str]:
        """Documents, then summaries."""
        return [e["document"] for e in train] + [e["summary"] for e in train]

    def encode(self, examples: list[dict], vocab, data_cfg, num_classes: int) -> dict[str, np.ndarray]:
        """`document` int32 [n, max_len], `summary_in` int32 [n, summary_len] (BOS + words), `summary_out`
        int32 [n, summary_len] (words + EOS, then PAD)."""
        summaries = [e["summary"] for e in examples]
        # Teacher forcing: the decoder reads <s> w1 .. wk and must predict w1 .. wk </s>; both truncate
        # the same words, so summary_in[:, t + 1] == summary_out[:, t] wherever summary_out is not PAD.
        return {
            "document": vocab.encode_batch([e["document"] for e in examples], data_cfg.max_len),
            "summary_in": vocab.encode_batch(summaries, data_cfg.summary_len, add_bos=True),
            "summary_out": vocab.encode_batch(summaries, data_cfg.summary_len, add_eos=True),
        }

    def model_dims(self, *, max_len: int, summary_len: int, num_classes: int) -> dict[str, int]:
        return {"max_len": max_len, "summary_len": summary_len}

    # ------------------------------------------------------------------------ one replica
    def per_example_loss(self, batch: dict, outputs: dict):
        """Token cross-entropy averaged over each summary's (non-padding) tokens."""
        target = batch["summary_out"]
        mask = tf.cast(tf.not_equal(target, PAD), tf.float32)
        token_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target, logits=outputs["logits"])
        return tf.reduce_sum(token_loss * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)

    def eval_counts(self, batch: dict, outputs: dict) -> dict:
        counts = super().eval_counts(batch, outputs)
        target = batch["summary_out"]
        mask = tf.not_equal(target, PAD)
        correct = tf.equal(tf.argmax(outputs["logits"], axis=-1, output_type=target.dtype), target)
        counts.update(
            token_correct=tf.reduce_sum(tf.cast(correct & mask, tf.float64)),
            tokens=tf.reduce_sum(tf.cast(mask, tf.float64)),
        )
        return counts

    def metrics_from_counts(self, counts: dict[str, float]) -> dict[str, float]:
        out = super().metrics_from_counts(counts)
        out["token_accuracy"] = counts["token_correct"] / max(counts["tokens"], 1.0)
        return out

    # ------------------------------------------------------------------ evaluation beyond counts
    def extra_metrics(self, exp, split: str) -> dict[str, float]:
        """ROUGE of greedy summaries on the first `eval.rouge_examples` examples of a split."""
        n = exp.cfg.eval.rouge_examples
        references = [ex["summary"] for ex in getattr(exp.splits, split)[:n]]
        predictions = decode_summaries(exp, exp.arrays[split]["document"][:n])
        return rouge(references, predictions)

    def eval_summaries(self, exp, tb, step: int) -> None:
        """The attention of the first validation example, as an image labelled with its tokens."""
        attention = _attention_map(exp)
        if attention is not None:
            weights, summary_tokens, document_tokens = attention
            tb.attention_image(step, weights, rows=summary_tokens, columns=document_tokens)

    # ------------------------------------------------------------------ inference, export
    def answer(self, exp, texts: list[str]) -> list[dict]:
        ids = exp.vocab.encode_batch(texts, exp.cfg.data.max_len)
        return [{"summary": summary, "text": text} for text, summary in zip(texts, decode_summaries(exp, ids))]

    def serving_attributes(self, exp) -> dict:
        from trainer.data.tokenizer import tf_decoder

        return {"decode": tf_decoder(exp.vocab), "summary_len": exp.cfg.data.summary_len}

    def serve(self, module, ids) -> dict:
        """{"summary": string [B]}: greedy decoding inside the graph."""
        from trainer.models.decoding import greedy_decode

        return {"summary": module.decode(greedy_decode(module.model, ids, module.summary_len))}

    def serving_outputs(self, labels) -> str:
        return "summary"


def decode_summaries(exp, documents: np.ndarray) -> list[str]:
    """Greedy summaries for token-id documents."""
    from trainer.models.decoding import greedy_decoder

    ids = greedy_decoder(exp.model, exp.cfg.data.summary_len)(tf.constant(documents)).numpy()
    return [exp.vocab.decode(row) for row in ids]


def _attention_map(exp) -> tuple[np.ndarray, list[str], list[str]] | None:
    """Attention of the first validation example (summary tokens x document tokens) and those tokens (each
    row is the summary token predicted at that position), if the model has attention."""
    first = {k: tf.constant(v[:1]) for k, v in exp.arrays["val"].items()}
    attention = exp.model(exp.task.model_inputs(first)).get("attention")
    if attention is None:
        return None
    doc_len = max(int(np.count_nonzero(first["document"][0])), 1)
    sum_len = max(int(np.count_nonzero(first["summary_out"][0])), 1)
    tokens = exp.vocab.tokens
    words = lambda ids: [tokens[i] if 0 <= i < len(tokens) else "?" for i in ids.numpy().tolist()]  # noqa: E731
    return (attention.numpy()[0, :sum_len, :doc_len], words(first["summary_out"][0, :sum_len]),
            words(first["document"][0, :doc_len]))


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

