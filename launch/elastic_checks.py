"""`strata launch --elastic`: checks of an elastic Horovod launch, before anything starts.

The workers' hosts come from a host discovery script (Horovod runs it about once a second during the
job): an executable that prints one `host:slots` line per available host. It is run once here, so a script
that fails, hangs or prints something Horovod cannot read is a one-line error now rather than a job that
waits forever.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from launch.errors import LaunchError
from launch.hosts import Host, is_local, parse_hosts


@dataclass(frozen=True)
class ElasticSpec:
    """How many workers an elastic job may have, and where they can run."""

    min_np: int
    max_np: int
    discovery_script: str
    cooldown_range: tuple[int, int] | None = (10, 300)  # seconds before a failed host may rejoin


def check_sizes(spec: ElasticSpec, np: int) -> None:
    if not 1 <= spec.min_np <= np <= spec.max_np:
        raise LaunchError(f"--elastic needs 1 <= --min-np ({spec.min_np}) <= -np ({np}) <= --max-np "
                          f"({spec.max_np})")


def discover_hosts(script: str, *, timeout_s: float = 30.0) -> list[Host]:
    """Run the discovery script once; its hosts, or LaunchError naming the problem and the fix."""
    path = Path(script)
    if not path.is_file():
        raise LaunchError(f"--host-discovery-script {script!r} not found; give the path of an executable that "
                          "prints `host:slots` lines")
    if not os.access(path, os.X_OK):
        raise LaunchError(f"--host-discovery-script {script!r} is not executable; run `chmod +x {script}`")
    try:
        done = subprocess.run([str(path.resolve())], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"--host-discovery-script {script!r} did not finish in {timeout_s:g} s; "
                          "Horovod runs it every second, so it must answer quickly") from None
    except OSError as err:
        raise LaunchError(f"--host-discovery-script {script!r} cannot be run ({err.strerror}); "
                          "does it start with a #! line?") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise LaunchError(f"--host-discovery-script {script!r} exited with code {done.returncode} ({last})")
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    if not lines:
        raise LaunchError(f"--host-discovery-script {script!r} printed no hosts; it must print lines like "
                          "`localhost:2`")
    try:
        return parse_hosts(",".join(lines))
    except LaunchError as err:
        raise LaunchError(f"--host-discovery-script {script!r} output: {err}") from None


def all_local(hosts: list[Host]) -> bool:
    return all(is_local(h) for h in hosts)
