"""Start N worker processes on this machine and supervise them as one job.

Each rank runs in its own session (its own process group), so signalling the group reaches everything the
rank started (data loaders, shell wrappers), and a Ctrl-C in the terminal reaches only the launcher, which
then decides how to stop the ranks. Output of every rank is merged (stdout+stderr) and printed line by line
as `[rank R] ...`.

The job fails fast: as soon as one rank exits non-zero or dies from a signal, the others are told to stop
(SIGTERM to their groups, SIGKILL after a grace period), because a collective job with a missing member
would otherwise hang forever in its next allreduce.
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import BinaryIO, TextIO

from launch.errors import LaunchError

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_STEP = 0.02  # seconds between checks while stopping ranks (normal exits are reported instantly by waiter threads)
_JOIN = 1.0  # at most this long for output threads once ranks are gone (an escaped grandchild may hold a pipe)


def describe_returncode(code: int) -> str:
    """`3`, or `137 (SIGKILL)` for a death by signal (Popen reports -9), in the shell's 128+N convention."""
    if code >= 0:
        return str(code)
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"{128 - code} ({name})"


def _exit_status(code: int) -> int:
    """The launcher's own exit status for a rank's return code: the same number a shell would show."""
    return code if code >= 0 else 128 - code


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # group already empty (or, for PermissionError, no longer ours)


def _group_alive(pgid: int) -> bool:
    """Whether a process group still has a running member.

    killpg(0) alone also counts zombies: dead grandchildren whose parent rank is gone wait for PID 1 to reap
    them, and in many containers PID 1 never does, which would make every stop wait out the whole grace
    period. On Linux, /proc tells zombies apart.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        entries = os.scandir("/proc")
    except OSError:
        return True  # no /proc (not Linux): assume alive; the grace period bounds the wait
    with entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue  # exited while we looked
            # After the ")" closing the command name: state, ppid, pgrp, ...
            fields = stat.rsplit(b")", 1)[-1].split()
            if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                return True
    return False


def _pump(pipe: BinaryIO, prefix: str, out: TextIO, lock: threading.Lock) -> None:
    """Copy one rank's output to `out`, a whole line at a time under `lock` (no interleaving within a line)."""
    with pipe:
        for raw in iter(pipe.readline, b""):
            text = raw.decode("utf-8", "replace")
            if not text.endswith("\n"):
                text += "\n"  # last line without newline: still keep the next rank's prefix on its own line
            with lock:
                try:
                    out.write(prefix + text)
                    out.flush()
                except (OSError, ValueError):
                    pass  # our stdout is closed (e.g. `| head`): keep draining so ranks never block on a full pipe


