"""SLURM jobs, the pure part: resource checks, the batch script, and what each rank derives from SLURM's
environment. Nothing here runs a command; `launch/slurm_jobs.py` calls sbatch/scontrol and execs.

One job = N nodes x T tasks per node, one task per rank, started by `srun` inside the batch script. Each
rank runs `python -m launch.cli slurm run-rank`, which reads SLURM_PROCID / SLURM_LOCALID / the node list,
builds what its backend needs (TF_CONFIG for multi_worker; Horovod's MPI controller over SLURM's PMIx for
horovod), picks its GPUs by local rank and execs `python -m trainer train`.

Ranks are placed in SLURM's default block order (all ranks of the first node, then the next), which is
what `hosts.assign_ranks` computes from the nodes and SLURM_TASKS_PER_NODE; every rank checks that its
own SLURMD_NODENAME / SLURM_LOCALID agree, so a cyclic distribution is refused instead of mis-wired.
"""
from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from launch import contract
from launch.contract import PREEMPTED_EXIT_CODE, rank_prefix
from launch.env import rank_env, tf_config
from launch.errors import LaunchError
from launch.hostlist import expand_counts
from launch.hosts import Host, RankPlacement, assign_ranks

BACKENDS = ("horovod", "multi_worker")
DEFAULT_WARNING_SECONDS = 90
TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "slurm"
TEMPLATE = "strata.sbatch.j2"

# multi_worker ports: one block of PORT_BLOCK ports per (job, start), below Linux's ephemeral range
# (32768+), so a requeued job (same id, next restart count) never waits for its old ports to be released.
PORT_BASE, PORT_BLOCK, PORT_BLOCKS = 20000, 64, 190

_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


# ----------------------------------------------------------------------------------------- resources
def parse_time(text: str) -> int | None:
    """Seconds of a SLURM time limit (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`);
    None for no limit (`0`, `UNLIMITED`, `INFINITE`)."""
    t = text.strip()
    if t.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _TIME.fullmatch(t)
    if not m:
        raise LaunchError(f"--time {text!r}: use minutes, MM:SS, HH:MM:SS or D-HH:MM:SS (e.g. --time 2:00:00)")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # MM:SS
        seconds = int(a) * 60 + int(b)
    else:  # MM
        seconds = int(a) * 60
    return seconds or None


def devices_per_task(resolved: dict) -> int:
    """Devices one rank trains on: its pipeline stages (one device each), else one."""
    pipe = resolved["distribution"].get("pipeline")
    return int(pipe["stages"]) if pipe else 1


@dataclass(frozen=True)
class Resources:
    """What the job asks SLURM for, checked against the config."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    time_seconds: int | None
    warning_seconds: int
    local_replicas: int = 1  # replicas per task: a multi_worker task's GPUs; one otherwise

    @property
    def tasks(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def replicas(self) -> int:
        """Data-parallel replicas of the job (what the global batch is split over)."""
        return self.tasks * self.local_replicas

    @property
    def replicas_as(self) -> str:
        """How the request makes its replicas, for the layout check's messages (`{n}`: their number)."""
        per_worker = f" x {self.local_replicas} GPUs per worker" if self.local_replicas > 1 else ""
        return f"the job's {{n}} replicas (--nodes {self.nodes} x --ntasks-per-node {self.tasks_per_node}{per_worker})"


