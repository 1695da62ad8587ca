"""Heartbeats: each rank says which step and phase it is in, so a hang can be found and reported.

The loop (and a few hooks) only set the current phase in memory, which costs an attribute write; a daemon
thread writes it to disk once a second, so a 3 ms step pays nothing for it. A watchdog compares how long a
rank has been in its current phase with the time that phase is allowed; past it, the job is hung.

File format: `DIR/rank-N.json`, replaced atomically (write a temporary file, then os.replace), one JSON
object with launch/contract.py's HEARTBEAT_FIELDS (rank, host, pid, step, phase, since, written, allowed_s;
phases: contract.PHASES), which launch/watchdog.py reads. DIR is $STRATA_HEARTBEAT_DIR (set by
`strata launch`), else RUN_DIR/heartbeat.

Who watches: under `strata launch` the launcher does (STRATA_WATCHDOG=launcher), because it sees every rank
and can stop them all. Started any other way (horovodrun, mpirun, srun), each rank runs the watchdog in a
thread on its own heartbeat and, past the limit, prints the table and exits WATCHDOG_EXIT_CODE, which makes
that launcher stop the rest.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from launch import contract
from launch.contract import WATCHDOG_EXIT_CODE
from trainer.loop_state import Hook, LoopState

WRITE_EVERY_S = 1.0


class Heartbeat:
    """The current (step, phase) of this rank, written to `directory` by a background thread."""

    def __init__(self, directory: Path, *, rank: int, timeout_s: float, startup_s: float, watch: bool):
        self.path = Path(directory) / contract.heartbeat_file(rank)
        self.rank, self.timeout_s, self.startup_s, self.watch = rank, timeout_s, startup_s, watch
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.step, self.phase, self.since = 0, "startup", time.time()
        self.first_step_done = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="strata-heartbeat", daemon=True)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write()
        self._thread.start()

    def set(self, step: int, phase: str) -> None:
        """Enter `phase` at `step` (called from the training thread; only memory is touched)."""
        if phase == "between steps":
            self.first_step_done = True
        self.step, self.phase, self.since = step, phase, time.time()

    def allowed_s(self) -> float:
        """Start-up and the first step (graph build, rendezvous) get the longer start-up allowance."""
        if self.timeout_s <= 0 or self.phase == "exited":
            return 0.0
        return self.timeout_s if self.first_step_done else max(self.timeout_s, self.startup_s)

    def record(self) -> dict:
        return {"rank": self.rank, "host": self.host, "pid": self.pid, "step": self.step, "phase": self.phase,
                "since": self.since, "written": time.time(), "allowed_s": self.allowed_s()}

    def write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{self.pid}.tmp")
        try:
            tmp.write_text(json.dumps(self.record()))
            os.replace(tmp, self.path)  # readers see the old or the new beat, never half of one
        except OSError:
            pass  # a full or vanished disk must not kill training; the watchdog then sees a stale beat

    def close(self) -> None:
        self.set(self.step, "exited")
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * WRITE_EVERY_S)
        self.write()

    def _run(self) -> None:
        while not self._stop.wait(WRITE_EVERY_S):
            self.write()
            allowed = self.allowed_s()
            if self.watch and allowed and time.time() - self.since > allowed:
                self._abort(allowed)

    def _abort(self, allowed: float) -> None:
        print(f"strata: watchdog: rank {self.rank} made no progress for {time.time() - self.since:.0f} s "
              f"(limit {allowed:.0f} s, train.watchdog_timeout_s); last heartbeat of every rank:\n"
              f"{table(self.path.parent)}\nstrata: watchdog: aborting (exit {WATCHDOG_EXIT_CODE})",
              file=sys.stderr, flush=True)
        os._exit(WATCHDOG_EXIT_CODE)  # the main thread is stuck by definition: only a hard exit ends it


def table(directory: Path) -> str:
    """The rank | host | step | phase | seconds-in-phase table of every heartbeat file in `directory`."""
    now, rows = time.time(), []
    beats = (contract.read_heartbeat(path) for path in Path(directory).glob(contract.HEARTBEAT_GLOB))
    for b in sorted((b for b in beats if b is not None), key=lambda b: int(b["rank"])):
        rows.append(f"  {b['rank']:>4}  {b['host']:<20} {b['step']:>8}  {b['phase']:<22} {now - b['since']:>8.1f}")
    return "\n".join(["  rank  host                     step  phase                  seconds", *rows])


_current: Heartbeat | None = None


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark a phase inside the loop's hooks (checkpoint, eval, ...), then return to the previous one."""
    beat = _current
    if beat is None:
        yield
        return
    previous = beat.phase
    beat.set(beat.step, name)
    try:
        yield
    finally:
        beat.set(beat.step, previous)


def stop_current() -> None:
    """The training loop has returned: this rank's heartbeat says "exited" and its watchdog thread stops. A
    process that goes on after `train()` (a test, a benchmark, a notebook) must not be aborted by the
    watchdog of a loop that has finished."""
    global _current
    if _current is not None:
        _current.close()
        _current = None


class HeartbeatHook(Hook):
    """Marks the loop's own phases; starts the writer thread when training starts."""

    def __init__(self, beat: Heartbeat):
        self.beat = beat

    def on_train_begin(self, state: LoopState) -> None:
        global _current
        _current = self.beat
        self.beat.step = state.step
        self.beat.start()

    def on_step_begin(self, state: LoopState) -> None:
        self.beat.set(state.step, "step")

    def on_step_end(self, state: LoopState) -> None:
        self.beat.set(state.step, "between steps")

    def on_train_end(self, state: LoopState) -> None:
        self.beat.set(state.step, "finishing")


def heartbeat_hooks(run_dir: Path, *, rank: int, timeout_s: float, startup_s: float) -> list[Hook]:
    """The heartbeat hook (none when train.watchdog_timeout_s is 0). The process's exit writes "exited"."""
    if timeout_s <= 0:
        return []
    directory = Path(os.environ.get(contract.ENV_HEARTBEAT_DIR) or Path(run_dir) / contract.HEARTBEAT_DIR)
    beat = Heartbeat(directory, rank=rank, timeout_s=timeout_s, startup_s=startup_s,
                     watch=os.environ.get(contract.ENV_WATCHDOG) != contract.WATCHDOG_IN_LAUNCHER)
    import atexit

    atexit.register(beat.close)
    return [HeartbeatHook(beat)]