@contextmanager
def _catch_stop_signals(received: list[int]) -> Iterator[None]:
    """While supervising, SIGINT/SIGTERM to the launcher are recorded instead of killing it, so it can stop
    the ranks first. The handler only appends to a list: anything that takes a lock could deadlock if the
    signal lands while the main thread holds that lock. Only the main thread may install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in _STOP_SIGNALS}

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)

    for s in _STOP_SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


class _Job:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.readers: list[threading.Thread] = []
        self.waiters: list[threading.Thread] = []
        self.exits: queue.Queue[int] = queue.Queue()  # ranks, in the order they exit
        self.received: list[int] = []  # signals sent to the launcher

    def start(self, rank: int, command: list[str], env: dict[str, str]) -> None:
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        assert proc.stdout is not None
        reader = threading.Thread(target=_pump, args=(proc.stdout, f"[rank {rank}] ", self.out, self.lock),
                                  name=f"strata-rank{rank}-output", daemon=True)
        # One thread blocked in wait() per rank: an exit is seen the moment it happens, not at the next poll.
        waiter = threading.Thread(target=lambda: (proc.wait(), self.exits.put(rank)),
                                  name=f"strata-rank{rank}-wait", daemon=True)
        reader.start()
        waiter.start()
        self.readers.append(reader)
        self.waiters.append(waiter)

    def stop(self, ranks: Sequence[int], grace_seconds: float) -> None:
        """SIGTERM the process groups of `ranks`; SIGKILL whatever is left after the grace period (or at once
        if the launcher receives another SIGINT/SIGTERM meanwhile, the usual 'Ctrl-C twice')."""
        pgids = [self.procs[r].pid for r in ranks]  # start_new_session: pgid == leader's pid
        for pgid in pgids:
            _signal_group(pgid, signal.SIGTERM)
        signals_before = len(self.received)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and len(self.received) == signals_before:
            leaders_done = all(self.procs[r].returncode is not None for r in ranks)
            if leaders_done and not any(_group_alive(g) for g in pgids):
                break
            time.sleep(_STEP)
        for pgid in pgids:
            if _group_alive(pgid):
                _signal_group(pgid, signal.SIGKILL)
        for r in ranks:  # SIGKILL cannot be ignored; the bound only guards against a process stuck in the kernel
            self.waiters[r].join(timeout=_JOIN)

    def drain(self) -> None:
        """Let the output threads print what the ranks wrote last (a traceback, usually), within a bound."""
        deadline = time.monotonic() + _JOIN
        for reader in self.readers:
            reader.join(timeout=max(0.0, deadline - time.monotonic()))


def run_local(commands: list[list[str]], envs: list[dict[str, str]], *, grace_seconds: float = 5.0,
              stdout: TextIO | None = None, stderr: TextIO | None = None, host: str = "localhost") -> int:
    """Run rank i as `commands[i]` with the complete environment `envs[i]` (see env.child_environ); supervise.

    Returns 0 when every rank exits 0. When a rank fails, stops the others and returns that rank's status
    (its exit code, or 128+N for death by signal N) after one line on `stderr`. When the launcher gets
    SIGINT/SIGTERM, stops every rank and returns 130/143. `stdout`/`stderr` default to sys.stdout/sys.stderr
    at call time; `host` only names the machine in messages.
    """
    if not commands:
        raise LaunchError("no ranks to start")
    if len(commands) != len(envs):
        raise LaunchError(f"{len(commands)} commands but {len(envs)} environments")
    if any(not c for c in commands):
        raise LaunchError("a rank has an empty command")
    if grace_seconds < 0:
        raise LaunchError(f"grace period {grace_seconds} s must be >= 0")
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr

    def say(line: str) -> None:
        try:
            print(f"strata: {line}", file=err, flush=True)
        except (OSError, ValueError):
            pass

    job = _Job(out)
    with _catch_stop_signals(job.received):
        for rank, (command, env) in enumerate(zip(commands, envs)):
            if job.received:
                break  # stopped while starting: start no more
            try:
                job.start(rank, command, env)
            except OSError as error:
                started = list(range(len(job.procs)))
                job.stop(started, grace_seconds)
                job.drain()
                say(f"cannot start rank {rank} ({command[0]}): {error.strerror or error}; "
                    f"stopped the other {len(started)} rank(s)")
                return 127 if isinstance(error, FileNotFoundError) else 126

        running = set(range(len(job.procs)))
        failed: int | None = None
        while running and not job.received:
            try:
                rank = job.exits.get(timeout=0.1)  # the timeout only bounds how late a launcher signal is seen
            except queue.Empty:
                continue
            running.discard(rank)
            if job.procs[rank].returncode != 0:
                failed = rank
                break

        if job.received:
            signum = job.received[0]
            to_stop = sorted(running)
            job.stop(to_stop, grace_seconds)
            job.drain()
            say(f"received {signal.Signals(signum).name}; stopped {len(to_stop)} running rank(s)")
            return 128 + signum
        if failed is not None:
            others = sorted(running)
            # The failed rank's own group too: whatever it started may outlive it.
            job.stop([failed, *others], grace_seconds)
            job.drain()
            proc = job.procs[failed]
            code = proc.returncode
            say(f"rank {failed} (pid {proc.pid}, host {host}) exited with code {describe_returncode(code)}; "
                f"stopped the other {len(others)} rank(s)")
            return _exit_status(code)
        job.drain()
        return 0
