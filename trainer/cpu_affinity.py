"""Opt-in CPU pinning for a rank: `STRATA_PIN_CPU=1` pins this process to one core, chosen by local rank.

For CPU-only benchmarks (bench/scaling.py) where each rank should own one core. Ranks started by
horovodrun, mpirun or `strata launch --backend multi_worker` cannot be wrapped in `taskset`, so each rank
pins itself. The core is the (local_rank % n)-th of the n cores this process may use (all of them unless a
parent already restricted it). Linux only; off unless the variable is set.

Must run before TensorFlow, Horovod or anything else starts a thread: `sched_setaffinity(0, ...)` sets the
calling thread, and only threads created afterwards inherit it. The local rank comes from the first of
STRATA_LOCAL_RANK (strata launch), HOROVOD_LOCAL_RANK (horovodrun --gloo), OMPI_COMM_WORLD_LOCAL_RANK
(mpirun), else 0.
"""
from __future__ import annotations

import os

from launch.contract import ENV_PIN_CPU, LAUNCHER_LOCAL_RANK_VARS, env_int


def pin_from_env() -> int | None:
    """Pin to one core if STRATA_PIN_CPU=1; return that core, or None when pinning is off."""
    if os.environ.get(ENV_PIN_CPU) != "1":
        return None
    local_rank = env_int(os.environ, LAUNCHER_LOCAL_RANK_VARS, 0)
    allowed = sorted(os.sched_getaffinity(0))
    core = allowed[local_rank % len(allowed)]
    os.sched_setaffinity(0, {core})
    return core
