"""Stopping on a signal without losing work: Ctrl-C (SIGINT), SIGTERM (`docker stop`, schedulers, `kill`) and
SLURM's preemption warning (SIGUSR1) make every rank stop after the SAME step, save it, and exit:
130 for Ctrl-C (the shell's code for it), PREEMPTED_EXIT_CODE (75, "checkpoint saved, run me again") for
SIGTERM and SIGUSR1. The next start resumes at that step: since the batch of step s is a pure function of
(seed, s), no step is lost and none is done twice. Nothing that is not needed to stop runs after the signal
(no validation, no ROUGE). A second Ctrl-C stops at once, without a checkpoint, and says what is lost.

Why an agreement: a signal reaches the ranks of a job one by one (or only one of them), so they see it in
different steps. A rank that stopped on its own would leave the others waiting in the next all-reduce, and
ranks that stopped at different steps would disagree about what the checkpoint holds. So a signal only
sets a local vote; each rank's votes ride in the compiled step's one all-reduce of its per-step numbers
(`make_train_step`, `sum_together`: three more floats next to the NaN/Inf flags, the loss and the token
count, in a tensor that is reduced anyway), and the loop already reads the step's agreed signals every
step, so agreeing adds no collective of its own and no host synchronisation. Every rank stops after the first step whose summed votes are
non-zero. A rank votes from the step after its handler ran, so a job stops at most two steps after the
signal (the step in flight and the next), where the 10-step agreement grid of earlier versions, which paid
an eager all-reduce per agreement, lagged up to ten. One process needs no agreement: it stops after the
current step.

Python runs signal handlers only between bytecodes of the main thread, which may sit in a long TensorFlow
call (a step, a save, a collective waiting for a dead peer). So the handlers only note the signal, and a
daemon thread reads the signals from `signal.set_wakeup_fd`: it records the votes, prints the first notice,
and acts on a second Ctrl-C at once, whatever the main thread is doing.

On by default (STRATA_PREEMPTION=0 turns it off: the default actions, i.e. KeyboardInterrupt and death by
SIGTERM). Before a single-process run touches its run directory (importing TensorFlow, reading data), a
Ctrl-C or SIGTERM ends it at once: nothing can be lost yet. Ranks of a job record it and stop after their
first step, since one rank leaving during start-up would leave the others waiting in the rendezvous.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from launch import contract
from launch.contract import INTERRUPTED_EXIT_CODE, STOP_EXIT_CODES, STOP_LABELS, STOP_SIGNALS, stop_line
from trainer import checkpoint_manifest as files
from trainer.loop_state import Hook, LoopState

VOTES = len(STOP_SIGNALS)


class StoppedDuringStartup(KeyboardInterrupt):
    """Ctrl-C or SIGTERM before a single-process run wrote anything: it ends at once (cli.main reports it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.exit_code = STOP_EXIT_CODES[signum]
        self.message = f"strata: stopped by {STOP_LABELS[signum]} during start-up, before any step: nothing is lost"


@dataclass
class _Process:
    """What this process knows about stopping (one per process: signals are per process)."""

    received: list[int] = field(default_factory=list)  # signal numbers, in order; appended by the watcher
    handled: set[int] = field(default_factory=set)  # the same, as the main thread's handler saw them
    installed: bool = False
    abortable: bool = False  # single process that has written nothing yet: a signal ends it at once
    multi: bool = False  # one rank of several: stop only at an agreed step
    rank: int = 0
    quiet: bool = False  # under `strata launch`, which forwards the signal and says what happens
    phase: str = "starting"  # starting | training | finishing
    step: int | None = None  # steps done, as of the last step's end
    checkpoints: Path | None = None  # where the committed checkpoints are (for "what is lost")
    votes_variable: object = None  # tf.Variable read by the compiled step (created on first use)


_process = _Process()


def enabled(environ=os.environ) -> bool:
    return environ.get(contract.ENV_PREEMPTION, "1") != "0"


def install(*, multi_process: bool, rank: int = 0, checkpoints: Path | None = None, environ=os.environ) -> None:
    """Catch SIGINT, SIGTERM and SIGUSR1 from now on (call early, before TensorFlow loads; main thread only).

    `multi_process`: this is one rank of a job (the ranks must agree on the stop step); `checkpoints`: the
    run's checkpoint directory (to say what a second Ctrl-C loses). Idempotent."""
    if not enabled(environ) or _process.installed:
        return
    _process.multi, _process.rank, _process.checkpoints = multi_process, rank, checkpoints
    _process.abortable = not multi_process
    _process.quiet = environ.get(contract.ENV_SUPERVISED) == "1"
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # the C-level handler must never block
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)
    threading.Thread(target=_watch, args=(read_fd,), name="strata-signals", daemon=True).start()
    _process.installed = True


