"""`strata launch`: check everything, then start N data-parallel workers under Horovod or MultiWorker.

Checks happen before any worker starts (a bad request costs seconds, not an allocation): host list and slot
count, the config and its parallel layout over the ranks (the worker's own checks, in a child
`python -m trainer validate --replicas N`: the global batch divides over them, ...), that Horovod was built
with the requested controller, and that remote hosts answer over ssh.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from launch import contract
from launch.env import child_environ, free_ports, rank_env, tf_config
from launch.errors import LaunchError
from launch.elastic_checks import ElasticSpec, all_local, check_sizes, discover_hosts
from launch.horovod import horovodrun_argv, horovodrun_elastic_argv
from launch.horovod_job import run_horovodrun
from launch.hosts import Host, assign_ranks, is_local, parse_hostfile, parse_hosts
from launch.local import run_local
from launch.stopping import DEFAULT_GRACE_S
from launch.watchdog import heartbeat_dir_for, heartbeat_settings, remove_heartbeat_dir, supervision_env


@dataclass(frozen=True)
class LaunchSpec:
    """Everything `strata launch` decided, before it starts anything."""

    np: int
    hosts: list[Host]
    backend: str  # horovod | multi_worker
    controller: str  # gloo | mpi (horovod only)
    config: str
    overrides: list[str]
    resolved: dict  # the worker's validated config
    layout: dict  # its parallel layout over -np replicas (trainer/parallel/layout.py `Layout.to_json`)
    stop_after: int | None = None  # train this many more steps, then checkpoint and stop
    elastic: ElasticSpec | None = None  # workers may leave and join (Horovod elastic, launch/elastic_checks.py)

    def worker_command(self) -> list[str]:
        return contract.train_command(sys.executable, self.config, self.overrides, backend=self.backend,
                                      stop_after=self.stop_after)


def validate_config(config: str, overrides: list[str], *, replicas: list[int] | None = None,
                    replicas_as: str | None = None) -> tuple[dict, list[dict]]:
    """The worker's resolved config and its layout for each count in `replicas` (the worker's own checks, in
    a child process: this package never imports the trainer), or LaunchError with the worker's one line."""
    argv = contract.validate_command(sys.executable, config, overrides, replicas=replicas or [],
                                     replicas_as=replicas_as)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise LaunchError((lines[-1] if lines else "config validation failed").removeprefix("strata: error: "))
    return contract.validated(done.stdout)


def built_controllers(check_build_output: str) -> set[str]:
    """Controllers marked [X] in `horovodrun --check-build` output (pure)."""
    section = check_build_output.split("Available Controllers:", 1)[-1].split("Available Tensor", 1)[0]
    return {name.lower() for name in re.findall(r"\[X\]\s+(\w+)", section)}


def _horovod_build_key() -> str | None:
    """Identifies the installed Horovod build (its TensorFlow extension's path and mtime), without importing it."""
    spec = importlib.util.find_spec("horovod")
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = sorted(Path(spec.submodule_search_locations[0]).glob("tensorflow/mpi_lib*.so"))
    return f"{libs[0]}:{libs[0].stat().st_mtime_ns}" if libs else None


def horovod_controllers() -> set[str]:
    """Controllers Horovod was built with. `horovodrun --check-build` imports TensorFlow (seconds, a minute on
    a busy node), so its answer is cached per build of Horovod."""
    horovodrun = shutil.which("horovodrun") or str(Path(sys.executable).parent / "horovodrun")
    key = _horovod_build_key()
    if key is None or not Path(horovodrun).exists():
        raise LaunchError("Horovod is not installed; run `make setup` (it builds Horovod with Gloo and MPI)")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "strata" / "horovod-build.json"
    try:
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return set(saved["controllers"])
    except (OSError, ValueError, KeyError):
        pass
    try:
        done = subprocess.run([horovodrun, "--check-build"], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise LaunchError("`horovodrun --check-build` did not answer in 300 s; is this node overloaded?") from None
    built = built_controllers(done.stdout)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "controllers": sorted(built)}))
    except OSError:
        pass  # a read-only home only costs the next launch a few seconds
    return built


