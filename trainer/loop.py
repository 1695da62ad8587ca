"""The outer loop: steps, evaluation, hooks. One training step reads top to bottom in `make_train_step`."""
from __future__ import annotations

import hashlib
import time

import numpy as np
import tensorflow as tf

from trainer.data.batches import eval_dataset, train_dataset
from trainer.experiment import Experiment
from trainer.hooks import CheckpointHook, Console, EarlyStopping, Hook, LoopState, ProfilerHook, TensorBoardHook
from trainer.faults import fault_hooks, step_fault
from trainer.flops import mfu, run_training_flops
from trainer.heartbeat import heartbeat_hooks, phase, stop_current as stop_heartbeat
from trainer.preemption import preemption_hooks, votes_variable
from trainer.nonfinite import NonFiniteGuard, first_bad, local_flags
from trainer.optim import current_lr, uses_loss_scaling
from trainer.peak import peak_flops
from trainer.resume import start_message
from trainer.strategy.base import Strategy, sum_together
from trainer.summaries import TensorBoard, flatten


def make_train_step(exp: Experiment, strategy: Strategy, *, per_call: int = 1):
    """A compiled step: next batch -> one replica's gradients on every replica -> NaN/Inf and stop flags
    agreed over replicas -> the gradients summed over replicas and applied (or skipped by all).
    `per_call` > 1: a compiled call `(iterator, n)` running up to n such steps (`several_steps`)."""
    cfg, engine, task = exp.cfg, exp.engine, exp.task
    update = strategy.make_update(exp.optimizer, exp.model.trainable_variables, clip_norm=cfg.optimizer.clip_norm,
                                  loss_scaling=uses_loss_scaling(exp.optimizer, cfg.train.mixed_precision))
    inject = step_fault(strategy.rank)  # STRATA_FAULT=RANK:STEP:inf|nan_loss only; None (no op) otherwise
    stop_votes = votes_variable()  # this process's stop requests (trainer/preemption.py)

    # train.jit_compile: XLA compiles this replica's forward and backward pass only; the collectives below
    # (Horovod's ops have no XLA kernels in this build) and the optimizer update stay in the graph around it.
    gradients = tf.function(engine.gradients, jit_compile=True) if cfg.train.jit_compile else engine.gradients

    def replica_step(batch: dict) -> dict:
        loss, grads, extras = gradients(batch)  # accumulated micro-steps, or a pipeline's micro-batches
        if inject is not None:
            grads, loss = inject(grads), inject.loss(loss)
        # ONE all-reduce for every per-step number (trainer/strategy/base.py sum_together), fused by Horovod with
        # the last gradients: the NaN/Inf flags (trainer/nonfinite.py: a non-finite loss or gradient on any
        # replica -> all skip), the stop votes (every rank learns of a signal in the same step), and the logged
        # loss, tokens and engine extras. Its results are the same on every replica: nothing is reduced again.
        total = sum_together(strategy, {"flags": local_flags(loss, grads), "stop": tf.identity(stop_votes),
                                        "loss": loss, "tokens": tf.cast(task.tokens_in(batch), tf.float32),
                                        **{key: extras[key] for key in engine.reported}})
        update(grads, ok=tf.equal(tf.reduce_sum(total["flags"]), 0.0))  # summed over replicas and applied, or skipped
        # `signals`: what the host reads every step, in one read: [first non-finite (0: none), stop votes...].
        signals = tf.concat([[tf.cast(first_bad(total.pop("flags")), tf.float32)], total.pop("stop")], 0)
        return {"signals": signals, **total}

    if per_call > 1:
        return TracedOnce(several_steps(strategy, replica_step))

    @tf.function
    def train_step(iterator) -> dict:
        return strategy.run_agreed(replica_step, next(iterator))

    return TracedOnce(train_step)


class TracedOnce:
    """A tf.function traced at its first call and from then on called as that one concrete function: a
    tf.function call first matches its arguments against its traces, which for an iterator argument costs a
    few hundred microseconds a call, a large share of a small model's step. The step's arguments never change
    type (the same iterator type; `n` always an int32 scalar tensor)."""

    def __init__(self, function) -> None:
        self.function, self.concrete = function, None

    def __call__(self, *args):
        if self.concrete is None:
            self.concrete = self.function.get_concrete_function(*args)
        return self.concrete(*args)

    def get_concrete_function(self, *args):
        return self.function.get_concrete_function(*args)