def reclaim_handlers() -> None:
    """Install the handlers again: TensorFlow's runtime may have replaced them since. MultiWorkerMirrored's
    coordination service installs its own C-level SIGTERM handler (a preemption notifier that only sets a
    flag), after which Python, and so the watcher, would never see a SIGTERM."""
    if _process.installed and threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _handler)


def files_written() -> None:
    """From here on the run directory may be written: a signal no longer ends a single process at once."""
    _process.abortable = False


def _handler(signum: int, _frame) -> None:
    """Main thread: ends a single process that has written nothing yet; else notes the vote, so that a signal
    a hook sends its own process (STRATA_FAULT) counts at that very step. The rest is the watcher's."""
    if _process.abortable and signum != signal.SIGUSR1:
        raise StoppedDuringStartup(signum)
    _process.handled.add(signum)


def _watch(read_fd: int) -> None:
    while True:
        try:
            data = os.read(read_fd, 64)
        except InterruptedError:
            continue
        for signum in data:
            on_signal(signum)


def on_signal(signum: int) -> None:
    """Record a signal; say what will happen on the first; exit at once on a second Ctrl-C."""
    earlier_interrupts = _process.received.count(signal.SIGINT)
    first = not _process.received
    ends_now = _process.abortable and signum != signal.SIGUSR1  # the main thread raises StoppedDuringStartup
    _process.received.append(signum)
    if signum == signal.SIGINT and earlier_interrupts:
        if not _process.quiet:
            _say(lost_message(_process.step, _committed(_process.checkpoints)))
        os._exit(INTERRUPTED_EXIT_CODE)
    if first and not ends_now and not _process.quiet:
        _say(notice(signum, phase=_process.phase, multi=_process.multi, rank=_process.rank))


def notice(signum: int, *, phase: str, multi: bool, rank: int) -> str:
    """What the first signal does, in one line (pure)."""
    who = f"rank {rank} got {STOP_LABELS[signum]}" if multi else STOP_LABELS[signum]
    again = "; Ctrl-C again to stop at once, without it" if signum == signal.SIGINT else ""
    if phase == "finishing":
        return f"strata: {who}: the run is already finishing" + ("; Ctrl-C again to stop at once" if again else "")
    when = ("after the first step (start-up is not over)" if phase == "starting" and multi
            else "as soon as start-up is over" if phase == "starting"
            else "after the same step on every rank" if multi else "after this step")
    return f"strata: {who}: stopping {when} and saving a checkpoint{again}"


def lost_message(step: int | None, committed: int | None) -> str:
    """What a second Ctrl-C costs (pure): `step` steps done (None: training has not begun), `committed` the
    newest saved checkpoint."""
    if step is None:
        return "strata: second Ctrl-C: stopping now; no step has run yet, nothing is lost"
    if committed is not None and committed >= step:
        return f"strata: second Ctrl-C: stopping now; step {committed} is checkpointed, nothing is lost"
    if committed is None:
        return ("strata: second Ctrl-C: stopping now without a checkpoint; there is none yet, so the next "
                "start begins at step 0")
    return (f"strata: second Ctrl-C: stopping now without a checkpoint; steps after {committed} (the last "
            f"checkpoint) will be redone")