def check_resources(resolved: dict, *, backend: str, nodes: int, ntasks_per_node: int | None,
                    gpus_per_node: int, time: str | None, warning_seconds: int = DEFAULT_WARNING_SECONDS) -> Resources:
    """Refuse requests that cannot work, with the numbers and a fix in the one-line message. Whether the
    config's batch splits over the job's replicas is the worker's check (`python -m trainer validate
    --replicas`, see slurm_jobs.submit), like everything else about the parallel layout."""
    if backend not in BACKENDS:
        raise LaunchError(f"--backend {backend!r}: SLURM jobs run one task per rank; use horovod or multi_worker")
    if nodes < 1:
        raise LaunchError(f"--nodes {nodes}: must be at least 1")
    if gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node {gpus_per_node}: must be 0 (CPU only) or more")
    per_task = devices_per_task(resolved)
    where = "distribution.pipeline.stages" if per_task > 1 else "one device per rank"
    if ntasks_per_node is None:
        ntasks_per_node = max(gpus_per_node // per_task, 1)
    if ntasks_per_node < 1:
        raise LaunchError(f"--ntasks-per-node {ntasks_per_node}: must be at least 1")
    if gpus_per_node:
        if gpus_per_node != ntasks_per_node * per_task and (backend == "horovod" or per_task > 1):
            fix = gpus_per_node // per_task or 1
            raise LaunchError(
                f"--gpus-per-node {gpus_per_node} does not match --ntasks-per-node {ntasks_per_node} x {per_task} "
                f"device(s) per rank ({where}); use --ntasks-per-node {fix} or --gpus-per-node "
                f"{ntasks_per_node * per_task}")
        if gpus_per_node % ntasks_per_node:
            raise LaunchError(f"--gpus-per-node {gpus_per_node} does not split evenly over --ntasks-per-node "
                              f"{ntasks_per_node}; make it a multiple")
    local_replicas = gpus_per_node // ntasks_per_node if (gpus_per_node and backend == "multi_worker") else 1
    seconds = parse_time(time) if time else None
    if warning_seconds < 0 or warning_seconds > 65535:
        raise LaunchError(f"--warning {warning_seconds}: seconds before the time limit, 0..65535")
    if seconds is not None and seconds <= warning_seconds:
        raise LaunchError(f"--time {time} ({seconds} s) leaves no time before the preemption warning "
                          f"({warning_seconds} s before the end); ask for more time or lower --warning")
    return Resources(nodes, ntasks_per_node, gpus_per_node, seconds, warning_seconds, local_replicas)


# ------------------------------------------------------------------------------------------ quoting
def sh(value) -> str:
    """Quote for bash: the value reaches the command as exactly one word, whatever it contains."""
    return shlex.quote(str(value))


def directive(value) -> str:
    """Quote an `#SBATCH` option value. sbatch reads these lines itself (not through a shell): it groups
    words with double quotes and takes the character after a backslash literally, and an unquoted '#'
    starts a comment. So: double quotes, with backslash before '"' and '\\'."""
    text = str(value)
    if "\n" in text or "\r" in text:
        raise LaunchError(f"{text!r}: a line break cannot go into a batch script option; rename it")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def filename_literal(path: str) -> str:
    """A path as a literal part of an sbatch filename pattern: '%' is written '%%' (sbatch replaces %j etc.)."""
    if "\\" in path:  # a backslash anywhere switches off every %j replacement in the pattern
        raise LaunchError(f"{path!r}: SLURM log paths cannot contain a backslash; choose a run_dir without one")
    return path.replace("%", "%%")


def check_path(path: str, what: str) -> None:
    if any(c in path for c in "\n\r\0"):
        raise LaunchError(f"{what} {path!r} contains a line break; choose a path without one")


# ------------------------------------------------------------------------------------------- script
@dataclass(frozen=True)
class JobScript:
    """Everything the batch script contains."""

    job_name: str
    resources: Resources
    backend: str
    python: str  # the interpreter that has Strata installed (a virtual environment's bin/python)
    config: str  # the config snapshot the ranks train (written next to the script)
    workdir: str  # where the job runs (relative data paths in the config are relative to it)
    log_dir: str
    partition: str | None = None
    account: str | None = None
    extra_directives: list[str] = field(default_factory=list)

    @property
    def mpi(self) -> str:
        # Horovod: its MPI controller, wired by SLURM's PMIx (no mpirun, no ssh). multi_worker: no PMI at all.
        return "pmix" if self.backend == "horovod" else "none"


def time_directive(seconds: int | None) -> str | None:
    if seconds is None:
        return None
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{days}-{h:02d}:{m:02d}:{s:02d}"


def _environment(template_dir: Path) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_dir)), undefined=jinja2.StrictUndefined,
                             autoescape=False, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["sh"] = sh
    env.filters["directive"] = directive
    env.filters["int"] = _int
    return env


def _int(value) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LaunchError(f"expected a whole number in the batch script, got {value!r}")
    return str(value)


