"""Strata's single-worker training throughput over plain Keras `model.fit`, same model, same data.

Both sides train the same architecture on the same token arrays with the same global batch, Adam and
learning rate, for the same number of steps, after a warm-up that pays for tracing. Runs alternate
(Keras, Strata, Keras, Strata, ...) so drift on a shared machine hits both; the median of each is used.

    .venv/bin/python bench/overhead.py [--model classifier|summarizer] [--steps 300] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.experiment import configure_runtime, model_inputs, prepare  # noqa: E402
from trainer.hooks import Hook  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.data.splits import encode_splits, load_splits, training_texts  # noqa: E402
from trainer.data.tokenizer import Vocabulary  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.strategy.single import SingleDevice  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def strata_throughput(config: str, steps: int, warmup: int, run_dir: Path) -> float:
    """Examples/s of Strata's loop (hooks, checkpoint at the end, no evaluation inside the window)."""
    overrides = [f"run_dir={run_dir}", f"train.steps={warmup + steps}", "logging.progress_bar=false",
                 f"eval.every={10**6}", f"checkpoint.every={10**6}", f"train.log_every={steps}",
                 "optimizer.schedule=constant", "optimizer.warmup_steps=0"]
    cfg = load_config(CONFIGS / f"{config}.yaml", overrides)
    configure_runtime(cfg)
    strategy = SingleDevice()
    exp = prepare(cfg, strategy, training=True)
    clock = WindowClock(first_step=warmup)
    train(exp, strategy, extra_hooks=[clock])
    return steps * cfg.data.batch_size / clock.elapsed


class WindowClock(Hook):
    """Wall time from the end of step `first_step` to the end of the last step: tracing, the final
    evaluation and the final checkpoint are excluded (model.fit does none of them)."""

    def __init__(self, first_step: int):
        self.first_step, self.start, self.elapsed = first_step, 0.0, 0.0

    def on_step_end(self, state) -> None:
        if state.step == self.first_step:
            self.start = time.perf_counter()
        if state.step == state.total_steps:
            self.elapsed = time.perf_counter() - self.start


def keras_throughput(config: str, steps: int, warmup: int) -> float:
    """Examples/s of `model.fit` on the same model, arrays, batch and optimizer."""
    cfg = load_config(CONFIGS / f"{config}.yaml", ["optimizer.schedule=constant"])
    configure_runtime(cfg)
    splits = load_splits(cfg.data, cfg.task)
    vocab = Vocabulary.build(training_texts(splits, cfg.task), cfg.data.vocab_size)
    arrays = encode_splits(splits, vocab, cfg.data, cfg.task)["train"]
    model = build_model(cfg.model, vocab_size=vocab.size, max_len=cfg.data.max_len, summary_len=cfg.data.summary_len)
    if cfg.task == "classification":
        inputs = keras.Input((cfg.data.max_len,), dtype="int32", name="tokens")
        outputs = model({"tokens": inputs})["logit"]
        x, y = {"tokens": arrays["tokens"]}, arrays["label"]
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
    else:
        doc = keras.Input((cfg.data.max_len,), dtype="int32", name="document")
        summ = keras.Input((cfg.data.summary_len,), dtype="int32", name="summary_in")
        inputs = {"document": doc, "summary_in": summ}
        outputs = model(inputs)["logits"]
        x, y = model_inputs(cfg.task, arrays), arrays["summary_out"]
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0)
    fit_model = keras.Model(inputs, outputs)
    fit_model.compile(optimizer=keras.optimizers.Adam(cfg.optimizer.lr, global_clipnorm=cfg.optimizer.clip_norm),
                      loss=loss)
    b = cfg.data.batch_size
    n = (len(y) // b) * b
    x = {k: v[:n] for k, v in x.items()}
    y = y[:n]
    per_epoch = n // b
    fit_model.fit(x, y, batch_size=b, epochs=1, steps_per_epoch=min(warmup, per_epoch), verbose=0)
    epochs = max(1, steps // per_epoch)
    steps_per_epoch = min(steps, per_epoch)
    start = time.perf_counter()
    fit_model.fit(x, y, batch_size=b, epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=0, shuffle=True)
    return epochs * steps_per_epoch * b / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["classifier", "summarizer"], default="classifier")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    keras_runs, strata_runs = [], []
    for i in range(args.repeats):
        keras_runs.append(keras_throughput(args.model, args.steps, args.warmup))
        with tempfile.TemporaryDirectory() as tmp:
            strata_runs.append(strata_throughput(args.model, args.steps, args.warmup, Path(tmp) / "run"))
        print(f"repeat {i + 1}: keras.fit {keras_runs[-1]:.0f} ex/s, strata {strata_runs[-1]:.0f} ex/s", flush=True)
    k, s = statistics.median(keras_runs), statistics.median(strata_runs)
    print(f"model={args.model} steps={args.steps} threads={tf.config.threading.get_intra_op_parallelism_threads()}")
    print(f"keras.fit  {k:10.0f} examples/s (median of {args.repeats})")
    print(f"strata     {s:10.0f} examples/s (median of {args.repeats})")
    print(f"ratio strata/keras = {s / k:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