def several_steps(strategy: Strategy, replica_step):
    """`train.steps_per_call`: one compiled call runs `n` steps (a tensor: any n, one trace) in a while loop,
    and returns the last step's outputs, the tokens of all, and `steps` run. It ends early after a step the
    NaN/Inf guard skipped or a stop vote (both agreed over replicas, so every rank runs the same steps), so
    the loop's hooks see that step as they would without it."""

    @tf.function
    def train_steps(iterator, n: tf.Tensor) -> dict:
        def more(done, out):  # signals: non-finite position and stop votes, all >= 0
            return tf.logical_and(done < n, tf.equal(tf.reduce_sum(out["signals"]), 0.0))

        def step(done, out):
            new = strategy.run_agreed(replica_step, next(iterator))
            return done + 1, {**new, "tokens": out["tokens"] + new["tokens"]}

        first = strategy.run_agreed(replica_step, next(iterator))
        done, out = tf.while_loop(more, step, (tf.constant(1), first))
        return {**out, "steps": done}

    return train_steps


def call_length(step: int, last: int, per_call: int, every: tuple[int, ...], stops: list[int | None]) -> int:
    """Steps the next call runs after `step` (pure): at most `per_call`, never past `last`, a multiple of any
    of `every` (log, evaluation) or a step where a hook must act (`Hook.next_stop`)."""
    end = min(step + per_call, last)
    for period in every:
        end = min(end, (step // period + 1) * period)
    for stop in stops:
        if stop is not None and stop > step:
            end = min(end, stop)
    return max(end - step, 1)


def make_call(exp: Experiment, strategy: Strategy, hooks: list[Hook], *, start: int, last: int):
    """What the loop runs between hooks: `call(iterator, state) -> outputs`, advancing `state.step` (and
    `state.steps_in_call`) by the steps it ran: one, or with train.steps_per_call up to that many, cut at every
    step where the loop or a hook acts. The first step of a process runs alone (it traces; the clock starts
    at its end)."""
    cfg = exp.cfg
    per_call, every = cfg.train.steps_per_call, (cfg.train.log_every, cfg.eval.every)
    train_step = make_train_step(exp, strategy, per_call=per_call)

    def call(iterator, state: LoopState) -> dict:
        if per_call == 1:
            out, state.steps_in_call = train_step(iterator), 1
        else:
            n = 1 if state.step == start else call_length(state.step, last, per_call, every,
                                                          [hook.next_stop(state.step) for hook in hooks])
            out = train_step(iterator, tf.constant(n, tf.int32))
            state.steps_in_call = int(out["steps"])
        state.step += state.steps_in_call
        return out

    return call


def make_eval_step(exp: Experiment):
    """A compiled forward pass returning additive counts. Evaluation runs per process on its own shard
    (no collective inside, except under ZeRO 3: see `evaluate`), and the counts are summed over processes
    afterwards."""
    model, task = exp.model, exp.task
    # ZeRO 3: the model's variables hold no storage; its engine runs the levels through gathered weights.
    forward = getattr(exp.engine, "forward", None) or (lambda inputs: model(inputs, training=False))
    # One trace for every batch size: a split's last batch is smaller, and each new shape would trace the
    # step again (TensorFlow warns about it when a process evaluates several runs, as bench/overhead.py does).
    spec = (exp.prepared.eval_dataset("val", batch_size=1) if exp.prepared else
            eval_dataset(exp.arrays["val"], batch_size=1)).element_spec

    @tf.function(input_signature=[spec])
    def eval_step(batch: dict) -> dict:
        outputs = forward(task.model_inputs(batch))
        return task.eval_counts(batch, outputs)

    return eval_step


def evaluate(exp: Experiment, strategy: Strategy, *, split: str = "val", eval_step=None) -> dict[str, float]:
    """Metrics over a whole split: counts summed over every process before ratios are taken."""
    cfg = exp.cfg
    eval_step = eval_step or make_eval_step(exp)
    batch_size = max(cfg.data.batch_size // strategy.world_size, 1)
    shard, shards = exp.layout.data_shard(strategy.rank, strategy.world_size)
    if exp.prepared is not None:  # streamed from token shards (data.source prepared)
        dataset = exp.prepared.eval_dataset(split, batch_size=batch_size, shard_index=shard, num_shards=shards)
    else:
        dataset = eval_dataset(exp.arrays[split], batch_size=batch_size, shard_index=shard, num_shards=shards)
    if cfg.eval.max_batches:
        dataset = dataset.take(cfg.eval.max_batches)
    totals = {key: 0.0 for key in exp.task.count_keys(exp.labels.num_classes)}
    sharded = getattr(exp.engine, "forward", None) is not None  # ZeRO 3: collectives in every eval step
    for batch, counted in (_same_count(dataset, strategy) if sharded else ((b, True) for b in dataset)):
        counts = eval_step(batch)
        for key, value in counts.items():
            totals[key] += float(value) if counted else 0.0
    metrics = exp.task.metrics_from_counts(strategy.all_reduce_sum(totals))
    if not sharded:  # ZeRO 3: omitted, said once at the start (strategy/replica.py)
        metrics.update(exp.task.extra_metrics(exp, split))  # e.g. ROUGE of decoded summaries
    return metrics


def _same_count(dataset, strategy: Strategy):
    """(batch, counted): this process's batches, then repeats of its last one (not counted) until it has run
    as many steps as the process with the most: a ZeRO-3 forward all-gathers, so every rank must take part."""
    mine = int(sum(1 for _ in dataset))
    counts = strategy.all_reduce_sum({f"rank{r}": float(mine if r == strategy.rank else 0)
                                      for r in range(strategy.world_size)})
    batch = None
    for batch in dataset:
        yield batch, True
    for _ in range(int(max(counts.values())) - mine):
        yield batch, False


def default_hooks(exp: Experiment, strategy: Strategy, tb: TensorBoard) -> list[Hook]:
    cfg = exp.cfg
    # First, so a step's end is marked before the hooks after it run (a hang in them shows as "between steps").
    hooks: list[Hook] = heartbeat_hooks(exp.run_dir, rank=strategy.rank, timeout_s=cfg.train.watchdog_timeout_s,
                                        startup_s=cfg.train.watchdog_startup_s)
    hooks += [
        Console(enabled=strategy.is_chief, progress_bar=cfg.logging.progress_bar),
        TensorBoardHook(tb),
        CheckpointHook(exp.checkpointer, cfg.checkpoint.every),
        NonFiniteGuard(rank=strategy.rank, max_bad_steps=cfg.train.max_bad_steps, tb=tb,
                       variable_paths=_gradient_paths(exp),
                       level_names=exp.model.level_names),
        ProfilerHook(str(tb.logdir), cfg.logging.profile_steps, strategy.is_chief),
    ]
    if cfg.train.early_stopping:
        es = cfg.train.early_stopping
        hooks.append(EarlyStopping(es.metric, es.mode, es.patience))
    return hooks + fault_hooks(strategy.rank) + preemption_hooks(strategy, exp.checkpointer)


def _gradient_paths(exp: Experiment) -> list[str]:
    """A name per gradient of the engine (the NaN/Inf guard's message): the model's variables, or under ZeRO 3
    its levels' slices."""
    state = getattr(getattr(exp.engine, "state", None), "gradient_paths", None)
    return state() if state is not None else [v.path for v in exp.model.trainable_variables]


def last_step(start: int, total_steps: int, stop_after: int | None) -> int:
    """The step a run started at `start` stops after: `total_steps`, or `stop_after` more steps if sooner."""
    return total_steps if stop_after is None else min(total_steps, start + stop_after)


def train(exp: Experiment, strategy: Strategy, *, stop_after: int | None = None,
          extra_hooks: list[Hook] | None = None, start: int | None = None, stop_at: int | None = None) -> LoopState:
    """Run optimizer steps from the last checkpoint (or from step `start`, whose state the model and optimizer
    already hold: an elastic restart) to `train.steps`, or `stop_after` more steps, or step `stop_at` (fixed
    by the caller: an elastic restart keeps the target of the job's first start)."""
    cfg = exp.cfg
    start = _restore(exp, strategy) if start is None else start
    strategy.broadcast_initial_state(exp.model.variables + exp.optimizer.variables)
    tb = TensorBoard(exp.run_dir / "tensorboard", enabled=strategy.is_chief, resumed_from=start)
    hooks = default_hooks(exp, strategy, tb) + list(extra_hooks or [])
    state = LoopState(step=start, total_steps=cfg.train.steps)
    last = last_step(start, cfg.train.steps, stop_after) if stop_at is None else min(stop_at, cfg.train.steps)
    if start == 0:
        tb.hparams(flatten(cfg.model_dump(mode="json")), ["val/loss"])

    iterator = _batches(exp, strategy, start)
    call, eval_step = make_call(exp, strategy, hooks, start=start, last=last), make_eval_step(exp)
    efficiency = measure_efficiency(exp, strategy)  # after the broadcast: every rank probes its device at once

    for hook in hooks:
        hook.on_train_begin(state)
    window_start, window_steps, window_tokens = time.perf_counter(), 0, []
    while state.step < last and not state.stop_requested:
        for hook in hooks:
            hook.on_step_begin(state)
        out = call(iterator, state)  # one step, or train.steps_per_call up to the next step a hook acts at
        signals = out["signals"].numpy()  # one host read per call; agreed: the same on every rank
        state.nonfinite, state.stop_votes = round(float(signals[0])), signals[1:].tolist()
        window_steps += state.steps_in_call
        window_tokens.append(out["tokens"])  # kept as tensors: no host sync, no extra op between log points
        logging_now = state.step % cfg.train.log_every == 0 or state.step == last
        if state.step == start + 1 and not logging_now:  # the first step builds the graph: time from its end
            float(out["loss"])
            window_start, window_steps, window_tokens = time.perf_counter(), 0, []
        if logging_now:
            state.train_logs = _train_logs(exp, strategy, state, out, window_start, window_steps, window_tokens)
            state.train_logs.update(efficiency.logs(state, state.train_logs))
            for hook in hooks:
                hook.on_log(state)
            window_start, window_steps, window_tokens = time.perf_counter(), 0, []
        for hook in hooks:
            hook.on_step_end(state)
        if (state.step % cfg.eval.every == 0 or state.step == cfg.train.steps) and not state.stop_signal:
            eval_started = time.perf_counter()
            run_eval(exp, strategy, state, hooks, tb, eval_step)
            window_start += time.perf_counter() - eval_started  # evaluation time is not training throughput
    already_done = start >= last
    if ((state.stop_requested and state.step % cfg.eval.every) or already_done) and not state.stop_signal:
        run_eval(exp, strategy, state, hooks, tb, eval_step)  # early stop off the grid, or nothing left to do
    for hook in hooks:
        hook.on_train_end(state)
    if strategy.world_size > 1:
        check_replicas_in_sync(exp, strategy)
    stop_heartbeat()  # the finishing phase is over: nothing of this loop may be watched any longer
    return state


COMPUTE_DTYPE = {"off": "float32", "bfloat16": "bfloat16", "float16": "float16"}  # train.mixed_precision


class Efficiency:
    """MFU of the run: the model's training FLOPs per example (trainer/flops.py) over the peak FLOP/s of every
    device that trains (trainer/peak.py, summed over processes); `logs` adds `mfu` to a log step's scalars and
    keeps the run's running total in the loop state (the final line prints it)."""

    def __init__(self, flops_per_example: float, peak: float) -> None:
        self.flops_per_example, self.peak = flops_per_example, peak

    def logs(self, state: LoopState, logs: dict[str, float]) -> dict[str, float]:
        window_s = logs["window_steps"] * logs["step_time_ms"] / 1000.0
        value = mfu(flops_per_example=self.flops_per_example, examples_per_sec=logs["examples_per_sec"],
                    peak_flops=self.peak)
        state.timed_s += window_s
        state.mfu_s += value * window_s
        return {"mfu": value, "model_tflops": self.flops_per_example * logs["examples_per_sec"] / 1e12}


def measure_efficiency(exp: Experiment, strategy: Strategy) -> Efficiency:
    """The run's FLOPs per example and the peak of all its devices: `train.peak_tflops` per device when
    given, else each process's matmul probe (cached) at the run's compute dtype."""
    cfg = exp.cfg
    flops = run_training_flops(cfg, vocab_size=exp.vocab.size, num_classes=exp.labels.num_classes)
    gpus = tf.config.list_logical_devices("GPU")
    # Devices this process trains on: its replicas' GPUs (x pipeline stages); on a CPU, the one CPU it shares.
    devices = max(strategy.num_replicas // strategy.world_size, 1) * exp.layout.pipeline_stages if gpus else 1
    dtype = COMPUTE_DTYPE[cfg.train.mixed_precision]
    if cfg.train.peak_tflops:
        per_device, source = cfg.train.peak_tflops * 1e12, "train.peak_tflops"
    else:
        per_device, source = peak_flops(dtype)
        source = f"{dtype} matmul probe, {source}"
    peak = strategy.all_reduce_sum({"peak": per_device * devices})["peak"]
    if strategy.is_chief:
        print(f"strata: MFU against {peak / 1e12:.3g} TFLOP/s peak ({source}); "
              f"{flops:.4g} FLOPs per training example", flush=True)
    return Efficiency(flops, peak)


def _batches(exp: Experiment, strategy: Strategy, start: int):
    """This process's share of every global batch from step `start` on (its data-parallel shard), as the
    strategy feeds its replicas."""
    shard, shards = exp.layout.data_shard(strategy.rank, strategy.world_size)
    if exp.prepared is not None:  # streamed from token shards: rows of (seed, step, shard), pure
        return strategy.distribute_dataset(exp.prepared.train_dataset(start_step=start, shard_index=shard,
                                                                      num_shards=shards))
    dataset = train_dataset(exp.arrays["train"], global_batch=exp.cfg.data.batch_size, seed=exp.cfg.seed,
                            start_step=start, shard_index=shard, num_shards=shards)
    return strategy.distribute_dataset(dataset)


def _train_logs(exp: Experiment, strategy: Strategy, state: LoopState, out: dict, window_start: float,
                window_steps: int, window_tokens: list) -> dict[str, float]:
    """A log step's scalars: loss, learning rate and throughput over the window since the last log step."""
    loss = float(out["loss"])  # waits for the step: the timing window is honest
    elapsed = time.perf_counter() - window_start
    if not np.isfinite(loss) and not state.nonfinite:  # the guard flags the loss: cannot happen
        raise FloatingPointError(f"loss became {loss} at step {state.step} but the step was not skipped")
    return {
        "loss": loss,
        "learning_rate": current_lr(exp.optimizer),
        "examples_per_sec": window_steps * exp.cfg.data.batch_size / elapsed,
        "tokens_per_sec": float(tf.add_n(window_tokens)) / elapsed,
        "step_time_ms": 1000.0 * elapsed / window_steps,
        "window_steps": window_steps,
        **exp.engine.logs(out, strategy.num_replicas),
    }


def _restore(exp: Experiment, strategy: Strategy) -> int:
    """Restore the newest checkpoint; the chief says where training starts (`resuming from step N ...`)."""
    start = exp.checkpointer.restore_latest()
    if strategy.is_chief:
        print(start_message(exp.checkpointer.directory, start), flush=True)
    return start


def weights_digest(variables) -> tuple[str, float]:
    """(sha256 of every weight's bytes, a float summary of them): identical weights give identical values."""
    digest, summary = hashlib.sha256(), 0.0
    for i, v in enumerate(variables):
        array = np.asarray(v.numpy() if hasattr(v, "numpy") else v)
        digest.update(array.tobytes())
        summary += (i + 1) * float(np.sum(array, dtype=np.float64))
    return digest.hexdigest()[:16], summary


def check_replicas_in_sync(exp: Experiment, strategy: Strategy) -> None:
    """Every process must end with the chief's weights; a silent divergence is an error, not a warning."""
    gathered = getattr(strategy.zero_state, "gathered_weights", None)  # ZeRO 3: level by level, all ranks
    digest, f = weights_digest(gathered() if gathered is not None else exp.model.trainable_variables)
    print(f"strata: rank {strategy.rank} weights sha256 {digest}", flush=True)
    sums = strategy.all_reduce_sum({"f": f, "f2": f * f})
    n = strategy.world_size
    spread = sums["f2"] / n - (sums["f"] / n) ** 2  # variance of the ranks' summaries: 0 iff all equal
    if spread > 1e-9 * max(1.0, (sums["f"] / n) ** 2):
        raise RuntimeError(f"replicas diverged: weights differ across the {n} ranks (variance {spread:.3g})")
    if strategy.is_chief:
        print(f"strata: weights identical on all {n} ranks", flush=True)


def run_eval(exp, strategy, state, hooks, tb, eval_step) -> None:
    with phase("eval"):
        state.eval_metrics = evaluate(exp, strategy, eval_step=eval_step)
    if strategy.is_chief and getattr(exp.engine, "forward", None) is None:  # ZeRO 3: no whole model to run
        exp.task.eval_summaries(exp, tb, state.step)  # e.g. the attention image
    for hook in hooks:
        hook.on_eval(state)