def render_script(job: JobScript, *, template: Path | None = None) -> str:
    """The batch script text. Every value from the config or the command line goes through `sh` (shell
    words) or `directive` (#SBATCH lines); numbers through `int`."""
    path = template or TEMPLATE_DIR / TEMPLATE
    if not path.is_file():
        raise LaunchError(f"batch script template {str(path)!r} not found; pass --template PATH "
                          f"(a copy of slurm/{TEMPLATE})")
    for what, value in (("run directory", job.log_dir), ("working directory", job.workdir),
                        ("config", job.config), ("python", job.python)):
        check_path(value, what)
    r = job.resources
    log = filename_literal(job.log_dir.rstrip("/"))
    return _environment(path.parent).get_template(path.name).render(
        job_name=job.job_name, nodes=r.nodes, tasks_per_node=r.tasks_per_node, tasks=r.tasks,
        gpus_per_node=r.gpus_per_node, time=time_directive(r.time_seconds), warning=r.warning_seconds,
        partition=job.partition, account=job.account, output=f"{log}/slurm-%j.out", error=f"{log}/slurm-%j.err",
        workdir=job.workdir, python=job.python, config=job.config, backend=job.backend, mpi=job.mpi,
        preempted=PREEMPTED_EXIT_CODE, extra_directives=job.extra_directives,
    )


# ------------------------------------------------------------------------------------ inside a rank
@dataclass(frozen=True)
class SlurmRank:
    """One rank, as SLURM describes it to the task."""

    job_id: int
    restart: int
    placement: RankPlacement
    placements: list[RankPlacement]  # every rank of the step, in rank order

    @property
    def world_size(self) -> int:
        return len(self.placements)


def _int_env(environ: Mapping[str, str], key: str, *, default: int | None = None) -> int:
    raw = environ.get(key)
    if raw is None or raw == "":
        if default is None:
            raise LaunchError(f"{key} is not set: run this under srun inside a SLURM job "
                              "(`strata slurm submit`, or srun in your own batch script)")
        return default
    if not raw.isdigit():
        raise LaunchError(f"{key}={raw!r} is not a whole number")
    return int(raw)


def slurm_placements(nodes: list[str], tasks_per_node: list[int]) -> list[RankPlacement]:
    """Every rank's host and local rank under SLURM's block distribution."""
    if len(nodes) != len(tasks_per_node):
        raise LaunchError(f"SLURM lists {len(nodes)} node(s) ({','.join(nodes)}) but {len(tasks_per_node)} "
                          f"task count(s) ({tasks_per_node}); they must pair up")
    if any(n < 1 for n in tasks_per_node):
        raise LaunchError(f"task counts {tasks_per_node}: every node needs at least one task")
    hosts = [Host(name, count) for name, count in zip(nodes, tasks_per_node)]
    return assign_ranks(hosts, sum(tasks_per_node))


def read_rank(environ: Mapping[str, str], nodes: list[str]) -> SlurmRank:
    """This task's rank, world size, local rank and host, and every rank's host, from SLURM's variables.

    `nodes` is the step's node list expanded (`scontrol show hostnames $SLURM_STEP_NODELIST`). Step
    variables (SLURM_STEP_*) win over job ones: an srun may use part of the allocation.
    """
    counts_spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if not counts_spec:
        raise LaunchError("SLURM_STEP_TASKS_PER_NODE is not set: run this under srun inside a SLURM job")
    placements = slurm_placements(nodes, expand_counts(counts_spec))
    rank = _int_env(environ, "SLURM_PROCID")
    world = _int_env(environ, "SLURM_STEP_NUM_TASKS", default=_int_env(environ, "SLURM_NTASKS", default=len(placements)))
    if world != len(placements):
        raise LaunchError(f"SLURM says {world} tasks but the task counts {counts_spec} add up to {len(placements)}")
    if not 0 <= rank < world:
        raise LaunchError(f"SLURM_PROCID {rank} is outside 0..{world - 1}")
    me = placements[rank]
    local = _int_env(environ, "SLURM_LOCALID", default=me.local_rank)
    node = environ.get("SLURMD_NODENAME") or me.host
    if (node, local) != (me.host, me.local_rank):
        raise LaunchError(f"rank {rank} runs on {node} as local rank {local}, but block order puts it on {me.host} "
                          f"as local rank {me.local_rank}; submit without --distribution (Strata needs block order)")
    return SlurmRank(job_id=_int_env(environ, "SLURM_JOB_ID", default=0),
                     restart=_int_env(environ, "SLURM_RESTART_COUNT", default=0),
                     placement=me, placements=placements)


