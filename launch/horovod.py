"""Command lines for horovodrun and plain Open MPI `mpirun` (pure: builds argv lists, runs nothing).

Every flag emitted here was checked against `horovodrun --help` (Horovod 0.28.1) and
`mpirun --help <topic>` (Open MPI 4.1).
"""
from __future__ import annotations

import re
import shlex
from typing import Literal

from launch.errors import LaunchError
from launch.hosts import Host, assign_ranks, hosts_spec, is_local

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _number(value: float) -> str:
    # `g` drops a trailing `.0` (2.0 -> "2") and keeps fractions (2.5 -> "2.5"); argparse float() reads both.
    return format(value, "g")


def horovodrun_argv(*, np: int, hosts: list[Host], controller: Literal["gloo", "mpi"], command: list[str],
                    fusion_threshold_mb: float | None = None, cycle_time_ms: float | None = None,
                    timeline: str | None = None, hierarchical_allreduce: bool = False,
                    extra_mpi_args: list[str] | None = None, as_root: bool = False,
                    program: str = "horovodrun") -> list[str]:
    """`horovodrun -np N -H h:s,... --gloo|--mpi [options] command...`.

    - All hosts local: `--network-interfaces lo`, which skips Horovod's NIC discovery (it probes every
      interface, slow and fragile in containers) and keeps traffic on loopback.
    - `--mpi` as root: `--mpi-args=--allow-run-as-root --oversubscribe` (one argv item with `=`, as
      horovodrun's help asks). horovodrun 0.28 already adds --allow-run-as-root for Open MPI itself; repeating
      it is harmless and keeps us correct if that default changes. `extra_mpi_args` are appended, shell-quoted,
      because horovodrun pastes the value into a `/bin/sh -c` mpirun command line.
    """
    if controller not in ("gloo", "mpi"):
        raise LaunchError(f"controller must be 'gloo' or 'mpi', not {controller!r}")
    if not command:
        raise LaunchError("no command to run under horovodrun")
    assign_ranks(hosts, np)  # same -np / slots checks and messages as every other launch path
    argv = [program, "-np", str(np), "-H", hosts_spec(hosts), f"--{controller}"]
    if all(is_local(h) for h in hosts):
        argv += ["--network-interfaces", "lo"]
    if fusion_threshold_mb is not None:
        # horovodrun parses this flag with int(): "64.0" would be rejected, so only whole MB are accepted.
        if fusion_threshold_mb < 0 or fusion_threshold_mb != int(fusion_threshold_mb):
            raise LaunchError(f"fusion threshold {fusion_threshold_mb} MB must be a whole number >= 0 "
                              "(horovodrun takes integer MB; 0 disables fusion)")
        argv += ["--fusion-threshold-mb", str(int(fusion_threshold_mb))]
    if cycle_time_ms is not None:
        if cycle_time_ms <= 0:
            raise LaunchError(f"cycle time {cycle_time_ms} ms must be > 0")
        argv += ["--cycle-time-ms", _number(cycle_time_ms)]
    if timeline is not None:
        if not timeline:
            raise LaunchError("timeline file name is empty")
        argv += ["--timeline-filename", timeline]
    if hierarchical_allreduce:
        argv.append("--hierarchical-allreduce")
    mpi_args = list(extra_mpi_args or [])
    if controller == "gloo":
        if mpi_args:
            raise LaunchError("extra MPI arguments need the mpi controller; drop them or use --mpi")
    else:
        if as_root:
            mpi_args = ["--allow-run-as-root", "--oversubscribe", *mpi_args]
        if mpi_args:
            argv.append("--mpi-args=" + shlex.join(mpi_args))
    return [*argv, *command]


def mpirun_argv(*, np: int, hosts: list[Host], command: list[str], as_root: bool, env_keys: list[str],
                program: str = "mpirun") -> list[str]:
    """A plain Open MPI command: `mpirun [--allow-run-as-root] -np N -H h:s,... --bind-to none --map-by slot
    --tag-output [-x KEY]... command...`.

    - No --oversubscribe: explicit `host:slots` tells Open MPI how many ranks each host may run, whatever its
      core count, and `assign_ranks` already refuses -np above the slots.
    - `--bind-to none`: Open MPI otherwise pins each rank to one core (np <= 2) or socket, which starves
      TensorFlow's own intra/inter-op thread pools. horovodrun chooses the same for Open MPI.
    - `--map-by slot`: fill each host before the next, so placement matches `assign_ranks` and horovodrun.
    - `--tag-output`: mpirun merges every rank into one stream; the `[job,rank]<stdout>:` tag is the only way
      to tell which rank printed a traceback (horovodrun --mpi passes it too, so output looks alike).
    - `-x KEY` forwards a variable by name with mpirun's own value: values (possibly secrets) stay off the
      command line, which any user can read in `ps`.

    Do not run Python ranks with PYTHONUNBUFFERED under mpirun: their stdout is a pty there, so Python
    already writes whole lines, while unbuffered print() writes each piece and --tag-output tags each piece.
    """
    if not command:
        raise LaunchError("no command to run under mpirun")
    assign_ranks(hosts, np)
    argv = [program]
    if as_root:
        argv.append("--allow-run-as-root")  # Open MPI refuses to start as root without it
    argv += ["-np", str(np), "-H", hosts_spec(hosts), "--bind-to", "none", "--map-by", "slot", "--tag-output"]
    seen: set[str] = set()
    for key in env_keys:
        if not _ENV_NAME.fullmatch(key):
            raise LaunchError(f"cannot forward environment variable {key!r}: give a name like STRATA_BACKEND, "
                              "without '=' or a value")
        if key not in seen:
            seen.add(key)
            argv += ["-x", key]
    return [*argv, *command]


def horovodrun_elastic_argv(*, np: int, min_np: int, max_np: int, discovery_script: str, command: list[str],
                            local_only: bool, cooldown_range: tuple[int, int] | None = None,
                            program: str = "horovodrun") -> list[str]:
    """`horovodrun -np N --min-np A --max-np B --host-discovery-script S --gloo [options] command...`.

    - Elastic Horovod runs on Gloo only (its driver re-forms the ring; MPI cannot change size).
    - `--network-interfaces lo` when every host the script lists is this machine: besides skipping NIC
      discovery, without it Horovod's elastic driver waits for at least two hosts before it starts anything.
    - `--blacklist-cooldown-range LO HI`: a host whose worker failed is blacklisted; without a cooldown it
      never comes back, with one it may rejoin after LO..HI seconds (growing with each failure) once the
      discovery script lists it again.
    """
    if not command:
        raise LaunchError("no command to run under horovodrun")
    if not 1 <= min_np <= np <= max_np:
        raise LaunchError(f"elastic sizes must satisfy 1 <= --min-np ({min_np}) <= -np ({np}) <= --max-np ({max_np})")
    argv = [program, "-np", str(np), "--min-np", str(min_np), "--max-np", str(max_np),
            "--host-discovery-script", discovery_script, "--gloo"]
    if local_only:
        argv += ["--network-interfaces", "lo"]
    if cooldown_range is not None:
        low, high = cooldown_range
        if not 1 <= low <= high <= 3600:
            raise LaunchError(f"--blacklist-cooldown-range {low} {high}: need 1 <= LO <= HI <= 3600 seconds "
                              "(Horovod's bounds)")
        argv += ["--blacklist-cooldown-range", str(low), str(high)]
    return [*argv, *command]
