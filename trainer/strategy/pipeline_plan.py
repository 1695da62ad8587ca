"""Pure planning for pipeline parallelism: which levels go on which stage, and how micro-batches flow.

A Strata model is an ordered list of levels f = f_n ∘ … ∘ f_1 (`LevelModel.level_names`). Pipeline
parallelism cuts that list into K contiguous **stages**, one per device, and splits each replica's batch
into M **micro-batches** so that the stages can work on different micro-batches at the same time.

This module only plans; it never builds or runs a model:

* partition   - `explicit_partition` checks a user-written split, `balanced_partition` finds the split
                whose slowest stage is fastest (exact dynamic programming, optional memory limits);
* schedules   - `gpipe_schedule` and `one_f_one_b_schedule` list, per stage, the order of forward ("F")
                and backward ("B") ops; `simulate` replays them under a unit-time model, which is how the
                tests show the bubble and the peak number of live activations of each schedule;
* plan        - `validate_pipeline`, `PipelinePlan.warnings` and `format_plan` back `strata plan`.

It imports no TensorFlow (only the standard library), so plans and their errors cost milliseconds and
the launcher can check a pipeline config before any worker starts. Errors are `ValueError`s with a
one-line message that names the stage/level and the fix, like the rest of Strata's user errors.

Conventions: stages and micro-batches are 0-indexed; stage 0 holds the first levels (it reads the
input) and stage K-1 the last ones (it computes the loss). A partition is a list of half-open level
index ranges `(start, stop)`, one per stage, exactly what `LevelModel.run_levels(carry, start, stop)`
takes.
"""
from __future__ import annotations

import difflib
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

Partition = list[tuple[int, int]]
# One op of a schedule: ("F", m) is the forward of micro-batch m on a stage, ("B", m) its backward.
Op = tuple[str, int]
Schedule = list[list[Op]]

FORWARD = "F"
BACKWARD = "B"

# A pipeline with M micro-batches on K stages idles (K-1)/(M+K-1) of the time; M >= 4K keeps that
# below ~20%, the rule of thumb from the GPipe paper.
MICRO_BATCHES_PER_STAGE = 4
# Above this slowest-stage/mean-stage cost ratio, the slowest stage wastes >20% of the other stages' time.
IMBALANCE_LIMIT = 1.25

# Relative slack for "summed memory <= capacity": per-level estimates summed in another order must not
# flip a split that fits exactly (0.1 + 0.2 > 0.3 in floating point).
_MEMORY_RTOL = 1e-9


# ============================================================================================ partition
def explicit_partition(level_names: Sequence[str], stages: Sequence[Sequence[str]]) -> Partition:
    """Turn the user's per-stage level lists into half-open level index ranges, one per stage.

    The stages must be non-empty, list the model's levels in the model's order, and together name every
    level exactly once (so each stage is a contiguous slice). Raises ValueError naming the offending level.
    """
    names = list(level_names)
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in index:
            raise ValueError(f"the model has two levels named {name!r}; level names must be unique")
        index[name] = i
    if not names:
        raise ValueError("the model has no levels to split into stages")
    if not stages:
        raise ValueError("no stages given; list the levels of each stage, e.g. [[...], [...]]")

    stage_of: dict[str, int] = {}
    for s, stage in enumerate(stages):
        if isinstance(stage, str):  # ["a", "b"] instead of [["a"], ["b"]]: a common YAML slip
            raise ValueError(f"stage {s} is the string {stage!r}; each stage must be a list of level names")
        if not stage:
            raise ValueError(f"stage {s} is empty; give every stage at least one level")
        for name in stage:
            if name not in index:
                guess = difflib.get_close_matches(str(name), names, n=1)
                hint = f"; did you mean {guess[0]!r}?" if guess else ""
                raise ValueError(f"unknown level {name!r}; levels are: {', '.join(names)}{hint}")
            if name in stage_of:
                first = stage_of[name]
                if first == s:
                    raise ValueError(f"level {name!r} is listed twice in stage {s}; list it once")
                raise ValueError(
                    f"level {name!r} is in stage {first} and stage {s}; keep it in one stage"
                )
            stage_of[name] = s

    # Listed in model order <=> the concatenation of the stages has strictly increasing level indices.
    flat = [(index[name], name, s) for s, stage in enumerate(stages) for name in stage]
    for (i_prev, prev, s_prev), (i, name, s) in zip(flat, flat[1:]):
        if i < i_prev:
            raise ValueError(
                f"stages must follow the model's level order: {name!r} (stage {s}) is listed after "
                f"{prev!r} (stage {s_prev}); the model runs {', '.join(names)}"
            )

    for i, name in enumerate(names):
        if name not in stage_of:
            # Suggest the stage(s) next to the gap, the only places it can go and stay contiguous.
            before = next((stage_of[n] for n in reversed(names[:i]) if n in stage_of), None)
            after = next((stage_of[n] for n in names[i + 1:] if n in stage_of), None)
            where = sorted({s for s in (before, after) if s is not None})
            fix = " or ".join(f"stage {s}" for s in where)
            raise ValueError(f"level {name!r} is in no stage; add it to {fix}")

    return [(index[stage[0]], index[stage[-1]] + 1) for stage in stages]