def check_horovod_controller(controller: str) -> None:
    built = horovod_controllers()
    if controller not in built:
        raise LaunchError(f"Horovod was built without the {controller} controller (built: {', '.join(sorted(built)) or 'none'}); "
                          f"use {'--gloo' if controller == 'mpi' else '--mpi'} or rebuild with `make setup`")


def check_reachable(hosts: list[Host], *, timeout_s: int = 5) -> None:
    """Remote hosts must answer a non-interactive ssh within a few seconds."""
    for host in hosts:
        if is_local(host):
            continue
        argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout_s}", host.name, "true"]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s + 5)
            reason = (done.stderr.strip().splitlines() or [""])[-1]
            ok = done.returncode == 0
        except (subprocess.TimeoutExpired, FileNotFoundError) as err:
            ok, reason = False, str(err)
        if not ok:
            raise LaunchError(f"host {host.name} is unreachable over ssh ({reason or 'no answer'}); "
                              f"check the name and passwordless ssh, or drop it from -H")


def rank_hosts(*, np: int, hosts_spec: str | None, hostfile: str | None) -> list[str]:
    """`host:local_rank` of every rank, in rank order (what `strata plan` shows); LaunchError if they don't fit."""
    if hosts_spec and hostfile:
        raise LaunchError("give either -H or --hostfile, not both")
    hosts = parse_hosts(hosts_spec) if hosts_spec else parse_hostfile(hostfile) if hostfile else [Host("localhost", max(np, 1))]
    return [f"{r.host}:{r.local_rank}" for r in assign_ranks(hosts, np)]


def check_launch(*, np: int, hosts_spec: str | None, hostfile: str | None, backend: str | None, mpi: bool,
                 config: str, overrides: list[str], stop_after: int | None = None,
                 elastic: ElasticSpec | None = None) -> LaunchSpec:
    """Check the whole launch; raise LaunchError (one line) on the first problem."""
    if hosts_spec and hostfile:
        raise LaunchError("give either -H or --hostfile, not both")
    if elastic is not None:  # hosts come from the discovery script, and may change during the job
        if hosts_spec or hostfile or mpi or backend == "multi_worker":
            raise LaunchError("--elastic takes its hosts from --host-discovery-script and runs Horovod on Gloo; "
                              "drop -H/--hostfile/--mpi/--backend multi_worker")
        check_sizes(elastic, np)
        hosts = discover_hosts(elastic.discovery_script)
    else:
        hosts = parse_hosts(hosts_spec) if hosts_spec else parse_hostfile(hostfile) if hostfile else [Host("localhost", max(np, 1))]
        assign_ranks(hosts, np)  # -np >= 1 and within the slots
    # First only the backend the config names. Its ZeRO rules wait for the backend chosen here (zero with a
    # `single` config is what `strata launch --backend horovod` is for), in the full check below.
    resolved, _ = validate_config(config, [*overrides, "distribution.zero=0"])
    chosen = backend or (resolved["distribution"]["backend"] if resolved["distribution"]["backend"] in
                         ("horovod", "multi_worker") else "horovod")
    if mpi and chosen != "horovod":
        raise LaunchError("--mpi selects Horovod's MPI controller; it needs --backend horovod")
    # Elastic: the global batch stays data.batch_size at every size, so it must split over each of them.
    sizes = list(range(elastic.min_np, elastic.max_np + 1)) if elastic else [np]
    resolved, layouts = validate_config(config, [*overrides, f"distribution.backend={chosen}"],
                                        replicas=sizes, replicas_as="-np ({n})")
    layout = layouts[sizes.index(np)]
    if chosen == "multi_worker" and not all(is_local(h) for h in hosts):
        raise LaunchError("--backend multi_worker starts workers on this machine only; across nodes use "
                          "`strata slurm submit` or --backend horovod")
    controller = "mpi" if mpi else "gloo"
    if chosen == "horovod":
        check_horovod_controller(controller)
    check_reachable(hosts)
    if stop_after is not None and stop_after < 1:
        raise LaunchError(f"--stop-after {stop_after}: must be a positive number of steps")
    return LaunchSpec(np, hosts, chosen, controller, config, list(overrides), resolved, layout, stop_after, elastic)


