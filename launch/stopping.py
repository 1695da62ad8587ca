"""Stopping a launched job on Ctrl-C or SIGTERM without losing work, and saying what happened.

The ranks do the stopping (trainer/preemption.py, which this package must not import): a signal to any
one of them makes every rank stop after the same step, the chief saves that step and prints the stop line
(launch/contract.py `stop_line`) before the ranks' last all-reduce, and the ranks exit 130 (Ctrl-C) or 75
(SIGTERM, SIGUSR1). So on a signal the launcher only passes it on to the ranks on this
machine and waits: up to --grace seconds, which must cover reaching the next step and writing a checkpoint.
It does not signal horovodrun, which would SIGKILL its ranks 5 s later (GRACEFUL_TERMINATION_TIME_S, fixed
in Horovod). A second Ctrl-C kills the ranks at once; so does the end of the grace period. Either way the
launcher says which steps will be redone, from the run directory's committed checkpoints.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

from launch import contract

DEFAULT_GRACE_S = 60.0  # --grace: reach the next step, save a checkpoint, exit
FAILURE_GRACE_S = 5.0  # ranks of a failed or hung job cannot checkpoint (a peer is missing): no use waiting


def signal_label(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def committed_step(run_dir: Path | None) -> int | None:
    """The newest committed checkpoint's step in RUN_DIR/checkpoints, or None (none, or no run directory)."""
    try:
        names = os.listdir(Path(run_dir) / contract.CHECKPOINT_DIR) if run_dir is not None else []
    except OSError:
        names = []
    steps = [step for step in map(contract.manifest_step, names) if step is not None]
    return max(steps) if steps else None


def notice(signum: int, grace_s: float) -> str:
    """The launcher's line on the first signal (pure)."""
    again = "; Ctrl-C again to stop at once, without it" if signum == signal.SIGINT else ""
    return (f"strata: {signal_label(signum)}: every rank stops after the same step and saves it (waiting up to "
            f"{grace_s:g} s, --grace){again}")


def stopped(step: int, by: str) -> str:
    return f"strata: stopped at step {step} by {by} (checkpoint saved); run the same command to resume"


def lost(why: str, committed: int | None) -> str:
    """`why` (e.g. `second Ctrl-C: stopping now`) and what the next start redoes (pure)."""
    if committed is None:
        return f"strata: {why} without a checkpoint; there is none yet, so the next start begins at step 0"
    return f"strata: {why} without a checkpoint; steps after {committed} (the last checkpoint) will be redone"


def trainer_descendants(table: dict[int, tuple[int, list[str]]], root: int) -> list[int]:
    """Pids under `root` whose command line runs `-m trainer train` (pure). `table`: pid -> (ppid, argv)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if contract.is_train_command(table[pid][1]):
            found.append(pid)
        todo += children.get(pid, [])
    return sorted(found)


def process_table() -> dict[int, tuple[int, list[str]]]:
    """pid -> (ppid, argv) of every process this user can see, from /proc (Linux)."""
    table = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[-1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
        table[int(name)] = (ppid, argv)
    return table


def local_ranks(root: int) -> list[int]:
    """The trainer processes (ranks) that `root` (horovodrun, mpirun) started on this machine."""
    return trainer_descendants(process_table(), root)


def send(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
