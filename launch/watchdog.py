"""The launcher's hang watchdog: reads every rank's heartbeat and stops the job when one stops progressing.

Ranks write `DIR/rank-N.json` (atomically replaced; the format is launch/contract.py's HEARTBEAT_FIELDS):
rank, host, pid, step, phase, since (wall time the phase began), written, allowed_s (how long the phase may
last; 0 = unlimited). A rank is hung when it has been in one phase longer
than its allowed_s, or when it started more than `startup_s` ago and has written no heartbeat at all.
When that happens the watchdog prints every rank's last phase side by side and calls `on_hang` once.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from launch import contract
from launch.contract import WATCHDOG_EXIT_CODE

CHECK_EVERY_S = 1.0
_CYCLE = list(contract.PHASES)  # the order a rank passes through its phases after each step


def _progress(beat: dict) -> tuple[int, int]:
    phase = beat.get("phase")
    return beat["step"], _CYCLE.index(phase) if phase in _CYCLE else len(_CYCLE)


def read_beats(directory: Path) -> dict[int, dict]:
    """rank -> its latest heartbeat; unreadable or foreign files are skipped (a beat is replaced atomically)."""
    beats = (contract.read_heartbeat(path) for path in Path(directory).glob(contract.HEARTBEAT_GLOB))
    return {int(beat["rank"]): beat for beat in beats if beat is not None}


def hung_ranks(beats: dict[int, dict], *, world_size: int, now: float, started: float, startup_s: float,
               finished: set[int] = frozenset()) -> list[int]:
    """Ranks past their phase's allowance, or silent past `startup_s` since the job started (pure)."""
    hung = []
    for rank in range(world_size):
        if rank in finished:
            continue
        beat = beats.get(rank)
        if beat is None:
            if startup_s > 0 and now - started > startup_s:
                hung.append(rank)
        elif beat.get("phase") != "exited" and beat.get("allowed_s", 0) > 0 \
                and now - beat["since"] > beat["allowed_s"]:
            hung.append(rank)
    return hung


def format_table(beats: dict[int, dict], *, world_size: int, now: float, hosts: list[str],
                 hung: list[int]) -> str:
    """Every rank's last heartbeat, one row each, the hung ones marked; and which rank is furthest behind,
    since the others usually wait for it in a collective (pure)."""
    lines = [f"  {'rank':>4}  {'host':<16} {'pid':>7} {'step':>7}  {'phase':<21} {'seconds':>8}"]
    for rank in range(world_size):
        beat = beats.get(rank)
        mark = "  <- hung" if rank in hung else ""
        if beat is None:
            lines.append(f"  {rank:>4}  {hosts[rank] if rank < len(hosts) else '?':<16} {'-':>7} {'-':>7}  "
                         f"{'(no heartbeat yet)':<21} {'-':>8}{mark}")
            continue
        lines.append(f"  {rank:>4}  {beat['host']:<16} {beat['pid']:>7} {beat['step']:>7}  {beat['phase']:<21} "
                     f"{now - beat['since']:>8.1f}{mark}")
    progress = {r: _progress(b) for r, b in beats.items() if r < world_size}
    if len(progress) == world_size and len(set(progress.values())) > 1:
        low = min(progress.values())
        behind = [r for r, p in sorted(progress.items()) if p == low]
        b = beats[behind[0]]
        lines.append(f"  furthest behind: rank {', '.join(map(str, behind))} (step {b['step']}, {b['phase']}); "
                     f"the others are waiting for it")
    return "\n".join(lines)