def balanced_partition(
    costs: Sequence[float],
    stages: int,
    *,
    memory: Sequence[float] | None = None,
    capacity: Sequence[float] | float | None = None,
) -> Partition:
    """The contiguous split of levels into exactly `stages` non-empty stages whose slowest stage is fastest.

    `costs[i]` is level i's time per micro-batch (any unit). With `memory` (per level) and `capacity`
    (per stage, or one number for all), every stage's summed memory must fit its capacity.

    Exact dynamic programming in O(stages x levels^2). Among all optimal splits it returns the one with
    the earliest boundaries (lexicographically smallest), so equal inputs always give the same plan.
    Raises ValueError when there are more stages than levels, or when no split fits in memory (naming the
    stage of the least over-full split).
    """
    n = len(costs)
    _check_numbers("costs", costs)
    if n == 0:
        raise ValueError("no level costs given; pass one cost per level")
    _check_stage_count(stages, n)
    if (memory is None) != (capacity is None):
        raise ValueError("pass both memory (per level) and capacity (per stage), or neither")
    caps: list[float] | None = None
    if memory is not None and capacity is not None:
        if len(memory) != n:
            raise ValueError(f"memory has {len(memory)} entries but there are {n} levels; give one per level")
        _check_numbers("memory", memory)
        caps = [float(capacity)] * stages if isinstance(capacity, (int, float)) else list(capacity)
        if len(caps) != stages:
            raise ValueError(f"capacity has {len(caps)} entries but there are {stages} stages; give one per stage")
        _check_numbers("capacity", caps)

    # Prefix sums make every stage total the same float expression in the DP and in the reconstruction,
    # so the "<= optimum" test in `_min_max_split` is exact.
    cost_prefix = _prefix(costs)
    mem_prefix = _prefix(memory) if memory is not None else None

    def fits(k: int, i: int, j: int) -> bool:
        if caps is None or mem_prefix is None:
            return True
        need = mem_prefix[j] - mem_prefix[i]
        return need <= caps[k] + _MEMORY_RTOL * max(1.0, abs(caps[k]))

    split = _min_max_split(n, stages, lambda k, i, j: cost_prefix[j] - cost_prefix[i], fits)
    if split is not None:
        return split

    # No split fits. Report the least-bad one: the split minimising the worst overflow (need - capacity),
    # and its most over-full stage, which is the smallest requirement that must change.
    assert caps is not None and mem_prefix is not None
    mp, cp = mem_prefix, caps
    worst = _min_max_split(n, stages, lambda k, i, j: (mp[j] - mp[i]) - cp[k], lambda k, i, j: True)
    assert worst is not None  # unconstrained: stages <= levels was checked
    over = [(mp[j] - mp[i]) - cp[k] for k, (i, j) in enumerate(worst)]
    k = max(range(stages), key=lambda s: (over[s], -s))
    i, j = worst[k]
    levels = f"level {i}" if j - i == 1 else f"levels {i}-{j - 1}"
    raise ValueError(
        f"no split of {_plural(n, 'level')} into {_plural(stages, 'stage')} fits in memory: "
        f"at best stage {k} ({levels}) needs {_num(mp[j] - mp[i])} but its capacity is {_num(cp[k])}; "
        f"add stages or capacity, or shrink those levels"
    )


