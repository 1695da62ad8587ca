"""Command lines for horovodrun (pure: builds argv lists, runs nothing).

Every flag emitted here was checked against `horovodrun --help` (Horovod 0.28.1).
"""
from __future__ import annotations

import shlex
from typing import Literal

from launch.errors import LaunchError
from launch.hosts import Host, assign_ranks, hosts_spec, is_local

def horovodrun_argv(*, np: int, hosts: list[Host], controller: Literal["gloo", "mpi"], command: list[str],
                    as_root: bool = False, program: str = "horovodrun") -> list[str]:
    """`horovodrun -np N -H h:s,... --gloo|--mpi [--network-interfaces lo] [--mpi-args=...] command...`.

    - All hosts local: `--network-interfaces lo`, which skips Horovod's NIC discovery (it probes every
      interface, slow and fragile in containers) and keeps traffic on loopback.
    - `--mpi` as root: `--mpi-args=--allow-run-as-root --oversubscribe` (one argv item with `=`, as
      horovodrun's help asks). horovodrun 0.28 already adds --allow-run-as-root for Open MPI itself; repeating
      it is harmless and keeps us correct if that default changes.
    Horovod's tuning options (distribution.horovod: fusion threshold, cycle time, timeline, hierarchical
    all-reduce) are not flags here: each rank sets them as HOROVOD_* variables before hvd.init()
    (trainer/strategy/horovod.py), which works the same under horovodrun, mpirun and srun.
    """
    if controller not in ("gloo", "mpi"):
        raise LaunchError(f"controller must be 'gloo' or 'mpi', not {controller!r}")
    if not command:
        raise LaunchError("no command to run under horovodrun")
    assign_ranks(hosts, np)  # same -np / slots checks and messages as every other launch path
    argv = [program, "-np", str(np), "-H", hosts_spec(hosts), f"--{controller}"]
    if all(is_local(h) for h in hosts):
        argv += ["--network-interfaces", "lo"]
    if controller == "mpi" and as_root:
        argv.append("--mpi-args=" + shlex.join(["--allow-run-as-root", "--oversubscribe"]))
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