def _committed(directory: Path | None) -> int | None:
    steps = files.committed_steps(directory) if directory is not None else []
    return steps[0] if steps else None


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


# ------------------------------------------------------------------------------------ the votes
def local_votes() -> list[float]:
    """This process's votes: 1.0 for each of STOP_SIGNALS it has received."""
    return [1.0 if sig in _process.received or sig in _process.handled else 0.0 for sig in STOP_SIGNALS]


def stop_signal(votes) -> int | None:
    """The signal a stop is for, from (summed) votes: Ctrl-C first, then SIGTERM, then SIGUSR1 (pure)."""
    return next((sig for sig, vote in zip(STOP_SIGNALS, votes) if vote > 0), None)


def votes_variable():
    """The tf.Variable the compiled step reads this process's votes from (float32 [VOTES], one per process)."""
    if _process.votes_variable is None:
        import tensorflow as tf  # here: this module is imported before TensorFlow loads

        _process.votes_variable = tf.Variable(tf.zeros([VOTES]), trainable=False, name="strata_stop_votes")
    return _process.votes_variable


class StopHook(Hook):
    """Turns the votes into one stop step for every rank, checkpoints it and reports it."""

    def __init__(self, checkpointer, *, world_size: int, is_chief: bool):
        self.checkpointer, self.multi, self.is_chief = checkpointer, world_size > 1, is_chief
        self.sent: list[float] | None = None  # the votes last written to the variable

    def on_train_begin(self, state: LoopState) -> None:
        _process.phase, _process.step, _process.checkpoints = "training", state.step, self.checkpointer.directory
        reclaim_handlers()
        if not self.multi:  # a signal during start-up: stop before the first step (the restored one is saved)
            self._decide(state, local_votes())

    def on_step_begin(self, state: LoopState) -> None:
        votes = local_votes()
        if self.multi and votes != self.sent:  # only when a signal arrived: an assign is a host->device copy
            votes_variable().assign(votes)
            self.sent = votes

    def on_step_end(self, state: LoopState) -> None:
        _process.step = state.step
        self._decide(state, state.stop_votes if self.multi else local_votes())

    def _decide(self, state: LoopState, votes) -> None:
        signum = stop_signal(votes)
        if signum is None or state.stop_requested or state.step >= state.total_steps:
            return  # no signal; another stop; or the run is complete anyway
        state.stop_requested, state.stop_signal = True, signum
        state.stop_reason = f"stopped by {STOP_LABELS[signum]}"

    def on_train_end(self, state: LoopState) -> None:
        _process.phase = "finishing"
        if not state.stop_signal:
            return
        if self.checkpointer.latest_step != state.step and state.step > 0:
            from trainer.heartbeat import phase

            with phase("checkpoint"):
                self.checkpointer.save(state.step)
        if self.is_chief:  # before the ranks' last all-reduce: no rank can exit (and be reported) before this
            line = stop_line(state.step, state.stop_signal) if state.step > 0 else (
                f"strata: stopped by {STOP_LABELS[state.stop_signal]} before the first step: nothing to save")
            print(line, flush=True)


def preemption_hooks(strategy, checkpointer) -> list[Hook]:
    if not enabled():
        return []
    return [StopHook(checkpointer, world_size=strategy.world_size, is_chief=strategy.is_chief)]


def exit_code(state: LoopState) -> int:
    """130 after a Ctrl-C stop, PREEMPTED_EXIT_CODE after SIGTERM or SIGUSR1, else 0.

    A stopped rank ignores further SIGTERM/SIGUSR1 from here on: its step is agreed and checkpointed, and
    horovodrun SIGTERMs the other ranks as soon as the first exits, while Python's shutdown (which puts
    back the default handlers, but leaves SIG_IGN alone) may still take a second: it must not die of it."""
    if not state.stop_signal:
        return 0
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    return STOP_EXIT_CODES[state.stop_signal]