def _min_max_split(
    n: int,
    stages: int,
    value: Callable[[int, int, int], float],
    allowed: Callable[[int, int, int], bool],
) -> Partition | None:
    """Split [0, n) into `stages` non-empty ranges minimising max value(k, start, stop); None if none allowed.

    best[k][i] = the optimum for levels [i, n) on stages k..K-1. A suffix table lets the reconstruction
    walk forward and take, for each stage, the EARLIEST stop that still reaches the optimum.
    """
    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    best[stages][n] = 0.0 if stages else inf
    for k in range(stages - 1, -1, -1):
        later = stages - k - 1  # stages after k, each needs at least one level
        for i in range(k, n - later):
            row = best[k + 1]
            b = inf
            for j in range(i + 1, n - later + 1):
                if row[j] == inf or not allowed(k, i, j):
                    continue
                v = max(value(k, i, j), row[j])
                if v < b:
                    b = v
            best[k][i] = b
    optimum = best[0][0]
    if optimum == inf:
        return None
    split: Partition = []
    i = 0
    for k in range(stages):
        later = stages - k - 1
        for j in range(i + 1, n - later + 1):
            if best[k + 1][j] != inf and allowed(k, i, j) and max(value(k, i, j), best[k + 1][j]) <= optimum:
                split.append((i, j))
                i = j
                break
        else:  # pragma: no cover - the table guarantees a stop exists
            raise AssertionError("partition reconstruction failed")
    return split


def stage_costs(costs: Sequence[float], partition: Sequence[tuple[int, int]]) -> list[float]:
    """Summed level cost of each stage (the stage's time per micro-batch)."""
    _check_partition(len(costs), partition)
    return [math.fsum(costs[i:j]) for i, j in partition]


def imbalance(costs: Sequence[float], partition: Sequence[tuple[int, int]]) -> float:
    """Slowest stage / mean stage cost: 1.0 is perfectly balanced, 2.0 means the pipeline runs at half speed."""
    per_stage = stage_costs(costs, partition)
    mean = math.fsum(per_stage) / len(per_stage)
    return max(per_stage) / mean if mean > 0 else 1.0


def stage_level_names(level_names: Sequence[str], partition: Sequence[tuple[int, int]]) -> list[list[str]]:
    """The level names of each stage of `partition` (for `PipelinePlan.stage_levels`)."""
    _check_partition(len(level_names), partition)
    return [list(level_names[i:j]) for i, j in partition]


def _check_partition(n: int, partition: Sequence[tuple[int, int]]) -> None:
    if not partition:
        raise ValueError("the partition has no stages")
    expected = 0
    for s, (i, j) in enumerate(partition):
        if i != expected or j <= i:
            raise ValueError(
                f"stage {s} covers levels [{i}, {j}) but must start at level {expected} and be non-empty"
            )
        expected = j
    if expected != n:
        raise ValueError(f"the partition covers levels [0, {expected}) but the model has {n} levels")


def _check_stage_count(stages: int, levels: int) -> None:
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
        raise ValueError(f"stages must be a positive integer, got {stages!r}")
    if stages > levels:
        raise ValueError(f"more stages ({stages}) than levels ({levels}); use at most {levels} stages")


def _check_numbers(what: str, values: Sequence[float]) -> None:
    for i, v in enumerate(values):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{what}[{i}] is {v!r}; it must be a finite number >= 0")


def _prefix(values: Sequence[float]) -> list[float]:
    out = [0.0]
    for v in values:
        out.append(out[-1] + float(v))
    return out