def worker_ports(job_id: int, restart: int, local_size: int) -> list[int]:
    """TF_CONFIG ports of the local ranks of one node: agreed by every rank without talking (a pure function
    of the job id and restart count), different for each start of a requeued job."""
    if local_size > PORT_BLOCK:
        raise LaunchError(f"{local_size} ranks on one node: at most {PORT_BLOCK} multi_worker ranks per node")
    base = PORT_BASE + ((job_id * 7 + restart) % PORT_BLOCKS) * PORT_BLOCK
    return [base + i for i in range(local_size)]


def _visible_gpus(environ: Mapping[str, str], gpus_per_node: int) -> list[str]:
    """The GPUs SLURM gave this node's tasks (CUDA_VISIBLE_DEVICES of the step), else 0..G-1."""
    given = [g for g in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return given if len(given) >= gpus_per_node and given else [str(i) for i in range(gpus_per_node)]


def rank_environment(environ: Mapping[str, str], rank: SlurmRank, *, backend: str,
                     gpus_per_node: int) -> dict[str, str]:
    """The complete environment of one rank's trainer: `environ` (the task's) minus stale launcher
    variables, plus rank identity, the backend's wiring, the GPUs of this local rank, preemption, and the
    rank prefix of its output lines."""
    if backend not in BACKENDS:
        raise LaunchError(f"--backend {backend!r}: use horovod or multi_worker")
    me = rank.placement
    config_json = None
    drop: tuple[str, ...] = ()
    # No Strata launcher reads a SLURM rank's output: the rank prefixes its own lines (trainer/output.py).
    extra: dict[str, str] = {contract.ENV_PREEMPTION: "1", contract.ENV_OUTPUT_PREFIX: rank_prefix(me.rank)}
    if backend == "multi_worker":
        addresses = []
        for p in rank.placements:
            addresses.append(f"{p.host}:{worker_ports(rank.job_id, rank.restart, p.local_size)[p.local_rank]}")
        config_json = tf_config(addresses, me.rank)
        # MPI/PMI "you are one of N ranks" variables would make the trainer take this for an MPI launch and
        # refuse a non-Horovod backend.
        drop = contract.LAUNCHER_SIZE_VARS
    else:
        if not any(environ.get(key) for key in contract.PMI_RANK_VARS):
            raise LaunchError("the horovod backend under SLURM needs `srun --mpi=pmix` (Horovod's MPI controller "
                              "over SLURM's PMIx); add it to the srun line (see slurm/example.sbatch)")
        extra.update(HOROVOD_CONTROLLER="mpi", HOROVOD_CPU_OPERATIONS="mpi")
    gpus: list[str] | None = None
    if gpus_per_node:
        visible = _visible_gpus(environ, gpus_per_node)
        share = rank_env(me, world_size=rank.world_size, backend=backend, tf_config_json=config_json,
                         visible_gpus=list(range(len(visible))))["CUDA_VISIBLE_DEVICES"]
        gpus = [visible[int(i)] for i in share.split(",")]
    overrides = rank_env(me, world_size=rank.world_size, backend=backend, tf_config_json=config_json)
    overrides.update(extra)
    if gpus is not None:
        overrides["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    env = {k: v for k, v in environ.items() if k not in drop and k != contract.ENV_TF_CONFIG}
    env.update(overrides)
    return env


def describe_rank(rank: SlurmRank, env: Mapping[str, str]) -> str:
    """One line a rank prints before it starts training (in the job's log)."""
    me = rank.placement
    config = env.get(contract.ENV_TF_CONFIG)
    wiring = json.loads(config)["cluster"]["worker"][me.rank] if config else "MPI over PMIx"
    gpus = env.get("CUDA_VISIBLE_DEVICES")
    return (f"strata: slurm rank {me.rank}/{rank.world_size} on {me.host} (local {me.local_rank}/{me.local_size}), "
            f"job {rank.job_id} start {rank.restart + 1}, {env[contract.ENV_BACKEND]} {wiring}"
            + (f", GPUs {gpus}" if gpus is not None else ""))
