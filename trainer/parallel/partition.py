"""Which levels go on which pipeline stage (pure: standard library only).

A Strata model is an ordered list of levels f = f_n ∘ … ∘ f_1 (`LevelModel.level_names`). Pipeline
parallelism cuts that list into K contiguous **stages**, one per device. A partition is a list of
half-open level index ranges `(start, stop)`, one per stage, exactly what
`LevelModel.run_levels(carry, start, stop)` takes; stage 0 holds the first levels (it reads the input)
and stage K-1 the last ones (it computes the loss).

`explicit_partition` checks a user-written split; `balanced_partition` finds the split whose slowest stage
is fastest (exact dynamic programming, optional memory limits). Errors are `ValueError`s with a one-line
message that names the stage or level and the fix.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Callable

from trainer.parallel.units import num, plural

Partition = list[tuple[int, int]]

# Relative slack for "summed memory <= capacity": per-level estimates summed in another order must not
# flip a split that fits exactly (0.1 + 0.2 > 0.3 in floating point).
_MEMORY_RTOL = 1e-9


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
    check_numbers("costs", costs)
    if n == 0:
        raise ValueError("no level costs given; pass one cost per level")
    _check_stage_count(stages, n)
    caps = _capacities(memory, capacity, levels=n, stages=stages)

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
    assert caps is not None and mem_prefix is not None
    raise _no_split_fits(mem_prefix, caps)


def _capacities(memory: Sequence[float] | None, capacity: Sequence[float] | float | None, *, levels: int,
                stages: int) -> list[float] | None:
    """Per-stage memory capacities (None: no memory limit), after checking `memory` and `capacity` agree."""
    if (memory is None) != (capacity is None):
        raise ValueError("pass both memory (per level) and capacity (per stage), or neither")
    if memory is None or capacity is None:
        return None
    if len(memory) != levels:
        raise ValueError(f"memory has {len(memory)} entries but there are {levels} levels; give one per level")
    check_numbers("memory", memory)
    caps = [float(capacity)] * stages if isinstance(capacity, (int, float)) else list(capacity)
    if len(caps) != stages:
        raise ValueError(f"capacity has {len(caps)} entries but there are {stages} stages; give one per stage")
    check_numbers("capacity", caps)
    return caps


def _no_split_fits(mp: list[float], cp: list[float]) -> ValueError:
    """No split fits: name the least-bad one, the split minimising the worst overflow (need - capacity), and
    its most over-full stage, which is the smallest requirement that must change."""
    n, stages = len(mp) - 1, len(cp)
    worst = _min_max_split(n, stages, lambda k, i, j: (mp[j] - mp[i]) - cp[k], lambda k, i, j: True)
    assert worst is not None  # unconstrained: stages <= levels was checked
    over = [(mp[j] - mp[i]) - cp[k] for k, (i, j) in enumerate(worst)]
    k = max(range(stages), key=lambda s: (over[s], -s))
    i, j = worst[k]
    levels = f"level {i}" if j - i == 1 else f"levels {i}-{j - 1}"
    return ValueError(
        f"no split of {plural(n, 'level')} into {plural(stages, 'stage')} fits in memory: "
        f"at best stage {k} ({levels}) needs {num(mp[j] - mp[i])} but its capacity is {num(cp[k])}; "
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
    """The level names of each stage of `partition` (for `PipelineReport.stage_levels`)."""
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


def check_numbers(what: str, values: Sequence[float]) -> None:
    for i, v in enumerate(values):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{what}[{i}] is {v!r}; it must be a finite number >= 0")


def _prefix(values: Sequence[float]) -> list[float]:
    out = [0.0]
    for v in values:
        out.append(out[-1] + float(v))
    return out