# ============================================================================================ schedules
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
    f_time = _per_stage("forward_time", forward_time, k_stages)
    b_time = _per_stage("backward_time", backward_time, k_stages)

    # Since each stage's order is fixed, an op's start time is max(its stage's previous end, its inputs'
    # ends): a longest-path computation, done here with a worklist so it stays linear in the op count.
    done: list[dict[Op, float]] = [{} for _ in range(k_stages)]  # op -> end time
    timings: list[list[OpTiming]] = [[] for _ in range(k_stages)]
    next_op = [0] * k_stages
    free_at = [0.0] * k_stages

    def inputs(s: int, op: Op) -> list[tuple[int, Op]]:
        kind, m = op
        if kind == FORWARD:
            return [(s - 1, op)] if s > 0 else []
        deps = [(s, (FORWARD, m))]
        if s < k_stages - 1:
            deps.append((s + 1, op))
        return deps

    pending = deque(range(k_stages))
    queued = [True] * k_stages
    while pending:
        s = pending.popleft()
        queued[s] = False
        ops = schedule[s]
        while next_op[s] < len(ops):
            op = ops[next_op[s]]
            deps = inputs(s, op)
            if any(d_op not in done[d_s] for d_s, d_op in deps):
                break  # woken again when the missing input finishes
            start = max([free_at[s]] + [done[d_s][d_op] for d_s, d_op in deps])
            end = start + (f_time[s] if op[0] == FORWARD else b_time[s])
            done[s][op] = end
            free_at[s] = end
            timings[s].append(OpTiming(op[0], op[1], start, end))
            next_op[s] += 1
            # Wake the neighbours that may have been waiting on this op.
            for t in (s - 1, s + 1):
                if 0 <= t < k_stages and not queued[t] and next_op[t] < len(schedule[t]):
                    queued[t] = True
                    pending.append(t)

    stuck = [s for s in range(k_stages) if next_op[s] < len(schedule[s])]
    if stuck:
        waits = []
        for s in stuck:
            op = schedule[s][next_op[s]]
            missing = [f"{d_op[0]}{d_op[1]} on stage {d_s}" for d_s, d_op in inputs(s, op) if d_op not in done[d_s]]
            waits.append(f"stage {s} waits at {op[0]}{op[1]} for {' and '.join(missing)}")
        raise ScheduleDeadlock("schedule deadlocks: " + "; ".join(waits))

    makespan = max(free_at)
    busy = [math.fsum(t.end - t.start for t in stage) for stage in timings]
    total = k_stages * makespan
    bubble = 1.0 - math.fsum(busy) / total if total > 0 else 0.0
    stage_bubble = [1.0 - b / makespan if makespan > 0 else 0.0 for b in busy]

    # Ops on one stage are sequential, so walking them in order counts live activations exactly.
    peak_live = []
    for stage in timings:
        live = peak = 0
        for t in stage:
            live += 1 if t.kind == FORWARD else -1
            peak = max(peak, live)
        peak_live.append(peak)

    return Timeline(k_stages, micro_batches, timings, makespan, busy, bubble, stage_bubble, peak_live)


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
    _check_numbers(what, values)
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


