"""One pipelined step's graph: the schedule's forward ("F") and backward ("B") ops of every stage, built
inside the caller's tf.function, with a clock on each op (see engine.py for what F and B do).

Python builds the ops in an order where every op's inputs already exist; the order they run in is set
by data dependencies between stages and control dependencies within a stage (each op waits for the
previous op of its own stage), so TensorFlow runs different stages' ops at the same time.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from trainer.models.levels import Carry
from trainer.parallel.schedule import BACKWARD, FORWARD, ScheduleDeadlock

if TYPE_CHECKING:
    from trainer.strategy.pipeline.engine import PipelineEngine


class StepGraph:
    """The tensors of one step under construction: per stage, its micro-batches' inputs, outputs, tapes and
    received gradients, its accumulated variable gradients, and the clocks of its ops."""

    def __init__(self, engine: "PipelineEngine", micro: list[dict[str, tf.Tensor]], stage_vars: list[list[Any]]):
        k = engine.num_stages
        self.engine, self.micro, self.stage_vars = engine, micro, stage_vars
        self.stage_in: list[dict[int, Carry]] = [{} for _ in range(k)]  # inputs each stage received
        self.stage_out: list[dict[int, Carry]] = [{} for _ in range(k)]
        self.tapes: list[dict[int, tf.GradientTape]] = [{} for _ in range(k)]
        self.grad_in: list[dict[int, dict[str, tf.Tensor]]] = [{} for _ in range(k)]  # d loss / d stage inputs
        self.losses: dict[int, tf.Tensor] = {}
        self.acc: list[list[tf.Tensor | None]] = [[None] * len(v) for v in stage_vars]
        self.previous: list[list[tf.Tensor]] = [[] for _ in range(k)]  # outputs of each stage's previous op
        # Measured timing: a timestamp when an op's inputs are ready (and its stage is free), one when its
        # outputs exist; the step spans first start..last end. See `compute_seconds` for busy time.
        self.starts: list[list[tf.Tensor]] = [[] for _ in range(k)]
        self.busy: list[list[tf.Tensor]] = [[] for _ in range(k)]  # per stage, each op's end - start
        self.ends: list[tf.Tensor] = []
        self.stage_end: list[list[tf.Tensor]] = [[] for _ in range(k)]
        self.intervals: list[tf.Tensor] = []  # [start, end] of every op, in `labels` order
        self.labels: list[tuple[int, str, int]] = []
        self.markers: dict[tuple[int, str, int], list[tf.Tensor]] = {}

    # ------------------------------------------------------------------------------------ the schedule
    def build(self) -> None:
        """Build every stage's ops in schedule order, each as soon as its inputs exist."""
        schedule, k = self.engine.schedule, self.engine.num_stages
        next_op = [0] * k
        remaining = sum(len(ops) for ops in schedule)
        while remaining:
            progressed = False
            for s in range(k):
                while next_op[s] < len(schedule[s]) and self._ready(s, *schedule[s][next_op[s]]):
                    kind, m = schedule[s][next_op[s]]
                    self.forward(s, m) if kind == FORWARD else self.backward(s, m)
                    next_op[s] += 1
                    remaining -= 1
                    progressed = True
            if not progressed:
                raise ScheduleDeadlock(f"schedule {self.engine.schedule_name!r} cannot proceed at ops {next_op}")

    def _ready(self, s: int, kind: str, m: int) -> bool:
        if kind == FORWARD:
            return s == 0 or m in self.stage_out[s - 1]
        if kind == BACKWARD:
            return m in self.stage_in[s] and (s == self.engine.num_stages - 1 or m in self.grad_in[s + 1])
        raise ValueError(f"unknown op {kind!r}")  # pragma: no cover - make_schedule only emits F and B

    # ------------------------------------------------------------------------------------- the ops
    def forward(self, s: int, m: int) -> None:
        """F(s, m): the stage's levels on micro-batch m, under a tape (unless recomputing in B)."""
        engine = self.engine
        with tf.device(engine.devices[s]), tf.control_dependencies(self.previous[s]):
            carry = engine.model_carry(self.micro[m]) if s == 0 else self.stage_out[s - 1][m]
            self.stage_in[s][m] = carry
            self.started(s, list(carry.values()))
            if engine.recompute:
                out, loss = engine.stage_forward(s, carry, self.micro[m])
            else:
                tape = tf.GradientTape()
                with tape:
                    tape.watch([carry[k] for k in float_keys(carry)])
                    out, loss = engine.stage_forward(s, carry, self.micro[m])
                self.tapes[s][m] = tape
        self.stage_out[s][m] = out
        if loss is not None:
            self.losses[m] = loss
        # Pass-through keys are the previous stage's tensors: only what this op computed marks it done.
        passed = {id(v) for v in carry.values()}
        made = [v for v in out.values() if id(v) not in passed]
        self.mark(s, FORWARD, m, ([loss] if loss is not None else []) + (made or list(out.values())))

    def backward(self, s: int, m: int) -> None:
        """B(s, m): gradients of the stage's outputs (the loss on the last stage) for its float inputs and
        variables, seeded with what stage s+1 sent back; variable gradients summed over micro-batches."""
        engine, last = self.engine, s == self.engine.num_stages - 1
        carry = self.stage_in[s].pop(m)
        keys = float_keys(carry)
        with tf.device(engine.devices[s]), tf.control_dependencies(self.previous[s]):
            self.started(s, list(carry.values()) + list(self.grad_in[s + 1].get(m, {}).values() if not last else []))
            tape, out, loss = self._tape(s, m, carry, keys)
            if last:
                targets, seeds = [loss], None
            else:
                # Only outputs the loss depends on come back (e.g. pass-through "attention" does not).
                received = self.grad_in[s + 1].pop(m)
                targets = [out[k] for k in received]
                seeds = [received[k] for k in received]
            sources = [carry[k] for k in keys] + self.stage_vars[s]
            grads = tape.gradient(targets, sources, output_gradients=seeds) if targets else [None] * len(sources)
            self.grad_in[s][m] = {k: g for k, g in zip(keys, grads[: len(keys)]) if g is not None}
            for i, g in enumerate(grads[len(keys):]):
                if g is None:
                    continue
                g = tf.convert_to_tensor(g)  # embedding gradients arrive as IndexedSlices
                self.acc[s][i] = g if self.acc[s][i] is None else self.acc[s][i] + g
        self.stage_out[s].pop(m, None)
        self.mark(s, BACKWARD, m, list(self.grad_in[s][m].values()) + [g for g in self.acc[s] if g is not None])

    def _tape(self, s: int, m: int, carry: Carry, keys: list[str]) -> tuple[tf.GradientTape, Carry, Any]:
        """F's tape, outputs and loss; with recomputation, the stage's forward run again under a new tape."""
        if not self.engine.recompute:
            return self.tapes[s].pop(m), self.stage_out[s][m], self.losses.get(m)
        tape = tf.GradientTape()
        with tape:
            tape.watch([carry[k] for k in keys])
            out, loss = self.engine.stage_forward(s, carry, self.micro[m])
        return tape, out, loss

    # ------------------------------------------------------------------------------------- clocks
    def started(self, s: int, inputs: list[tf.Tensor]) -> None:
        self.starts[s].append(clock(inputs + self.previous[s]))  # inputs here and the stage free

    def mark(self, s: int, kind: str, m: int, tensors: list[tf.Tensor]) -> None:
        """Op (s, kind, m) is done when `tensors` exist: its end clock; the next op on stage s waits for them."""
        with tf.device(self.engine.devices[s]):
            end = clock(tensors)
        # A stage runs one op at a time: clip this op's start to the previous op's end, so clock
        # jitter between the two never counts the same moment twice.
        start = self.starts[s][-1] if not self.stage_end[s] else tf.maximum(self.starts[s][-1], self.stage_end[s][-1])
        self.busy[s].append(end - start)
        self.stage_end[s].append(end)
        self.ends.append(end)
        self.intervals.append(tf.stack([start, end]))
        self.labels.append((s, kind, m))
        self.previous[s] = tensors
        self.markers[(s, kind, m)] = tensors

    # ------------------------------------------------------------------------------------- result
    def result(self, slots: list[tuple[int, int]]) -> tuple[tf.Tensor, list, dict[str, tf.Tensor]]:
        """(loss, one gradient per variable in `slots` order, extras): see `PipelineEngine.gradients`."""
        with tf.device(self.engine.devices[-1]):
            per_micro = tf.stack([self.losses[m] for m in range(self.engine.micro_batches)])
            loss = tf.reduce_sum(per_micro)
        grads = [self.acc[s][i] for s, i in slots]
        span = tf.reduce_max(tf.stack(self.ends)) - tf.reduce_min(tf.stack([t for st in self.starts for t in st]))
        stage_wall = tf.cast(tf.stack([tf.add_n(b) for b in self.busy]), tf.float32)
        stage_busy = tf.cast(compute_seconds(self.labels, self.busy), tf.float32)
        return loss, grads, {"micro_batch_losses": per_micro, "stage_busy_s": stage_busy, "stage_wall_s": stage_wall,
                             "step_span_s": tf.cast(span, tf.float32), "op_intervals": tf.stack(self.intervals)}


