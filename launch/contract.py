"""The launcher-to-worker contract: everything `launch/` and `trainer/` must agree on, defined once.

The launcher never imports the trainer (either side can be replaced); the two talk through a command line,
a config file, environment variables, heartbeat files, a line of output and exit codes. Those are all here,
and both sides import them from here: standard library only, nothing else of Strata. A unit test
(tests/unit/test_contract.py) checks that no other module in trainer/ or launch/ spells them out again.
"""
from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterable, Sequence
from pathlib import Path

# ------------------------------------------------------------------------------------------ exit codes
USAGE_EXIT_CODE = 2  # bad input: one line `strata: error: ...` on stderr
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): stopped at an agreed, checkpointed step; run again
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for Ctrl-C (also after a stop at a saved step)
WATCHDOG_EXIT_CODE = 124  # as timeout(1): the job ran out of time without finishing (a hung rank)
STOPPED_EXIT_CODES = (PREEMPTED_EXIT_CODE, INTERRUPTED_EXIT_CODE)  # a rank's stop, not a failure

# ------------------------------------------------------------------------------ environment variables
ENV_RANK = "STRATA_RANK"  # this process's rank (set by `strata launch`)
ENV_WORLD_SIZE = "STRATA_WORLD_SIZE"
ENV_LOCAL_RANK = "STRATA_LOCAL_RANK"  # index among the ranks of its host (picks its GPUs, its core)
ENV_LOCAL_SIZE = "STRATA_LOCAL_SIZE"
ENV_BACKEND = "STRATA_BACKEND"  # horovod | multi_worker
ENV_TF_CONFIG = "TF_CONFIG"  # MultiWorkerMirroredStrategy's cluster (multi_worker only)
ENV_HEARTBEAT_DIR = "STRATA_HEARTBEAT_DIR"  # where ranks write heartbeats (default RUN_DIR/heartbeat)
ENV_WATCHDOG = "STRATA_WATCHDOG"  # WATCHDOG_IN_LAUNCHER: the launcher watches the heartbeats, not each rank
WATCHDOG_IN_LAUNCHER = "launcher"
ENV_SUPERVISED = "STRATA_SUPERVISED"  # "1": a launcher forwards Ctrl-C/SIGTERM and says what they do
ENV_PREEMPTION = "STRATA_PREEMPTION"  # "0": signals keep their default actions (no agreed stop)
ENV_OUTPUT_PREFIX = "STRATA_OUTPUT_PREFIX"  # the worker prefixes each of its lines with this (SLURM)
ENV_FAULT = "STRATA_FAULT"  # RANK:STEP:KIND fault injection (trainer/faults.py)
ENV_TF_LOGS = "STRATA_TF_LOGS"  # "1": show TensorFlow's own log lines
ENV_PIN_CPU = "STRATA_PIN_CPU"  # "1": pin each rank to one core by local rank
# Variables the launcher owns: inherited copies are dropped before a rank starts (a stale TF_CONFIG in the
# user's shell would make a Horovod run try to join a cluster that is not there).
MANAGED_KEYS = (ENV_RANK, ENV_WORLD_SIZE, ENV_LOCAL_RANK, ENV_LOCAL_SIZE, ENV_BACKEND, ENV_TF_CONFIG,
               ENV_OUTPUT_PREFIX)
# How other launchers (horovodrun, mpirun, srun with PMI/PMIx) tell a process it is one of N ranks.
LAUNCHER_SIZE_VARS = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
PMI_RANK_VARS = ("PMIX_RANK", "PMI_RANK")  # set by srun --mpi=pmix (what Horovod's MPI controller needs)
LAUNCHER_RANK_VARS = (ENV_RANK, "HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", *PMI_RANK_VARS)
LAUNCHER_LOCAL_RANK_VARS = (ENV_LOCAL_RANK, "HOROVOD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")
LAUNCHER_LOCAL_SIZE_VARS = (ENV_LOCAL_SIZE, "HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")  # ranks on this host


def rank_prefix(rank: int) -> str:
    """What every line a rank prints starts with, under every launcher: `[rank 3] `."""
    return f"[rank {rank}] "


def env_int(environ, keys: Sequence[str], default: int) -> int:
    """The first of `keys` set to a whole number in `environ`, else `default`."""
    for key in keys:
        if environ.get(key, "").isdigit():
            return int(environ[key])
    return default


# ----------------------------------------------------------------------------------- run directory
RUNS_DIR = "runs"  # default parent of run directories: runs/<name>
RUN_CONFIG_FILE = "config.yaml"  # the resolved config `strata train` saves in every run directory
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "ckpt"  # TensorFlow's files of step N start with ckpt-N
MANIFEST_SUFFIX = ".manifest.json"  # ckpt-N.manifest.json: its atomic rename commits step N's save
_MANIFEST = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+){re.escape(MANIFEST_SUFFIX)}$")


def run_dir_of(name: str, run_dir: str | None) -> Path:
    """A config's run directory: its `run_dir`, else runs/<name>."""
    return Path(run_dir) if run_dir else Path(RUNS_DIR) / name


def manifest_step(file_name: str) -> int | None:
    """The step of a `ckpt-N.manifest.json` file name (a committed checkpoint), else None."""
    match = _MANIFEST.match(file_name)
    return int(match.group(1)) if match else None


