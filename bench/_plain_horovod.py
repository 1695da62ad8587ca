"""What a user would write instead of Strata: a plain Horovod training loop in the style of Horovod's own
examples (examples/tensorflow2/tensorflow2_mnist.py): a gradient tape, one all-reduce per gradient, Adam,
the variables broadcast after the first step, nothing else (no NaN guard, no stop votes, no checkpoints).

    horovodrun -np 2 -H localhost:2 --gloo python bench/_plain_horovod.py CONFIG [--set KEY=VALUE ...]

The same model, data arrays, batch and learning rate as `strata train CONFIG --set ...` (it reads the same
config); bench/scaling.py runs it beside Strata's 2 workers. Rank 0 writes `perf/examples_per_sec` every
train.log_every steps to RUN_DIR/tensorboard, as Strata does, so the same reader measures both. Horovod 0.28's
DistributedGradientTape fails on Keras 3 variables (horovod issue #4290), so the all-reduce is written out:
what that tape does, one hvd.allreduce(Average) per gradient.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.cpu_affinity import pin_from_env  # noqa: E402

pin_from_env()  # STRATA_PIN_CPU=1: one core per rank, before any thread starts (as Strata's ranks do)

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.data.splits import encode_splits, load_splits, training_texts  # noqa: E402
from trainer.data.tokenizer import Vocabulary  # noqa: E402
from trainer.tasks import build_model  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    hvd.init()
    keras.utils.set_random_seed(cfg.seed)
    task, per_rank = cfg.task, cfg.data.batch_size // hvd.size()
    splits = load_splits(cfg.data, task)
    vocab = Vocabulary.build(training_texts(splits, task), cfg.data.vocab_size)
    arrays = encode_splits(splits, vocab, cfg.data, task)["train"]
    data = (tf.data.Dataset.from_tensor_slices(arrays).shard(hvd.size(), hvd.rank()).repeat()
            .shuffle(1024, seed=cfg.seed).batch(per_rank, drop_remainder=True).prefetch(2))
    model = build_model(cfg.model, vocab_size=vocab.size, max_len=cfg.data.max_len, summary_len=cfg.data.summary_len)
    opt = keras.optimizers.Adam(cfg.optimizer.lr)

    @tf.function
    def step(batch, first: bool):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(task.per_example_loss(batch, model(task.model_inputs(batch), training=True)))
        grads = tape.gradient(loss, model.trainable_variables)
        grads = [hvd.allreduce(g, op=hvd.Average) for g in grads]
        opt.apply_gradients(zip(grads, model.trainable_variables))
        if first:  # Horovod's examples broadcast after the first step, once the variables exist
            hvd.broadcast_variables([v.value for v in model.variables], root_rank=0)
            hvd.broadcast_variables([v.value for v in opt.variables], root_rank=0)
        return loss

    writer = tf.summary.create_file_writer(str(cfg.resolved_run_dir() / "tensorboard")) if hvd.rank() == 0 else None
    started, since = None, 0  # the clock starts at the end of step 1 (tracing), as Strata's does
    for n, batch in enumerate(data.take(cfg.train.steps), start=1):
        loss = step(batch, n == 1)
        if n == 1 or n % cfg.train.log_every == 0:
            float(loss)  # waits for the step
            now = time.perf_counter()
            if started is not None and writer is not None:
                with writer.as_default(step=n):
                    tf.summary.scalar("perf/examples_per_sec", (n - since) * cfg.data.batch_size / (now - started))
            started, since = now, n
    if writer is not None:
        writer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