class Watchdog:
    """A daemon thread that checks the heartbeats every second and calls `on_hang()` once, after printing
    the table. `finished()` tells it which ranks have exited (their last beat no longer matters)."""

    def __init__(self, directory: Path, *, world_size: int, hosts: list[str], startup_s: float,
                 on_hang: Callable[[], None], finished: Callable[[], set[int]] = set,
                 err: TextIO | None = None):
        self.directory, self.world_size, self.hosts, self.startup_s = Path(directory), world_size, hosts, startup_s
        self.on_hang, self.finished, self.err = on_hang, finished, err
        self.started = time.time()
        self.fired = threading.Event()
        self.report = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="strata-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def check(self, now: float | None = None) -> bool:
        """One check; True (and the table printed, on_hang called) when a rank is hung."""
        now = time.time() if now is None else now
        beats = read_beats(self.directory)
        hung = hung_ranks(beats, world_size=self.world_size, now=now, started=self.started,
                          startup_s=self.startup_s, finished=self.finished())
        if not hung:
            return False
        worst = max(hung, key=lambda r: now - beats[r]["since"] if r in beats else 0)
        if worst in beats:
            b = beats[worst]
            why = (f"rank {worst} on {b['host']} made no progress for {now - b['since']:.0f} s in phase "
                   f"'{b['phase']}' at step {b['step']} (limit {b['allowed_s']:.0f} s, train.watchdog_timeout_s)")
        else:
            why = f"rank {worst} wrote no heartbeat in {now - self.started:.0f} s (train.watchdog_startup_s)"
        self.report = (f"strata: watchdog: {why}; last heartbeat of every rank:\n"
                       + format_table(beats, world_size=self.world_size, now=now, hosts=self.hosts, hung=hung)
                       + f"\nstrata: watchdog: stopping the job (exit {WATCHDOG_EXIT_CODE})")
        try:
            print(self.report, file=self.err or sys.stderr, flush=True)
        except (OSError, ValueError):
            pass
        self.fired.set()
        self.on_hang()
        return True

    def _run(self) -> None:
        while not self._stop.wait(CHECK_EVERY_S):
            if self.check():
                return


def heartbeat_settings(resolved: dict) -> tuple[float, float]:
    """(train.watchdog_timeout_s, train.watchdog_startup_s) of a resolved config; 0 disables (pure)."""
    train = resolved.get("train", {})
    return float(train.get("watchdog_timeout_s", 0)), float(train.get("watchdog_startup_s", 0))


def heartbeat_dir_for(run_dir: Path, *, all_local: bool) -> Path:
    """Where this launch's ranks write heartbeats: a fresh temporary directory when every rank is on this
    machine (nothing stale, nothing left in the run directory), else RUN_DIR/heartbeat, which remote ranks
    share with the launcher as they share checkpoints; stale beats of an earlier launch are removed."""
    if all_local:
        return Path(tempfile.mkdtemp(prefix="strata-heartbeat-"))
    directory = Path(run_dir).absolute() / contract.HEARTBEAT_DIR
    for stale in directory.glob(contract.HEARTBEAT_GLOB):
        stale.unlink(missing_ok=True)
    return directory


def remove_heartbeat_dir(directory: Path) -> None:
    """Delete a temporary heartbeat directory made by heartbeat_dir_for (never the run directory's)."""
    if Path(directory).name.startswith("strata-heartbeat-"):
        shutil.rmtree(directory, ignore_errors=True)


def supervision_env(heartbeat_dir: Path | None, environ=os.environ) -> dict[str, str]:
    """Variables every launched rank gets: where to write heartbeats, that the launcher watches them (no
    watchdog thread per rank), and preemption handling on (STRATA_PREEMPTION=0 in the launcher's
    environment turns it off): a SIGTERM to any one rank then stops all of them at the same, checkpointed
    step instead of killing one and leaving the rest in a collective (pure)."""
    # STRATA_SUPERVISED: the launcher says what a forwarded Ctrl-C / SIGTERM does, so the ranks need not.
    env = {contract.ENV_PREEMPTION: environ.get(contract.ENV_PREEMPTION, "1"), contract.ENV_SUPERVISED: "1"}
    if heartbeat_dir is not None:
        env[contract.ENV_HEARTBEAT_DIR] = str(heartbeat_dir)
        env[contract.ENV_WATCHDOG] = contract.WATCHDOG_IN_LAUNCHER
    return env