def compute_seconds(labels: Sequence[tuple[int, str, int]], durations: Sequence[Sequence[tf.Tensor]]) -> tf.Tensor:
    """float64 [K]: per stage, the seconds its ops needed to compute, estimated from this step's clocks.

    An op's wall-clock duration (`durations[s]`, in `labels` order per stage) also counts the time its
    kernels waited for a thread or a core that another stage held: where stages share cores (logical CPU
    devices, one process-wide thread pool) an op runs slower while another stage runs, so summed wall
    time can report more stage-seconds per step-second than any schedule allows (1.64 against the GPipe
    bound of 1.60 at K=2, M=4). Every F (or B) op of a stage does the same work on an equal micro-batch, so
    the fastest of them in this step is the closest measure of that work done without waiting; each op
    is counted at that duration. Then every op lasts at least its counted time, so the stages' summed
    compute fits the schedule's critical path: overlap = sum / span stays under K*M/(M+K-1) (balanced
    stages; lower otherwise), and contention shows as lower overlap, not as more busy time.
    """
    per_stage = []
    for s, stage_durations in enumerate(durations):
        kinds = [kind for (stage, kind, _) in labels if stage == s]
        total = tf.constant(0.0, tf.float64)
        for kind in sorted(set(kinds)):
            ops = [d for d, k in zip(stage_durations, kinds, strict=True) if k == kind]
            same = tf.reshape(tf.stack(ops), [len(ops)])
            # A start clock can run after its op's end clock (both wait only for data, and a busy thread pool
            # may run the start late): such a duration says nothing, so the fastest is taken among the others.
            measured = tf.where(same > 0.0, same, tf.constant(float("inf"), tf.float64))
            fastest = tf.reduce_min(measured)
            total += len(ops) * tf.where(tf.math.is_inf(fastest), tf.constant(0.0, tf.float64), fastest)
        per_stage.append(total)
    return tf.stack(per_stage)


def float_keys(carry: Mapping[str, tf.Tensor]) -> list[str]:
    """Keys of the differentiable carry values, in a fixed (sorted) order."""
    return sorted(k for k, v in carry.items() if v.dtype.is_floating)


def clock(after: list[tf.Tensor]) -> tf.Tensor:
    """Wall-clock seconds (float64) taken once every tensor in `after` exists, on the current device.

    A *stateless* host callback fed a one-element slice of each tensor. Stateful ops (tf.timestamp, a
    stateful py_func) run in program order inside a tf.function, so one stage's clock would wait for
    another stage's earlier-built work and hide the overlap being measured; op determinism (Strata's
    default) also forbids tf.timestamp. The slices are data edges, so the clock cannot run early.
    """
    probes = [tf.reshape(t, [-1])[:1] for t in after]
    return tf.numpy_function(_perf_counter, probes, tf.float64, stateful=False)


def _perf_counter(*_probes: np.ndarray) -> np.float64:
    return np.float64(time.perf_counter())
