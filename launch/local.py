"""Start N worker processes on this machine and supervise them as one job.

Each rank runs in its own session (its own process group), so signalling the group reaches everything the
rank started (data loaders, shell wrappers), and a Ctrl-C in the terminal reaches only the launcher, which
then decides how to stop the ranks. Output of every rank is merged (stdout+stderr) and printed line by line
as `[rank R] ...` (contract.rank_prefix, the same under every launcher).

The job fails fast: as soon as one rank exits non-zero or dies from a signal, the others are told to stop
(SIGTERM to their groups, SIGKILL after a grace period), because a collective job with a missing member
would otherwise hang forever in its next allreduce. Two exits are not failures: 75 and 130 (a rank that
stopped on a signal at the step all ranks agreed on, trainer/preemption.py), after which the other ranks,
which stop at the same step, are given time to finish and exit; and the hang watchdog (launch/watchdog.py),
which stops everything when the ranks' heartbeats show no progress. A Ctrl-C or SIGTERM to the launcher is
passed on to the ranks, which stop the same way (launch/stopping.py).
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, TextIO

from launch import contract, stopping
from launch.contract import INTERRUPTED_EXIT_CODE, STOPPED_EXIT_CODES, WATCHDOG_EXIT_CODE, rank_prefix
from launch.errors import LaunchError
from launch.stopping import DEFAULT_GRACE_S, FAILURE_GRACE_S
from launch.watchdog import Watchdog, read_beats

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_STEP = 0.02  # seconds between checks while stopping ranks (normal exits are reported instantly by waiter threads)
_JOIN = 1.0  # at most this long for output threads once ranks are gone (an escaped grandchild may hold a pipe)


def describe_exit(code: int) -> str:
    """`exited with code 3`, or `was killed by SIGKILL (signal 9)` for Popen's -9."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name} (signal {-code})"
    except ValueError:
        return f"was killed by signal {-code}"


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
        self.exit_times: dict[int, float] = {}  # rank -> time.monotonic() of its exit
        self.received: list[int] = []  # signals sent to the launcher

    def start(self, rank: int, command: list[str], env: dict[str, str]) -> None:
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        assert proc.stdout is not None
        reader = threading.Thread(target=_pump, args=(proc.stdout, rank_prefix(rank), self.out, self.lock),
                                  name=f"strata-rank{rank}-output", daemon=True)
        # One thread blocked in wait() per rank: an exit is seen the moment it happens, not at the next poll.
        def wait() -> None:
            proc.wait()
            self.exit_times[rank] = time.monotonic()
            self.exits.put(rank)

        waiter = threading.Thread(target=wait,
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


def run_local(commands: list[list[str]], envs: list[dict[str, str]], *, grace_seconds: float = DEFAULT_GRACE_S,
              stdout: TextIO | None = None, stderr: TextIO | None = None, host: str = "localhost",
              heartbeat_dir: Path | None = None, startup_s: float = 0.0, preempt_wait_s: float = 120.0,
              run_dir: Path | None = None) -> int:
    """Run rank i as `commands[i]` with the complete environment `envs[i]` (see env.child_environ); supervise.

    Returns 0 when every rank exits 0. When a rank fails, stops the others and returns that rank's status
    (its exit code, or 128+N for death by signal N) after one line on `stderr`. When the launcher gets
    SIGINT/SIGTERM, it passes the signal on to every rank, which stop after the same step and checkpoint it
    (launch/stopping.py), waits up to `grace_seconds` for them, and returns 130 (SIGINT) or 75 (SIGTERM);
    a second SIGINT, or the end of the grace period, kills them (130, or 128+N). A rank exiting 75 or 130
    (stopped at the agreed step) is waited for by the others (up to `preempt_wait_s`). With
    `heartbeat_dir`, the hang watchdog watches the ranks' heartbeats there and stops a hung job with
    WATCHDOG_EXIT_CODE. `stdout`/`stderr` default to sys.stdout/sys.stderr at call time; `host` only names
    the machine in messages; `run_dir` (the run directory) lets a stop say which steps will be redone.
    """
    if not commands:
        raise LaunchError("no ranks to start")
    if len(commands) != len(envs):
        raise LaunchError(f"{len(commands)} commands but {len(envs)} environments")
    if any(not c for c in commands):
        raise LaunchError("a rank has an empty command")
    if grace_seconds < 0:
        raise LaunchError(f"grace period {grace_seconds} s must be >= 0")
    err = stderr if stderr is not None else sys.stderr

    def say(line: str) -> None:
        try:
            print(f"strata: {line}", file=err, flush=True)
        except (OSError, ValueError):
            pass

    job = _Job(_Watched(stdout if stdout is not None else sys.stdout))
    with _catch_stop_signals(job.received):
        for rank, (command, env) in enumerate(zip(commands, envs)):
            if job.received:
                break  # stopped while starting: start no more
            try:
                job.start(rank, command, env)
            except OSError as error:
                started = list(range(len(job.procs)))
                job.stop(started, min(grace_seconds, FAILURE_GRACE_S))
                job.drain()
                say(f"cannot start rank {rank} ({command[0]}): {error.strerror or error}; "
                    f"stopped the other {len(started)} rank(s)")
                return 127 if isinstance(error, FileNotFoundError) else 126
        return _supervise(job, say, err, grace_seconds=grace_seconds, host=host, heartbeat_dir=heartbeat_dir,
                          startup_s=startup_s, preempt_wait_s=preempt_wait_s, run_dir=run_dir)


def _supervise(job: _Job, say: Callable[[str], None], err: TextIO, *, grace_seconds: float, host: str,
               heartbeat_dir: Path | None, startup_s: float, preempt_wait_s: float, run_dir: Path | None) -> int:
    """Wait for the ranks; the job's exit code (see run_local)."""
    running = set(range(len(job.procs)))
    failed: int | None = None
    preempted: list[int] = []  # ranks that exited 75 or 130 (stopped at the agreed step), in order
    preempt_deadline = float("inf")
    kill_after = min(grace_seconds, FAILURE_GRACE_S)  # a failed or hung job's ranks cannot checkpoint
    watchdog = None
    if heartbeat_dir is not None:
        watchdog = Watchdog(heartbeat_dir, world_size=len(job.procs), hosts=[host] * len(job.procs),
                            startup_s=startup_s, on_hang=lambda: None, err=err,
                            finished=lambda: set(job.exit_times)).start()
    while running and not job.received and not (watchdog and watchdog.fired.is_set()):
        if time.monotonic() > preempt_deadline:
            break
        try:
            rank = job.exits.get(timeout=0.1)  # the timeout only bounds how late a launcher signal is seen
        except queue.Empty:
            continue
        running.discard(rank)
        code = job.procs[rank].returncode
        if code in STOPPED_EXIT_CODES:  # not a failure: the others stop at the same step by themselves
            preempted.append(rank)
            preempt_deadline = min(preempt_deadline, time.monotonic() + preempt_wait_s)
        elif code != 0:
            failed = rank
            break
    if watchdog:
        watchdog.close()

    if job.received:
        return _stop_on_signal(job, running, say, grace_seconds=grace_seconds, run_dir=run_dir)
    if watchdog and watchdog.fired.is_set():
        job.stop(sorted(running), kill_after)  # the table was printed when the watchdog fired
        job.drain()
        say(f"hung job stopped ({len(running)} rank(s) were still running)")
        return WATCHDOG_EXIT_CODE
    if failed is not None:
        others = sorted(running)
        # The failed rank's own group too: whatever it started may outlive it.
        job.stop([failed, *others], kill_after)
        job.drain()
        proc = job.procs[failed]
        code = proc.returncode
        beat = read_beats(heartbeat_dir).get(failed) if heartbeat_dir else None
        last = f" (its last heartbeat: step {beat['step']}, {beat['phase']})" if beat else ""
        say(f"rank {failed} on {host} (pid {proc.pid}) {describe_exit(code)}{last}; stopped the other "
            f"{len(others)} rank(s) {time.monotonic() - job.exit_times[failed]:.1f} s after its exit")
        return _exit_status(code)
    job.drain()
    if preempted:
        return _report_stopped(job, sorted(running), preempted, say, preempt_wait_s, kill_after)
    return 0


def _stop_on_signal(job: _Job, running: set[int], say: Callable[[str], None], *, grace_seconds: float,
                    run_dir: Path | None) -> int:
    """The launcher got SIGINT/SIGTERM: pass it on to the ranks, which stop after one agreed step and save
    it; wait for them up to the grace period, or until a second Ctrl-C; say how the job ended."""
    signum, ranks = job.received[0], sorted(running)
    say(stopping.notice(signum, grace_seconds).removeprefix("strata: "))
    for r in ranks:
        _signal_group(job.procs[r].pid, signum)
    seen, deadline, why = 1, time.monotonic() + grace_seconds, None
    while running:
        if signal.SIGINT in job.received[seen:]:
            why = "second Ctrl-C: stopping now" if signum == signal.SIGINT else "Ctrl-C: stopping now"
            break
        seen = len(job.received)
        if time.monotonic() > deadline:
            why = f"the ranks did not stop within --grace {grace_seconds:g} s: stopping them now"
            break
        try:
            running.discard(job.exits.get(timeout=0.1))
        except queue.Empty:
            continue
    job.stop(list(range(len(job.procs))), 0.0 if why else min(grace_seconds, FAILURE_GRACE_S))
    job.drain()
    if why is None and job.out.stop is not None:  # the chief saved the agreed step and said so
        step, by = job.out.stop
        say(stopping.stopped(step, by).removeprefix("strata: "))
        return contract.stop_exit_code(by)
    if why is None and all(p.returncode == 0 for p in job.procs):
        say("every rank finished before the stop took effect")
        return 0
    gone = why or f"received {signal.Signals(signum).name}; stopped {len(ranks)} running rank(s)"
    say((stopping.lost(gone, stopping.committed_step(run_dir)) if run_dir is not None else gone)
        .removeprefix("strata: "))
    return INTERRUPTED_EXIT_CODE if why and why.startswith(("second Ctrl-C", "Ctrl-C")) else 128 + signum


def _report_stopped(job: _Job, late: list[int], stopped_ranks: list[int], say: Callable[[str], None],
                    preempt_wait_s: float, kill_after: float) -> int:
    """Ranks exited 75 or 130 on their own (a signal reached one of them): all of them should have."""
    if late:
        job.stop(late, kill_after)
        say(f"rank(s) {', '.join(map(str, late))} did not stop within {preempt_wait_s:.0f} s of rank "
            f"{stopped_ranks[0]}'s stop; stopped them")
        return 1
    if job.out.stop is not None:
        step, by = job.out.stop
        say(stopping.stopped(step, by).removeprefix("strata: "))
        return contract.stop_exit_code(by)
    code = job.procs[stopped_ranks[0]].returncode
    say(f"preempted: every rank stopped at the step they agreed on and it was checkpointed (first to exit: "
        f"rank {stopped_ranks[0]}); run the same command again to resume (exit {code})")
    return code


class _Watched:
    """The ranks' merged output stream, noting the chief's stop line (launch/stopping.py) as it passes."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.stop = out, None

    def write(self, text: str) -> int:
        if self.stop is None:
            self.stop = contract.parse_stop_line(text)
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()