# ============================================================================================ plan
def validate_pipeline(
    global_batch: int,
    replicas: int,
    micro_batches: int,
    stages: int,
    levels: int | Sequence[str],
    devices: int | Sequence[str],
) -> tuple[int, int]:
    """Check that a pipeline config can run; returns (per-replica batch, micro-batch size).

    `levels` and `devices` are counts or lists (of level names / device names). Each replica is a full
    pipeline of `stages` devices, so the job needs stages x replicas devices.
    """
    for what, v in (("global batch", global_batch), ("replicas", replicas),
                    ("micro_batches", micro_batches), ("stages", stages)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{what} must be a positive integer, got {v!r}")
    n_levels = levels if isinstance(levels, int) else len(levels)
    n_devices = devices if isinstance(devices, int) else len(devices)

    if global_batch % replicas:
        raise ValueError(
            f"replicas ({replicas}) must divide the global batch ({global_batch}); "
            f"try a global batch of {_round_up(global_batch, replicas)}"
        )
    per_replica = global_batch // replicas
    if per_replica % micro_batches:
        raise ValueError(
            f"micro_batches ({micro_batches}) must divide the per-replica batch ({per_replica}); "
            f"try micro_batches={_nearest_divisor(per_replica, micro_batches)}"
        )
    if stages > n_levels:
        raise ValueError(f"more stages ({stages}) than levels ({n_levels}); use at most {n_levels} stages")
    if stages > n_devices:
        raise ValueError(f"more stages ({stages}) than devices ({n_devices}); use at most {n_devices} stages")
    if stages * replicas > n_devices:
        raise ValueError(
            f"stages ({stages}) x replicas ({replicas}) needs {stages * replicas} devices but there are "
            f"{n_devices}; use replicas={n_devices // stages}"
        )
    return per_replica, per_replica // micro_batches


def stage_device_names(stages: int, local_rank: int, gpus: int, explicit: Sequence[str] | None = None) -> list[str]:
    """One device per stage for a rank: the explicit list, else the local rank's block of `stages` GPUs
    (`/gpu:local_rank*K .. +K-1`), else `stages` logical CPU devices (`/cpu:0 ..`)."""
    if explicit is not None:
        return list(explicit)
    if gpus:
        return [f"/gpu:{local_rank * stages + s}" for s in range(stages)]
    return [f"/cpu:{s}" for s in range(stages)]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _nearest_divisor(n: int, target: int) -> int:
    """The divisor of n closest to target (the smaller one on a tie: fewer micro-batches, bigger ones)."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - target), d))


@dataclass
class PipelinePlan:
    """Everything `strata plan` prints about one pipeline-parallel job.

    Memory estimates are optional; when given they are in bytes. `stage_activation_bytes` is the
    activation memory of ONE micro-batch on a stage: the plan multiplies it by how many micro-batches the
    schedule keeps alive on that stage (GPipe: M on every stage, 1F1B: min(K - s, M)).
    """

    stages: int
    micro_batches: int
    schedule: str  # "gpipe" or "1f1b"
    stage_levels: list[list[str]]
    global_batch: int
    replicas: int = 1
    stage_params: list[int] | None = None  # parameter count per stage
    stage_activation_bytes: list[float] | None = None  # per stage, per micro-batch
    stage_costs: list[float] | None = None  # seconds per micro-batch per stage (for the imbalance warning)
    devices: list[str] | None = None  # device of each stage (first replica); default "GPU:s"
    device_memory_bytes: float | list[float] | None = None  # one number for all devices or one per stage
    # fp32 weights + fp32 gradients + Adam's two fp32 moments = 16 bytes per parameter.
    bytes_per_param: float = 16.0
    # Recomputation: each live micro-batch keeps only the stage's input (boundary) activations, plus one
    # micro-batch's full activations while its backward re-runs the forward.
    recompute: bool = False
    stage_boundary_bytes: list[float] | None = None  # per stage, per micro-batch
    balanced: bool = False  # the split is already the best contiguous one for `stage_costs`
    # Simulated once per (schedule, stages, micro_batches): format_plan asks for it on every row.
    _peak_live: dict[tuple[str, int, int], list[int]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; use one of: {', '.join(SCHEDULES)}")
        _check_schedule_args(self.stages, self.micro_batches)
        for what in ("stage_levels", "stage_params", "stage_activation_bytes", "stage_costs", "devices",
                     "stage_boundary_bytes"):
            values = getattr(self, what)
            if values is not None and len(values) != self.stages:
                raise ValueError(f"{what} has {len(values)} entries but there are {self.stages} stages")
        if isinstance(self.device_memory_bytes, list) and len(self.device_memory_bytes) != self.stages:
            raise ValueError(
                f"device_memory_bytes has {len(self.device_memory_bytes)} entries but there are {self.stages} stages"
            )

    # ------------------------------------------------------------------------ derived numbers
    @property
    def per_replica_batch(self) -> int:
        return self.global_batch // self.replicas

    @property
    def micro_batch_size(self) -> int:
        return self.per_replica_batch // self.micro_batches

    @property
    def bubble(self) -> float:
        """Idle fraction for equal stages, (K-1)/(M+K-1)."""
        return theoretical_bubble(self.stages, self.micro_batches)

    @property
    def peak_live(self) -> list[int]:
        """Per stage, micro-batches whose activations are alive at once under this schedule."""
        key = (self.schedule, self.stages, self.micro_batches)
        if key not in self._peak_live:
            self._peak_live[key] = peak_live_micro_batches(*key)
        return self._peak_live[key]

    def device(self, stage: int) -> str:
        return self.devices[stage] if self.devices is not None else f"GPU:{stage}"

    def param_bytes(self, stage: int) -> float | None:
        if self.stage_params is None:
            return None
        return self.stage_params[stage] * self.bytes_per_param

    def activation_bytes(self, stage: int) -> float | None:
        """Peak activation memory of a stage: per-micro-batch bytes x micro-batches alive at once."""
        if self.stage_activation_bytes is None:
            return None
        if self.recompute and self.stage_boundary_bytes is not None:
            return self.stage_boundary_bytes[stage] * self.peak_live[stage] + self.stage_activation_bytes[stage]
        return self.stage_activation_bytes[stage] * self.peak_live[stage]

    def memory_bytes(self, stage: int) -> float | None:
        """Estimated peak memory of a stage (parameters + activations), None with no estimate at all."""
        parts = [p for p in (self.param_bytes(stage), self.activation_bytes(stage)) if p is not None]
        return sum(parts) if parts else None

    def device_memory(self, stage: int) -> float | None:
        cap = self.device_memory_bytes
        return cap[stage] if isinstance(cap, list) else cap

    # ------------------------------------------------------------------------ warnings
    def warnings(self) -> list[str]:
        """One line per problem worth fixing before a long run (empty when the plan looks fine)."""
        out: list[str] = []
        k, m = self.stages, self.micro_batches
        if k > 1 and m < MICRO_BATCHES_PER_STAGE * k:
            out.append(
                f"micro_batches ({m}) < {MICRO_BATCHES_PER_STAGE} x stages ({k}): bubble {self.bubble:.0%}; "
                f"use >= {MICRO_BATCHES_PER_STAGE * k}"
            )
        if self.stage_costs is not None and k > 1:
            mean = math.fsum(self.stage_costs) / k
            ratio = max(self.stage_costs) / mean if mean > 0 else 1.0
            if ratio > IMBALANCE_LIMIT:
                slowest = max(range(k), key=lambda s: (self.stage_costs[s], -s))  # type: ignore[index]
                fix = (f"no contiguous split does better: make the heaviest level of stage {slowest} "
                       "smaller (e.g. more, thinner layers) or use fewer stages" if self.balanced else
                       f"move levels off stage {slowest} or use partition: auto")
                out.append(  # in ms, like the measured level table printed next to it
                    f"stages are unbalanced: {', '.join(_ms(c) for c in self.stage_costs)} per micro-batch "
                    f"(slowest/mean {ratio:.2f} > {IMBALANCE_LIMIT}); {fix}"
                )
        for s in range(k):
            need, cap = self.memory_bytes(s), self.device_memory(s)
            if need is None or cap is None or need <= cap:
                continue
            # GPipe keeps all M micro-batches alive; 1F1B caps that at K - s, often the cheapest fix.
            acts = self.activation_bytes(s)
            fix = "use the 1f1b schedule (fewer live micro-batches), " if self.schedule == "gpipe" and acts else ""
            out.append(
                f"stage {s} needs ~{_bytes(need)} ({self._memory_parts(s)}) but {self.device(s)} has "
                f"{_bytes(cap)}; {fix}move levels off stage {s} or use more stages"
            )
        return out

    def _memory_parts(self, stage: int) -> str:
        parts = []
        params = self.param_bytes(stage)
        if params is not None:
            parts.append(f"params {_bytes(params)}")
        if self.stage_activation_bytes is not None:
            parts.append(f"activations {self._activation_formula(stage)}")
        return " + ".join(parts)

    def _activation_formula(self, stage: int) -> str:
        """How a stage's activation memory adds up, e.g. `4 x 1.0 MiB` or `4 x 64 KiB inputs + 1.0 MiB`."""
        assert self.stage_activation_bytes is not None
        live, full = self.peak_live[stage], _bytes(self.stage_activation_bytes[stage])
        if self.recompute and self.stage_boundary_bytes is not None:
            return f"{live} x {_bytes(self.stage_boundary_bytes[stage])} inputs + {full} recomputed"
        return f"{live} x {full}"


def format_plan(plan: PipelinePlan) -> str:
    """A readable multi-line summary: one table row per stage, then schedule, bubble and batch sizes."""
    header = ["stage", "device", "levels", "params", "activation memory"]
    rows = []
    for s in range(plan.stages):
        params = "-" if plan.stage_params is None else _count(plan.stage_params[s])
        if plan.stage_activation_bytes is None:
            act = "-"
        else:
            act = f"{_bytes(plan.activation_bytes(s) or 0.0)} ({plan._activation_formula(s)})"
        rows.append([str(s), plan.device(s), ", ".join(plan.stage_levels[s]), params, act])
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        return " | ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip()

    k, m = plan.stages, plan.micro_batches
    lines = [
        f"pipeline: {_plural(k, 'stage')} x {_plural(plan.replicas, 'replica')}, "
        f"{_plural(k * plan.replicas, 'device')}",
        line(header),
        "-+-".join("-" * w for w in widths),
        *(line(r) for r in rows),
        f"schedule: {plan.schedule}, {_plural(m, 'micro-batch', 'micro-batches')} per step"
        + (", recomputation on" if plan.recompute else ""),
        f"bubble: {plan.bubble:.1%} idle = (K-1)/(M+K-1) = {k - 1}/{m + k - 1}; "
        f"speed-up bound {gpipe_speedup_bound(k, m):.2f}x over one device",
        f"batch: global {plan.global_batch} = {_plural(plan.replicas, 'replica')} "
        f"x {plan.per_replica_batch}; micro-batch size {plan.micro_batch_size} "
        f"({plan.per_replica_batch} / {m})",
    ]
    warnings = plan.warnings()
    if warnings:
        lines.append("warnings:")
        lines.extend(f"  - {w}" for w in warnings)
    return "\n".join(lines)


# ============================================================================================ formatting
def _num(x: float) -> str:
    """A short number: 3, 2.5, 0.125 (no trailing zeros, no float noise)."""
    return f"{x:.4g}"


def _ms(seconds: float) -> str:
    """Seconds shown in milliseconds with the unit, as the level-cost table shows them: 1.25 ms."""
    return f"{_num(seconds * 1e3)} ms"


def _plural(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"


def _count(n: float) -> str:
    """Parameter counts as people say them: 950, 12.3K, 1.2M, 7.0B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    """Bytes in binary units: 512 B, 12.0 MiB, 1.5 GiB."""
    for unit, size in (("TiB", 2.0**40), ("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


__all__ = [
    "FORWARD", "BACKWARD", "IMBALANCE_LIMIT", "MICRO_BATCHES_PER_STAGE", "SCHEDULES",
    "Op", "OpTiming", "Partition", "PipelinePlan", "Schedule", "ScheduleDeadlock", "Timeline",
    "balanced_partition", "explicit_partition", "format_plan", "gpipe_schedule", "gpipe_speedup_bound",
    "imbalance", "make_schedule", "one_f_one_b_schedule", "peak_live_micro_batches", "simulate",
    "stage_costs", "stage_device_names", "stage_level_names", "theoretical_bubble", "validate_pipeline",
]