# -------------------------------------------------------------------------------------- heartbeats
# `DIR/rank-N.json`, replaced atomically (a temporary file, then os.replace), one JSON object with
# HEARTBEAT_FIELDS. Written by trainer/heartbeat.py once a second, read by launch/watchdog.py.
HEARTBEAT_DIR = "heartbeat"  # RUN_DIR/heartbeat unless ENV_HEARTBEAT_DIR says otherwise
HEARTBEAT_GLOB = "rank-*.json"
HEARTBEAT_FIELDS = {
    "rank": "who writes it", "host": "its host", "pid": "its process id",
    "step": "optimizer steps completed when the phase began (the phase may be working on step+1)",
    "phase": "one of PHASES", "since": "wall-clock time (time.time()) the phase began",
    "written": "wall-clock time of this write (a frozen process stops updating it)",
    "allowed_s": "how long this phase may last before the rank counts as hung (0: never)",
}
# The phases in the order a rank passes through them after completing step s (with the step, this tells
# which rank is furthest behind when all have stopped: the one the others wait for in a collective).
# Inside one compiled step, data, forward, backward and all-reduce cannot be told apart from Python, so
# "step" is all of them; a rank waiting for a stuck peer shows "step" (it sits in the step's all-reduce,
# which also carries the stop votes) while the stuck one shows where it stopped.
PHASES = {
    "startup": "from the loop's start to its first step",
    "between steps": "host work after a step: logging, hooks",
    "checkpoint": "saving a checkpoint",
    "eval": "evaluation (ends with an all-reduce of the counts)",
    "step": "train step: data, forward, backward, all-reduce (one compiled function)",
    "finishing": "final checkpoint and weight check (all-reduce)",
    "exited": "process exited",
}


def heartbeat_file(rank: int) -> str:
    return f"rank-{rank}.json"


def read_heartbeat(path: Path) -> dict | None:
    """One heartbeat file's record, or None when it cannot be read (beats are replaced atomically)."""
    try:
        beat = json.loads(Path(path).read_text())
        int(beat["rank"])
        return beat
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ----------------------------------------------------------------------------------- the stop line
# The chief prints this line once the step every rank agreed to stop after is checkpointed
# (trainer/preemption.py); launch/stopping.py reads it from the ranks' output to report the stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # also the order of the votes, and priority
STOP_LABELS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1 (preemption warning)"}
STOP_EXIT_CODES = {signal.SIGINT: INTERRUPTED_EXIT_CODE, signal.SIGTERM: PREEMPTED_EXIT_CODE,
                   signal.SIGUSR1: PREEMPTED_EXIT_CODE}
_STOP_LINE = re.compile(r"strata: stopped at step (\d+) by (.+?) \(checkpoint saved\)")


def stop_line(step: int, signum: int) -> str:
    """The chief's last word on a stop at `step` for signal `signum`."""
    then = "it resumes from there when restarted" if signum == signal.SIGUSR1 else "run the same command to resume"
    return f"strata: stopped at step {step} by {STOP_LABELS[signum]} (checkpoint saved); {then}"


def parse_stop_line(line: str) -> tuple[int, str] | None:
    """(step, what stopped it: a STOP_LABELS value) from a stop line anywhere in `line`, else None."""
    match = _STOP_LINE.search(line)
    return (int(match.group(1)), match.group(2)) if match else None


def stop_exit_code(label: str) -> int:
    """The exit code of a job stopped by the signal labelled `label` (a STOP_LABELS value)."""
    signum = next((s for s, text in STOP_LABELS.items() if text == label), signal.SIGTERM)
    return STOP_EXIT_CODES[signum]


# ------------------------------------------------------------------------------ the worker's commands
TRAINER_MODULE = "trainer"  # `python -m trainer COMMAND ...` (trainer/cli.py)


def trainer_command(python: str, command: str, *args: str, overrides: Iterable[str] = ()) -> list[str]:
    """`python -m trainer COMMAND ARGS... [--set KEY=VALUE]...` as an argv list (never a shell string)."""
    argv = [python, "-m", TRAINER_MODULE, command, *args]
    for item in overrides:
        argv += ["--set", item]
    return argv


def train_command(python: str, config: str, overrides: Iterable[str] = (), *, backend: str | None = None,
                  stop_after: int | None = None) -> list[str]:
    """What every rank runs: train CONFIG with the overrides (and the launcher's backend last, so it wins)."""
    items = [*overrides, *([f"distribution.backend={backend}"] if backend else [])]
    argv = trainer_command(python, "train", config, overrides=items)
    return argv + (["--stop-after", str(stop_after)] if stop_after is not None else [])


def is_train_command(argv: Sequence[str]) -> bool:
    """Whether a process's argv runs `-m trainer train` (a rank, as `strata launch` starts them)."""
    want = ["-m", TRAINER_MODULE, "train"]
    return any(list(argv[i:i + 3]) == want for i in range(len(argv)))


def validate_command(python: str, config: str, overrides: Iterable[str] = (), *,
                     replicas: Sequence[int] = (), replicas_as: str | None = None) -> list[str]:
    """`python -m trainer validate`: the worker's own checks of a config (and of its run directory), and with
    `replicas` those of its parallel layout for each number of data-parallel replicas. `replicas_as` says how
    the user asked for them, for the messages (`-np ({n})`; `{n}` is replaced by the count)."""
    argv = trainer_command(python, "validate", config, overrides=overrides)
    if replicas:
        argv += ["--replicas", ",".join(str(n) for n in replicas)]
    if replicas_as:
        argv += ["--replicas-as", replicas_as]
    return argv


def validated(stdout: str) -> tuple[dict, list[dict]]:
    """(the resolved config, one layout per requested replica count) from `validate`'s output. Without
    --replicas the output is the resolved config alone, with it {"config": ..., "layouts": [...]}."""
    out = json.loads(stdout)
    if set(out) == {"config", "layouts"}:
        return out["config"], out["layouts"]
    return out, []
