"""Strata's single-worker training throughput over plain Keras `model.fit`, same model, same data.

Both sides train the same architecture on the same token arrays with the same global batch, Adam and
learning rate, for the same number of steps, after a warm-up that pays for tracing. Both are timed by a
callback/hook from the end of the warm-up's last step to the end of the last step (Keras: `FitClock`, which
also leaves out each epoch's restart; Strata: `WindowClock`), so neither side's set-up is in the window. Runs alternate
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
from trainer import output  # noqa: E402

output.install()  # TensorFlow's own log lines off the console, as in `strata train` (STRATA_TF_LOGS=1 shows them)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.experiment import configure_runtime, prepare  # noqa: E402
from trainer.hooks import Hook  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.data.splits import encode_splits, load_splits, training_texts  # noqa: E402
from trainer.data.tokenizer import Vocabulary  # noqa: E402
from trainer.tasks import build_model  # noqa: E402
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


class FitClock(keras.callbacks.Callback):
    """Times `model.fit`'s steps the way WindowClock times Strata's: from the end of batch `first_step`
    (counted over epochs) to the end of the last. fit()'s set-up (data adapter, callbacks, first trace) and
    each epoch's restart (a new iterator over the arrays) fall outside the window: the clock pauses at an
    epoch's end and resumes when the next epoch's first batch begins. Only batch *begin* and epoch hooks
    are used, so Keras keeps dispatching batches without a host sync per batch, as without this callback.
    """

    def __init__(self, first_step: int):
        super().__init__()
        self.first_step, self.begun, self.timed = first_step, 0, 0
        self.elapsed, self.since = 0.0, None

    def on_train_batch_begin(self, batch, logs=None) -> None:
        if self.begun >= self.first_step:
            self.timed += 1
            if self.since is None:
                self.since = time.perf_counter()
        self.begun += 1

    def on_epoch_end(self, epoch, logs=None) -> None:  # Keras reads the epoch's logs first: the steps are done
        if self.since is not None:
            self.elapsed += time.perf_counter() - self.since
            self.since = None


def keras_throughput(config: str, steps: int, warmup: int) -> tuple[float, float]:
    """Examples/s of `model.fit` on the same model, arrays, batch and optimizer: (steps only, as Strata is
    timed; and the whole fit() call after warm-up, epoch restarts included, for reference)."""
    cfg = load_config(CONFIGS / f"{config}.yaml", ["optimizer.schedule=constant"])
    configure_runtime(cfg)
    splits = load_splits(cfg.data, cfg.task)
    vocab = Vocabulary.build(training_texts(splits, cfg.task), cfg.data.vocab_size)
    arrays = encode_splits(splits, vocab, cfg.data, cfg.task)["train"]
    model = build_model(cfg.model, vocab_size=vocab.size, max_len=cfg.data.max_len, summary_len=cfg.data.summary_len)
    if cfg.task.labelled:  # the classifier
        inputs = keras.Input((cfg.data.max_len,), dtype="int32", name="tokens")
        outputs = model({"tokens": inputs})["logit"]
        x, y = {"tokens": arrays["tokens"]}, arrays["label"]
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
    else:
        doc = keras.Input((cfg.data.max_len,), dtype="int32", name="document")
        summ = keras.Input((cfg.data.summary_len,), dtype="int32", name="summary_in")
        inputs = {"document": doc, "summary_in": summ}
        outputs = model(inputs)["logits"]
        x, y = cfg.task.model_inputs(arrays), arrays["summary_out"]
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0)
    fit_model = keras.Model(inputs, outputs)
    fit_model.compile(optimizer=keras.optimizers.Adam(cfg.optimizer.lr, global_clipnorm=cfg.optimizer.clip_norm),
                      loss=loss)
    b = cfg.data.batch_size
    n = (len(y) // b) * b
    x = {k: v[:n] for k, v in x.items()}
    y = y[:n]
    per_epoch = n // b
    epochs = -(-(warmup + steps) // per_epoch)  # whole epochs covering warm-up + steps: no partial last epoch
    clock = FitClock(first_step=warmup)

    class Whole(keras.callbacks.Callback):  # the old measure: every batch after warm-up, restarts included
        def on_train_batch_begin(self, batch, logs=None):
            if clock.begun == warmup + 1:
                self.start = time.perf_counter()

    whole = Whole()
    fit_model.fit(x, y, batch_size=b, epochs=epochs, steps_per_epoch=per_epoch, verbose=0, shuffle=True,
                  callbacks=[clock, whole])
    whole_elapsed = time.perf_counter() - whole.start
    return clock.timed * b / clock.elapsed, clock.timed * b / whole_elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["classifier", "summarizer"], default="classifier")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    keras_runs, keras_whole, strata_runs = [], [], []
    for i in range(args.repeats):
        steps_only, whole = keras_throughput(args.model, args.steps, args.warmup)
        keras_runs.append(steps_only)
        keras_whole.append(whole)
        with tempfile.TemporaryDirectory() as tmp:
            strata_runs.append(strata_throughput(args.model, args.steps, args.warmup, Path(tmp) / "run"))
        print(f"repeat {i + 1}: keras.fit {keras_runs[-1]:.0f} ex/s ({whole:.0f} with epoch restarts), "
              f"strata {strata_runs[-1]:.0f} ex/s", flush=True)
    k, s = statistics.median(keras_runs), statistics.median(strata_runs)
    print(f"model={args.model} steps={args.steps} threads={tf.config.threading.get_intra_op_parallelism_threads()}")
    print(f"keras.fit  {k:10.0f} examples/s (median of {args.repeats}; steps only, from a callback: no fit() "
          f"set-up, no epoch restarts; {statistics.median(keras_whole):.0f} with the restarts)")
    print(f"strata     {s:10.0f} examples/s (median of {args.repeats})")
    print(f"ratio strata/keras = {s / k:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
