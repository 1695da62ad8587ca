"""How micro-batches flow through pipeline stages (pure: standard library only).

Each replica's batch is split into M **micro-batches** so that the K stages can work on different
micro-batches at the same time. `gpipe_schedule` and `one_f_one_b_schedule` list, per stage, the order of
forward ("F") and backward ("B") ops; `simulate` replays them under a unit-time model, which is how the
tests show the bubble and the peak number of live activations of each schedule. Stages and micro-batches
are 0-indexed.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, NamedTuple

from trainer.parallel.partition import check_numbers

# One op of a schedule: ("F", m) is the forward of micro-batch m on a stage, ("B", m) its backward.
Op = tuple[str, int]
Schedule = list[list[Op]]

FORWARD = "F"
BACKWARD = "B"


def gpipe_schedule(stages: int, micro_batches: int) -> Schedule:
    """GPipe: every stage runs all M forwards, then all M backwards.

    The backwards run in reverse micro-batch order, last micro-batch first. GPipe's backward pass is the
    gradient of the whole forward loop, and reverse-mode autodiff replays a computation last-in first-out;
    it also lets the last stage start B(M-1) right after F(M-1), on the activations it just produced. Under
    the unit-time model either order has the same makespan; the order only decides which activations are
    freed first.
    """
    _check_schedule_args(stages, micro_batches)
    forwards = [(FORWARD, m) for m in range(micro_batches)]
    backwards = [(BACKWARD, m) for m in reversed(range(micro_batches))]
    return [forwards + backwards for _ in range(stages)]


def one_f_one_b_schedule(stages: int, micro_batches: int) -> Schedule:
    """1F1B (PipeDream-Flush, Megatron-LM's non-interleaved schedule).

    Stage s (0 = first) runs w = min(K - s - 1, M) warm-up forwards, exactly enough to keep the stages
    after it busy until the first backward comes back; then alternates F(w + i), B(i) in steady state;
    then runs the remaining backwards in the cool-down. Same bubble as GPipe, but a stage holds the
    activations of at most min(K - s, M) micro-batches instead of M, so memory no longer grows with M.
    """
    _check_schedule_args(stages, micro_batches)
    schedule: Schedule = []
    for s in range(stages):
        warmup = min(stages - s - 1, micro_batches)
        ops: list[Op] = [(FORWARD, m) for m in range(warmup)]
        steady = micro_batches - warmup
        for i in range(steady):
            ops.append((FORWARD, warmup + i))
            ops.append((BACKWARD, i))
        ops.extend((BACKWARD, m) for m in range(steady, micro_batches))
        schedule.append(ops)
    return schedule


SCHEDULES: dict[str, Callable[[int, int], Schedule]] = {
    "gpipe": gpipe_schedule,
    "1f1b": one_f_one_b_schedule,
}


def make_schedule(name: str, stages: int, micro_batches: int) -> Schedule:
    """The schedule called `name` ("gpipe" or "1f1b")."""
    try:
        build = SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; use one of: {', '.join(SCHEDULES)}") from None
    return build(stages, micro_batches)


def _check_schedule_args(stages: int, micro_batches: int) -> None:
    for what, v in (("stages", stages), ("micro_batches", micro_batches)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{what} must be a positive integer, got {v!r}")


class ScheduleDeadlock(ValueError):
    """A schedule whose per-stage op order makes some stage wait forever."""


class OpTiming(NamedTuple):
    """When one op of the schedule ran on its stage."""

    kind: str  # "F" or "B"
    micro_batch: int
    start: float
    end: float


@dataclass(frozen=True)
class Timeline:
    """The result of `simulate`: per-op times and what they imply for the pipeline."""

    stages: int
    micro_batches: int
    ops: list[list[OpTiming]]  # per stage, in execution order
    makespan: float  # time from the first op's start (0) to the last op's end
    busy: list[float]  # per stage, time spent running ops
    bubble: float  # idle fraction of all stages over the makespan: 1 - sum(busy) / (K * makespan)
    stage_bubble: list[float]  # per stage: 1 - busy[s] / makespan
    peak_live: list[int]  # per stage, most micro-batches with forward done and backward not yet done

    def op(self, stage: int, kind: str, micro_batch: int) -> OpTiming:
        """The timing of op (kind, micro_batch) on `stage`."""
        for t in self.ops[stage]:
            if t.kind == kind and t.micro_batch == micro_batch:
                return t
        raise KeyError(f"stage {stage} has no op ({kind!r}, {micro_batch})")


def simulate(
    schedule: Sequence[Sequence[Op]],
    *,
    forward_time: float | Sequence[float] = 1.0,
    backward_time: float | Sequence[float] = 2.0,
) -> Timeline:
    """Replay a schedule: each op starts as soon as its stage is free and its inputs exist.

    Dependencies: F(m) on stage s needs F(m) on s-1 (its input activations); B(m) on stage s needs
    B(m) on s+1 (the gradient of its output) and F(m) on s (its own activations). The last stage's B(m)
    needs only its own F(m) (the loss is computed there). A stage runs its ops one at a time, in order.

    `forward_time`/`backward_time` are one number for all stages or one per stage (e.g. `stage_costs`).
    The default backward = 2 x forward is the usual ratio (a backward computes gradients for both inputs
    and weights). Raises ValueError for a malformed schedule and ScheduleDeadlock if it cannot finish.
    """
    k_stages = len(schedule)
    if k_stages == 0:
        raise ValueError("the schedule has no stages")
    micro_batches = _check_ops(schedule)
    durations = {FORWARD: _per_stage("forward_time", forward_time, k_stages),
                 BACKWARD: _per_stage("backward_time", backward_time, k_stages)}
    timings = _Replay(schedule, durations).run()
    makespan = max((stage[-1].end for stage in timings if stage), default=0.0)
    busy = [math.fsum(t.end - t.start for t in stage) for stage in timings]
    total = k_stages * makespan
    bubble = 1.0 - math.fsum(busy) / total if total > 0 else 0.0
    stage_bubble = [1.0 - b / makespan if makespan > 0 else 0.0 for b in busy]
    return Timeline(k_stages, micro_batches, timings, makespan, busy, bubble, stage_bubble,
                    [_peak_live(stage) for stage in timings])


class _Replay:
    """`simulate`'s longest-path computation. Since each stage's order is fixed, an op starts at max(its
    stage's previous end, its inputs' ends); a worklist of stages keeps it linear in the op count."""

    def __init__(self, schedule: Sequence[Sequence[Op]], durations: dict[str, list[float]]) -> None:
        self.schedule, self.durations, self.k = schedule, durations, len(schedule)
        self.done: list[dict[Op, float]] = [{} for _ in range(self.k)]  # op -> end time
        self.timings: list[list[OpTiming]] = [[] for _ in range(self.k)]
        self.next_op = [0] * self.k
        self.free_at = [0.0] * self.k

    def inputs(self, s: int, op: Op) -> list[tuple[int, Op]]:
        kind, m = op
        if kind == FORWARD:
            return [(s - 1, op)] if s > 0 else []
        deps = [(s, (FORWARD, m))]
        if s < self.k - 1:
            deps.append((s + 1, op))
        return deps

    def run(self) -> list[list[OpTiming]]:
        pending = deque(range(self.k))
        queued = [True] * self.k
        while pending:
            s = pending.popleft()
            queued[s] = False
            while self.advance(s):
                # Wake the neighbours that may have been waiting on this op.
                for t in (s - 1, s + 1):
                    if 0 <= t < self.k and not queued[t] and self.next_op[t] < len(self.schedule[t]):
                        queued[t] = True
                        pending.append(t)
        stuck = [s for s in range(self.k) if self.next_op[s] < len(self.schedule[s])]
        if stuck:
            raise ScheduleDeadlock("schedule deadlocks: " + "; ".join(self.waiting(s) for s in stuck))
        return self.timings

    def advance(self, s: int) -> bool:
        """Run stage s's next op if its inputs are done; False when it must wait (or has no op left)."""
        if self.next_op[s] >= len(self.schedule[s]):
            return False
        op = self.schedule[s][self.next_op[s]]
        deps = self.inputs(s, op)
        if any(d_op not in self.done[d_s] for d_s, d_op in deps):
            return False  # woken again when the missing input finishes
        start = max([self.free_at[s]] + [self.done[d_s][d_op] for d_s, d_op in deps])
        end = start + self.durations[op[0]][s]
        self.done[s][op] = self.free_at[s] = end
        self.timings[s].append(OpTiming(op[0], op[1], start, end))
        self.next_op[s] += 1
        return True

    def waiting(self, s: int) -> str:
        op = self.schedule[s][self.next_op[s]]
        missing = [f"{d_op[0]}{d_op[1]} on stage {d_s}" for d_s, d_op in self.inputs(s, op)
                   if d_op not in self.done[d_s]]
        return f"stage {s} waits at {op[0]}{op[1]} for {' and '.join(missing)}"


def _peak_live(stage: list[OpTiming]) -> int:
    """Most micro-batches with forward done and backward not yet done; ops on one stage are sequential, so
    walking them in order counts live activations exactly."""
    live = peak = 0
    for t in stage:
        live += 1 if t.kind == FORWARD else -1
        peak = max(peak, live)
    return peak


def _check_ops(schedule: Sequence[Sequence[Op]]) -> int:
    """Every stage must run F(m) and B(m) exactly once for the same micro-batches 0..M-1; returns M."""
    micro_batches = sum(1 for kind, _ in schedule[0] if kind == FORWARD)
    if micro_batches == 0:
        raise ValueError("stage 0 runs no forward; a schedule needs at least one micro-batch")
    want = {(kind, m) for kind in (FORWARD, BACKWARD) for m in range(micro_batches)}
    for s, ops in enumerate(schedule):
        seen: set[Op] = set()
        for op in ops:
            if op not in want:
                raise ValueError(
                    f"stage {s} has op {op!r}; ops are ('F', m) or ('B', m) with 0 <= m < {micro_batches}"
                )
            if op in seen:
                raise ValueError(f"stage {s} runs {op!r} twice; run each op once")
            seen.add(op)
        missing = sorted(want - seen, key=lambda o: (o[1], o[0] != FORWARD))
        if missing:
            raise ValueError(f"stage {s} never runs {missing[0]!r}; every stage runs F and B of each micro-batch")
    return micro_batches


def _per_stage(what: str, value: float | Sequence[float], stages: int) -> list[float]:
    values = [float(value)] * stages if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != stages:
        raise ValueError(f"{what} has {len(values)} entries but the schedule has {stages} stages")
    check_numbers(what, values)
    return values


def theoretical_bubble(stages: int, micro_batches: int) -> float:
    """Idle fraction of a flushed pipeline with equal stages: (K-1)/(M+K-1), for GPipe and 1F1B alike."""
    _check_schedule_args(stages, micro_batches)
    return (stages - 1) / (micro_batches + stages - 1)


def gpipe_speedup_bound(stages: int, micro_batches: int) -> float:
    """Best speed-up of K equal stages over one device: K*M/(M+K-1), i.e. K x (1 - bubble)."""
    _check_schedule_args(stages, micro_batches)
    return stages * micro_batches / (micro_batches + stages - 1)


def peak_live_micro_batches(schedule: str, stages: int, micro_batches: int) -> list[int]:
    """Per stage, the most micro-batches whose activations a schedule keeps at once (GPipe: M; 1F1B: min(K-s, M))."""
    return simulate(make_schedule(schedule, stages, micro_batches)).peak_live

