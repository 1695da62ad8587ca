"""Side effects of the training loop, one class each: progress bar, TensorBoard, checkpoints, profiler,
early stopping. The loop calls every hook at the same points and never branches on what they do."""
from __future__ import annotations

import math
import sys
import time

import tensorflow as tf

from trainer.checkpoint import Checkpointer
from trainer.loop_state import Hook, LoopState  # noqa: F401  (re-exported: hooks subclass Hook)
from trainer.summaries import TensorBoard


def eta_seconds(*, step: int, total_steps: int, clock_step: int, elapsed_s: float) -> float | None:
    """Seconds left to `total_steps` at the pace of the steps after `clock_step`, whose end started the clock
    (`elapsed_s` ago), so graph building and start-up are not taken for the pace; None until a step is timed
    (pure)."""
    timed = step - clock_step
    if timed <= 0 or elapsed_s <= 0:
        return None
    return max(total_steps - step, 0) * elapsed_s / timed


class Console(Hook):
    """What a person watching sees: a tqdm bar (step, loss, throughput, ETA) on a terminal, plain lines at
    every log point otherwise (SLURM and CI logs), and every validation result. Chief only. The ETA (and the
    bar) start from the end of this process's first step: that step builds the graph and is no guide to the
    pace of the others."""

    def __init__(self, *, enabled: bool, progress_bar: bool):
        from trainer.output import stderr_is_terminal

        self.enabled, self.use_bar, self.bar = enabled, progress_bar and stderr_is_terminal(), None
        self.clock_time, self.clock_step = None, 0  # end of the first step: where the ETA's clock starts

    def on_train_begin(self, state: LoopState) -> None:
        self.clock_time, self.clock_step = None, state.step

    def on_step_end(self, state: LoopState) -> None:
        if self.clock_time is None:  # the first step of this process has just ended
            self.clock_time, self.clock_step = time.perf_counter(), state.step
            if self.enabled and self.use_bar:
                from tqdm import tqdm

                from trainer.output import terminal_stream

                self.bar = tqdm(total=state.total_steps, initial=state.step, unit="step", dynamic_ncols=True,
                                file=terminal_stream())
        elif self.bar:
            self.bar.update(state.steps_in_call)

    def on_log(self, state: LoopState) -> None:
        logs = state.train_logs
        if self.bar:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", ex_s=f"{logs['examples_per_sec']:.0f}",
                                 **({"mfu": f"{logs['mfu']:.2%}"} if "mfu" in logs else {}), refresh=False)
        elif self.enabled:
            eta = None if self.clock_time is None else eta_seconds(
                step=state.step, total_steps=state.total_steps, clock_step=self.clock_step,
                elapsed_s=time.perf_counter() - self.clock_time)
            mfu = f" mfu {logs['mfu']:.2%}" if "mfu" in logs else ""
            print(f"step {state.step}/{state.total_steps} loss {logs['loss']:.4f} lr {logs['learning_rate']:.2e} "
                  f"{logs['examples_per_sec']:.0f} ex/s{mfu}" + (f" eta {eta:.0f}s" if eta is not None else ""),
                  flush=True)

    def on_eval(self, state: LoopState) -> None:
        if self.enabled:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in state.eval_metrics.items())
            (self.bar.write if self.bar else print)(f"step {state.step}: validation {shown}")

    def on_train_end(self, state: LoopState) -> None:
        if self.bar:
            self.bar.close()


class TensorBoardHook(Hook):
    def __init__(self, tb: TensorBoard):
        self.tb = tb

    def on_log(self, state: LoopState) -> None:
        logs = state.train_logs
        # A step the NaN/Inf guard skipped has a non-finite loss: it stays out of the curve (the guard
        # counts it in train/skipped_steps) rather than putting a NaN into TensorBoard's chart.
        train = {k: logs[k] for k in ("loss", "learning_rate") if k != "loss" or math.isfinite(logs[k])}
        self.tb.scalars(state.step, train, prefix="train")
        perf = ("examples_per_sec", "tokens_per_sec", "step_time_ms", "mfu", "model_tflops")
        self.tb.scalars(state.step, {k: logs[k] for k in perf if k in logs}, prefix="perf")
        stages = {k.removeprefix("pipeline/"): v for k, v in logs.items() if k.startswith("pipeline/")}
        if stages:  # per-stage compute time and measured idle fraction (pipeline runs only)
            self.tb.scalars(state.step, stages, prefix="pipeline")

    def on_eval(self, state: LoopState) -> None:
        self.tb.scalars(state.step, state.eval_metrics, prefix="val")
        self.tb.flush()

    def on_train_end(self, state: LoopState) -> None:
        self.tb.flush()


class CheckpointHook(Hook):
    """Saves every `every` steps and at the end (including an early stop)."""

    def __init__(self, checkpointer: Checkpointer, every: int):
        self.checkpointer, self.every = checkpointer, every

    def next_stop(self, step: int) -> int | None:
        return (step // self.every + 1) * self.every

    def on_step_end(self, state: LoopState) -> None:
        if state.step % self.every == 0:
            self.save(state.step)

    def on_train_end(self, state: LoopState) -> None:
        if state.step and self.checkpointer.latest_step != state.step:  # step 0: stopped before any step
            self.save(state.step)

    def save(self, step: int) -> None:
        from trainer.heartbeat import phase  # here: trainer.heartbeat imports this module

        with phase("checkpoint"):  # the hang watchdog shows a slow save as such
            self.checkpointer.save(step)


class ProfilerHook(Hook):
    """Traces steps [first, last] (1-based optimizer steps) into the TensorBoard profile plugin."""

    def __init__(self, logdir: str, steps: tuple[int, int] | None, enabled: bool):
        self.logdir, self.steps, self.enabled, self.active = logdir, steps, enabled and steps is not None, False

    def next_stop(self, step: int) -> int | None:
        # On every rank, not only the tracing chief: all ranks must cut their calls at the same steps.
        if self.steps is None:
            return None
        return next((s for s in (self.steps[0] - 1, self.steps[1]) if s > step), None)  # traced steps: own calls

    def on_step_begin(self, state: LoopState) -> None:
        if self.enabled and not self.active and state.step + 1 == self.steps[0]:
            tf.profiler.experimental.start(self.logdir)
            self.active = True

    def on_step_end(self, state: LoopState) -> None:
        if self.active and state.step >= self.steps[1]:
            self.stop()

    def on_train_end(self, state: LoopState) -> None:
        if self.active:
            self.stop()

    def stop(self) -> None:
        tf.profiler.experimental.stop()
        self.active = False


class EarlyStopping(Hook):
    """Stops when `metric` has not improved for `patience` evaluations."""

    def __init__(self, metric: str, mode: str, patience: int):
        self.metric, self.mode, self.patience = metric.removeprefix("val_"), mode, patience
        self.best: float | None = None
        self.bad = 0

    def on_eval(self, state: LoopState) -> None:
        value = state.eval_metrics.get(self.metric)
        if value is None:
            known = ", ".join(sorted(state.eval_metrics))
            raise ValueError(f"train.early_stopping.metric {self.metric!r} is not computed; choose one of {known}")
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if better:
            self.best, self.bad = value, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            state.stop_requested = True
            state.stop_reason = f"early stopping: val {self.metric} did not improve for {self.patience} evaluations"
