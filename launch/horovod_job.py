"""Run horovodrun as one job and report what happened to it in the user's terms.

horovodrun (Gloo) already stops every rank when one exits non-zero (SIGTERM, SIGKILL 5 s later) and prints
`Process N exit with status code C.`; under --mpi, mpirun aborts the job and names the first failed rank in its
own report. This module adds what they lack: the rank's host and signal name, the time from that exit to the
end of the job, a stopped job (every rank stops at the step they agreed on and exits 75 or 130) reported as a
stop rather than as a failure, Ctrl-C and SIGTERM passed on to the ranks themselves rather than to horovodrun
(whose own stop SIGKILLs them 5 s later, too soon for a checkpoint; see launch/stopping.py), and the hang
watchdog over the ranks' heartbeats.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from launch import contract, stopping, tf_noise
from launch.contract import INTERRUPTED_EXIT_CODE, STOPPED_EXIT_CODES, WATCHDOG_EXIT_CODE, rank_prefix
from launch.stopping import FAILURE_GRACE_S
from launch.watchdog import Watchdog, read_beats

_FAILED_PROCESS = re.compile(r"Process (\d+) exit with status code (-?\d+)")
# A rank's output as horovodrun relays it: `[R]<stdout>:` (Gloo, whole lines) or, from mpirun's
# --tag-output, `[JOB,R]<stdout>:` before every piece a rank wrote, lines or not (pieces of different ranks
# then share a line: `...eta 10s[1,0]<stdout>:\n`).
_RANK_TAG = re.compile(r"\[(?:\d+,)?(\d+)\]<(stdout|stderr)>:")
_HOROVOD_FAILED = "Horovod detected that one or more processes exited with non-zero status"
_AFTER_A_STOP = ("Process ", "Terminating remaining workers after failure of Process")  # horovodrun's words
# Under --mpi, Horovod's per-process lines do not exist; mpirun reports the first failed rank itself.
_MPI_ABORTING = ("Primary job  terminated normally, but", "mpirun noticed that", "mpirun detected that")
_MPI_SIGNALED = re.compile(r"mpirun noticed that process rank (\d+) with PID \d+ on node \S+ exited on signal (\d+)")
_MPI_EXITED = re.compile(r"Process name: \[\[\d+,\d+\],(\d+)\]\s*\n\s*Exit code:\s*(-?\d+)")


def mpirun_failure(report: str) -> tuple[int, int] | None:
    """(rank, status) of the first failed rank in mpirun's own report, a signal given as 128 + signal like a
    shell does; None when the text has no such report (pure)."""
    signaled = _MPI_SIGNALED.search(report)
    if signaled:
        return int(signaled.group(1)), 128 + int(signaled.group(2))
    exited = _MPI_EXITED.search(report)
    return (int(exited.group(1)), int(exited.group(2))) if exited else None


def describe_status(code: int) -> str:
    """A rank's status as horovodrun reports it: -9 (Popen) or 137 (through a shell) is SIGKILL (pure)."""
    signum = -code if code < 0 else code - 128 if 128 < code < 128 + 65 else 0
    if signum:
        try:
            return f"was killed by {signal.Signals(signum).name} (signal {signum})"
        except ValueError:
            pass
    return f"exited with code {code}"


def failure_message(failures: list[tuple[int, int, float]], *, hosts: list[str], ended: float,
                    beats: dict[int, dict]) -> str:
    """One line naming the first rank that failed, its host, how, and how long the job took to stop (pure).
    `failures`: (rank, status, time seen) in the order horovodrun reported them; `hosts[rank]` names the
    rank's host when the launcher knows it."""
    rank, code, seen = failures[0]
    where = f" on {hosts[rank]}" if rank < len(hosts) else ""  # unknown in elastic mode
    beat = beats.get(rank)
    last = f" (its last heartbeat: step {beat['step']}, {beat['phase']})" if beat else ""
    return (f"rank {rank}{where} {describe_status(code)}{last}; the other ranks were stopped, "
            f"job ended {ended - seen:.1f} s after that exit")


class RankLines:
    """Turns horovodrun's (or mpirun's) merged output back into whole lines, each tagged with its rank or
    None for the launcher's own lines (pure). Pieces of a rank's line are kept per rank and stream until
    its newline arrives."""

    def __init__(self) -> None:
        self.partial: dict[tuple[int, str], str] = {}

    def feed(self, line: str) -> list[tuple[int | None, str]]:
        """The complete lines in one line of horovodrun's output (which ends with a newline, or is the last)."""
        tags = list(_RANK_TAG.finditer(line))
        if not tags:
            return [(None, line)]
        done: list[tuple[int | None, str]] = []
        if tags[0].start() > 0:  # the launcher's own text, then a rank's piece
            done.append((None, line[:tags[0].start()] + "\n"))
        for tag, after in zip(tags, [*tags[1:], None]):
            key = (int(tag.group(1)), tag.group(2))
            piece = line[tag.end():after.start() if after else len(line)]
            text = self.partial.pop(key, "") + piece
            if text.endswith("\n"):
                done.append((key[0], text))
            else:
                self.partial[key] = text
        return done

    def close(self) -> list[tuple[int | None, str]]:
        """Lines the ranks left unfinished at the end of the job."""
        rest, self.partial = self.partial, {}
        return [(rank, text + "\n") for (rank, _), text in rest.items()]