def run(p: LaunchSpec, *, grace_seconds: float = DEFAULT_GRACE_S) -> int:
    """Start the workers and supervise them; the exit code is the job's. `grace_seconds`: after Ctrl-C or
    SIGTERM, how long the ranks may take to stop at an agreed step and checkpoint it (launch/stopping.py)."""
    print(f"strata: launching {p.np} {p.backend} worker(s) on {','.join(f'{h.name}:{h.slots}' for h in p.hosts)}"
          f" | global batch {p.layout['global_batch']} = {p.np} x {p.layout['per_replica_batch']} per replica",
          flush=True)
    # Hang watchdog over the ranks' heartbeats (train.watchdog_timeout_s; 0 turns it off).
    timeout_s, startup_s = heartbeat_settings(p.resolved)
    timeout_s = 0 if p.elastic else timeout_s  # the watchdog knows a fixed set of ranks; elastic ranks change
    beats = heartbeat_dir_for(_run_dir(p), all_local=all(is_local(h) for h in p.hosts)) if timeout_s > 0 else None
    try:
        if p.backend == "multi_worker":
            return _run_multi_worker(p, grace_seconds, beats, startup_s)
        return _run_horovodrun(p, grace_seconds, beats, startup_s)
    finally:
        if beats is not None:
            remove_heartbeat_dir(beats)


def _run_multi_worker(p: LaunchSpec, grace_seconds: float, beats: Path | None, startup_s: float) -> int:
    placements = assign_ranks(p.hosts, p.np)
    workers = [f"127.0.0.1:{port}" for port in free_ports(p.np)]
    envs = [child_environ(os.environ, {**rank_env(pl, world_size=p.np, backend="multi_worker",
                                                  tf_config_json=tf_config(workers, pl.rank)),
                                       **supervision_env(beats)}) for pl in placements]
    return run_local([p.worker_command()] * p.np, envs, grace_seconds=grace_seconds, heartbeat_dir=beats,
                     startup_s=startup_s, run_dir=_run_dir(p))


def _run_horovodrun(p: LaunchSpec, grace_seconds: float, beats: Path | None, startup_s: float) -> int:
    program = shutil.which("horovodrun") or str(Path(sys.executable).parent / "horovodrun")
    if p.elastic:
        e = p.elastic
        argv = horovodrun_elastic_argv(np=p.np, min_np=e.min_np, max_np=e.max_np, discovery_script=e.discovery_script,
                                       command=p.worker_command(), local_only=all_local(p.hosts),
                                       cooldown_range=e.cooldown_range, program=program)
    else:
        argv = horovodrun_argv(np=p.np, hosts=p.hosts, controller=p.controller, command=p.worker_command(),
                               as_root=os.geteuid() == 0, program=program)
    env = child_environ(os.environ, {contract.ENV_BACKEND: "horovod", **supervision_env(beats)})
    # Horovod options from the config (distribution.horovod) are applied by each rank before hvd.init().
    # Elastic: Horovod's driver assigns ranks to hosts (and re-assigns them at every reset), so no fixed map.
    hosts = [] if p.elastic else [pl.host for pl in assign_ranks(p.hosts, p.np)]
    return run_horovodrun(argv, env, hosts=hosts, heartbeat_dir=beats,
                          startup_s=startup_s, grace_seconds=grace_seconds, run_dir=_run_dir(p))


def _run_dir(p: LaunchSpec) -> Path:
    """The job's run directory (the config's run_dir, else runs/<name>), as the ranks resolve it."""
    return contract.run_dir_of(p.resolved["name"], p.resolved["run_dir"])