def rank_lines(stream: Iterable[str]) -> Iterator[tuple[int | None, str]]:
    """(rank or None, whole line) for each line of horovodrun's output `stream`, as soon as it is complete."""
    lines = RankLines()
    for raw in stream:
        yield from lines.feed(raw)
    yield from lines.close()


class _Stop:
    """The launcher's part in stopping a horovodrun job on Ctrl-C or SIGTERM (see launch/stopping.py)."""

    def __init__(self, proc: subprocess.Popen, grace_seconds: float):
        self.proc, self.grace_seconds = proc, grace_seconds
        self.signals: list[int] = []  # received by the launcher
        self.ranks: list[int] = []  # pids of this machine's ranks, found at the first signal
        self.why: str | None = None  # set when the ranks were killed before they could finish stopping
        self.seen: tuple[int, str] | None = None  # the chief's stop line: (step, what stopped it)
        self.timer: threading.Timer | None = None  # kills the ranks when the grace period is over

    def on_signal(self, signum: int, _frame: object = None) -> None:
        """Handler (main thread): the first signal goes to the ranks; a second Ctrl-C kills them."""
        self.signals.append(signum)
        if len(self.signals) == 1:
            self.ranks = stopping.local_ranks(self.proc.pid)
            if self.ranks:
                _say(stopping.notice(signum, self.grace_seconds))
                stopping.send(self.ranks, signum)
                self.timer = threading.Timer(self.grace_seconds, self.kill,
                                             args=(f"the ranks did not stop within --grace {self.grace_seconds:g} "
                                                   "s: stopping them now",))
                self.timer.daemon = True
                self.timer.start()
            else:  # no rank on this machine to tell: horovodrun stops them (SIGTERM, SIGKILL 5 s later)
                _say(f"strata: {stopping.signal_label(signum)}: no rank runs on this machine; asking horovodrun "
                     "to stop the job (it allows them 5 s)")
                self.terminate_horovodrun(signal.SIGTERM)
        elif signum == signal.SIGINT and self.why is None:
            self.kill("second Ctrl-C: stopping now" if self.signals[0] == signal.SIGINT else "Ctrl-C: stopping now")
        elif len(self.signals) > 2:
            self.terminate_horovodrun(signal.SIGKILL)

    def kill(self, why: str) -> None:
        """Stop at once: SIGKILL the local ranks, SIGTERM horovodrun (for the ranks on other machines)."""
        if self.why is not None or self.proc.poll() is not None:
            return
        self.why = why
        stopping.send(self.ranks, signal.SIGKILL)
        self.terminate_horovodrun(signal.SIGTERM)

    def terminate_horovodrun(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def report(self, run_dir: Path | None) -> int | None:
        """The job's exit code after a signal stop (None: no stop happened), with its one line."""
        if not self.signals and self.seen is None:
            return None
        if self.why is None and self.seen is not None:
            step, by = self.seen
            _say(stopping.stopped(step, by))
            return contract.stop_exit_code(by)
        if not self.signals:
            return None  # the chief never confirmed a save: report like any other failure
        if self.why is None and self.proc.returncode == 0:
            _say("strata: every rank finished before the stop took effect")
            return 0
        _say(stopping.lost(self.why or f"received {signal.Signals(self.signals[0]).name}: stopped the job",
                           stopping.committed_step(run_dir)))
        return INTERRUPTED_EXIT_CODE if signal.SIGINT in self.signals else 128 + self.signals[0]


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_horovodrun(argv: list[str], env: dict[str, str], *, hosts: list[str], heartbeat_dir: Path | None,
                   startup_s: float, grace_seconds: float, run_dir: Path | None = None) -> int:
    """Run `argv` (a horovodrun command), copy its output, and return the job's exit code."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    stop = _Stop(proc, grace_seconds)
    relay = _Relay(stop)
    watchdog = None
    if heartbeat_dir is not None:
        abort = _hung_job_aborter(stop, heartbeat_dir, kill_after=min(grace_seconds, FAILURE_GRACE_S))
        watchdog = Watchdog(heartbeat_dir, world_size=len(hosts), hosts=hosts, startup_s=startup_s,
                            on_hang=abort, finished=lambda: {r for r, _, _ in relay.failures}).start()
    previous = {s: signal.signal(s, stop.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert proc.stdout is not None
        for rank, line in rank_lines(proc.stdout):
            relay.line(rank, line)
        code = relay.finish(proc)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if stop.timer:
            stop.timer.cancel()
        if watchdog:
            watchdog.close()
    if watchdog and watchdog.fired.is_set():
        print("strata: hung job stopped", file=sys.stderr, flush=True)
        return WATCHDOG_EXIT_CODE
    stopped = stop.report(run_dir)
    if stopped is not None:
        return stopped
    return _job_exit(code, relay.failures, hosts=hosts, heartbeat_dir=heartbeat_dir)


def _hung_job_aborter(stop: _Stop, heartbeat_dir: Path, *, kill_after: float) -> Callable[[], None]:
    """What the watchdog does to a hung job: SIGTERM to the ranks on this machine (their pids are in the
    heartbeats) and to horovodrun, SIGKILL `kill_after` seconds later: a rank stuck in a collective treats
    SIGTERM as a stop request it cannot act on (a hung job's ranks cannot checkpoint), and horovodrun's own
    stop would wait 5 s more. horovodrun then sees its ranks gone and exits."""
    def abort() -> None:
        beats = read_beats(heartbeat_dir)
        local = [b["pid"] for b in beats.values() if b.get("host") == socket.gethostname()]

        def send(sig: int) -> None:
            stopping.send(local, sig)
            stop.terminate_horovodrun(sig)

        send(signal.SIGTERM)
        timer = threading.Timer(kill_after, send, args=(signal.SIGKILL,))
        timer.daemon = True
        timer.start()

    return abort


class _Relay:
    """Copies horovodrun's output line by line: each rank's lines with its prefix, the launcher's own lines
    without TensorFlow's noise, and notes what they say about failures and stops."""

    def __init__(self, stop: _Stop) -> None:
        self.stop = stop
        self.failures: list[tuple[int, int, float]] = []  # (rank, status, time seen), as horovodrun reports them
        self.held: list[str] | None = None  # horovodrun's own final traceback after a failure: our summary replaces it
        self.launcher_lines: deque[str] = deque(maxlen=200)  # horovodrun's and mpirun's own lines (not a rank's)
        self.mpi_abort_seen: float | None = None
        self.noise = None if tf_noise.shown() else tf_noise.NoiseLines()  # horovodrun imports TensorFlow itself

    def line(self, rank: int | None, line: str) -> None:
        stop = self.stop
        stop.seen = stop.seen or contract.parse_stop_line(line)
        if rank is not None:
            sys.stdout.write(rank_prefix(rank) + line)
            sys.stdout.flush()
            return
        if self.noise and self.noise.drop(line):
            return
        self.failures += [(int(r), int(c), time.monotonic()) for r, c in _FAILED_PROCESS.findall(line)]
        if (stop.seen or stop.why) and line.startswith(_AFTER_A_STOP):
            return  # horovodrun calls the ranks' stop exits failures; the summary says what they are
        self.launcher_lines.append(line)
        if self.mpi_abort_seen is None and line.startswith(_MPI_ABORTING):
            self.mpi_abort_seen = time.monotonic()
        if (self.failures or stop.signals) and line.startswith("Traceback (most recent call last):"):
            if self.held:  # an earlier traceback (e.g. the elastic driver's): only the last one is horovodrun's
                sys.stdout.write("".join(self.held))
            self.held = []
        if self.held is not None:
            self.held.append(line)
            return
        sys.stdout.write(line)
        sys.stdout.flush()

    def finish(self, proc: subprocess.Popen) -> int:
        """After the last line: horovodrun's exit code; under --mpi, mpirun's report names the failed rank."""
        if self.held and not any(_HOROVOD_FAILED in h for h in self.held):
            sys.stdout.write("".join(self.held))
        code = proc.wait()
        mpi_failed = None if self.failures else mpirun_failure("".join(self.launcher_lines))
        if mpi_failed:
            self.failures = [(*mpi_failed, self.mpi_abort_seen or time.monotonic())]
        return code


def _job_exit(code: int, failures: list[tuple[int, int, float]], *, hosts: list[str],
              heartbeat_dir: Path | None) -> int:
    """The job's exit code once it ended without a stop of the launcher's, with its one line."""
    ended = time.monotonic()
    if code == 0:
        return 0
    if failures and all(c in STOPPED_EXIT_CODES for _, c, _ in failures):
        print(f"strata: preempted: every rank stopped at the step they agreed on and it was checkpointed "
              f"(first to exit: rank {failures[0][0]}); run the same command again to resume "
              f"(exit {failures[0][1]})", file=sys.stderr, flush=True)
        return failures[0][1]
    real = [f for f in failures if f[1] not in STOPPED_EXIT_CODES] or failures
    if real:
        beats = read_beats(heartbeat_dir) if heartbeat_dir else {}
        print(f"strata: job failed: {failure_message(real, hosts=hosts, ended=ended, beats=beats)}",
              file=sys.stderr, flush=True)
    else:
        print(f"strata: job failed: horovodrun exited with code {code}", file=sys.stderr, flush=True)
    return code
