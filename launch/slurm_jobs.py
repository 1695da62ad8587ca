"""SLURM jobs, the part that talks to SLURM: `strata slurm submit` and `strata slurm run-rank`.

submit: validate the config and its parallel layout over the job's replicas (the trainer's own checks, in a
child process), check the resources against it and against SLURM (`sinfo` for the partition,
`sbatch --test-only` for the rest), then write the config snapshot and the batch script into RUN_DIR/slurm/
and `sbatch` it. Bad input stops before anything is written or submitted. --dry-run runs the same checks,
names those it could not run (no SLURM here, controller down) and prints the script instead of writing it.
The snapshot is what every start of the job trains, so editing the YAML while the job waits or after a
requeue cannot change a run halfway.

run-rank: executed by srun once per rank; reads SLURM's variables, builds the rank's environment
(launch/slurm.py) and execs `python -m trainer train` with it. No Strata launcher reads a SLURM job's
output, so the rank labels its own lines `[rank R] ` (STRATA_OUTPUT_PREFIX, trainer/output.py), the prefix
`strata launch` uses; srun --label would write `0: ` instead, and only per srun, not per rank's whole line.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from launch import slurm
from launch import contract
from launch.errors import LaunchError
from launch.hostlist import expand_hostlist
from launch.launcher import validate_config

SBATCH_TIMEOUT_S = 60


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise LaunchError(f"`{name}` not found: run this on a SLURM login node, or start a local cluster with "
                          "`slurm/local-cluster.sh start` (see the README); --dry-run prints the script without SLURM")
    return path


def _run(argv: list[str], *, input_text: str | None = None, timeout: float = SBATCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, input=input_text, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"`{' '.join(argv[:2])}` did not answer in {timeout:.0f} s; is slurmctld up "
                          "(`scontrol ping`)?") from None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


_UNREACHABLE = ("Unable to contact slurm controller", "Socket timed out", "Zero Bytes were transmitted")


def partitions() -> tuple[list[str] | None, str]:
    """(partition names SLURM knows, "") or (None, why SLURM could not say: no sinfo, controller down)."""
    if shutil.which("sinfo") is None:
        return None, "`sinfo` not found"
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return None, "`sinfo` did not answer in 20 s"
    if done.returncode != 0:
        return None, f"`sinfo` failed: {_last_line(done.stderr)}"
    return sorted({line.strip() for line in done.stdout.splitlines() if line.strip()}), ""


def check_partition(partition: str | None) -> str | None:
    """Refuse a partition SLURM does not have. Returns why the check could not run (None: checked, or no
    --partition given); a submit goes on then and lets sbatch judge."""
    if not partition:
        return None
    known, why = partitions()
    if known is None:
        return why
    if partition not in known:
        raise LaunchError(f"--partition {partition!r}: SLURM has no such partition (known: {', '.join(known) or 'none'}); "
                          "pick one of those or leave --partition out for the default")
    return None


def test_only(script: str, *, dry_run: bool = False) -> str | None:
    """`sbatch --test-only`: SLURM's own check that the request can ever be satisfied (nodes, GPUs, time).
    A dry run returns why it could not run (no sbatch, controller down) instead of refusing; else None."""
    if dry_run and shutil.which("sbatch") is None:
        return "`sbatch` not found"
    try:
        done = _run([_tool("sbatch"), "--test-only"], input_text=script)
    except LaunchError as err:  # no answer in time
        if dry_run:
            return str(err).split(";")[0]
        raise
    if done.returncode != 0:
        reason = _last_line(done.stderr).removeprefix("sbatch: error: ")
        if any(text in reason for text in _UNREACHABLE):
            if dry_run:
                return f"SLURM's controller did not answer ({reason})"
            raise LaunchError(f"SLURM's controller does not answer ({reason}); is slurmctld up (`scontrol ping`)?")
        raise LaunchError(f"SLURM refuses this job: {reason}; change --nodes/--ntasks-per-node/--gpus-per-node/"
                          "--time/--partition to what the cluster has (`sinfo`)")
    return None


def follow_commands(job_id: str, logs: str) -> list[str]:
    """The commands to watch and stop a submitted job, one per line, each one pasteable as it is (pure)."""
    return [f"tail -f {slurm.sh(f'{logs}.out')} {slurm.sh(f'{logs}.err')}",
            f"squeue -j {slurm.sh(job_id)}",
            f"scancel {slurm.sh(job_id)}"]


def dry_run_note(*, partition_given: bool, skipped: dict[str, str], config_path: str) -> str:
    """The line a dry run ends with: what was checked, what could not be and why (pure). `skipped` maps
    "partition" / "test-only" to why that check could not run."""
    names = {"partition": "the partition (sinfo)", "test-only": "the request (sbatch --test-only)"}
    asked = [k for k in names if k != "partition" or partition_given]
    checked = ["the config", "the resources against it"] + [names[k] for k in asked if k not in skipped]
    note = f"strata: dry run: checked {', '.join(checked)}"
    missed = [f"{names[k]}: {why}" for k, why in skipped.items() if k in asked]
    if missed:
        note += f"; could NOT check {'; '.join(missed)}"
    return note + f"; nothing written or submitted ({config_path} would hold the resolved config)"


def submit(*, config: str, overrides: list[str], backend: str | None, nodes: int, ntasks_per_node: int | None,
           gpus_per_node: int, time: str | None, partition: str | None, account: str | None,
           job_name: str | None, warning: int, template: str | None, dry_run: bool) -> int:
    """Check the job like SLURM would (a dry run too), then write RUN/slurm/ and sbatch it."""
    first, _ = validate_config(config, overrides)
    chosen = backend or (first["distribution"]["backend"] if first["distribution"]["backend"] in slurm.BACKENDS
                         else "horovod")
    resources = slurm.check_resources(first, backend=chosen, nodes=nodes, ntasks_per_node=ntasks_per_node,
                                      gpus_per_node=gpus_per_node, time=time, warning_seconds=warning)
    resolved, _ = validate_config(config, [*overrides, f"distribution.backend={chosen}"],
                                  replicas=[resources.replicas], replicas_as=resources.replicas_as)
    run_dir = contract.run_dir_of(resolved["name"], resolved["run_dir"]).absolute()
    resolved["run_dir"] = str(run_dir)
    job_dir = run_dir / "slurm"
    job = slurm.JobScript(
        job_name=job_name or f"strata-{resolved['name']}", resources=resources, backend=chosen,
        python=sys.executable, config=str(job_dir / contract.RUN_CONFIG_FILE), workdir=str(Path.cwd()),
        log_dir=str(job_dir), partition=partition, account=account)
    script = slurm.render_script(job, template=Path(template) if template else None)
    skipped = {"partition": check_partition(partition), "test-only": test_only(script, dry_run=dry_run)}
    if dry_run:
        sys.stdout.write(script)
        sys.stdout.flush()
        print(dry_run_note(partition_given=bool(partition), skipped={k: v for k, v in skipped.items() if v},
                           config_path=job.config), file=sys.stderr)
        return 0
    job_dir.mkdir(parents=True, exist_ok=True)
    Path(job.config).write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
    script_path = job_dir / "job.sbatch"
    script_path.write_text(script, encoding="utf-8")
    done = _run([_tool("sbatch"), "--parsable", str(script_path)])
    if done.returncode != 0:
        raise LaunchError(f"sbatch refused {script_path}: {_last_line(done.stderr).removeprefix('sbatch: error: ')}")
    job_id = done.stdout.strip().split(";")[0]
    print(f"strata: submitted job {job_id}: {resources.nodes} node(s) x {resources.tasks_per_node} task(s), {chosen}"
          f"{f', {resources.gpus_per_node} GPU(s) per node' if resources.gpus_per_node else ''}", flush=True)
    print(f"strata: script {script_path}")
    print("strata: to follow the job's output, see it in the queue, or cancel it, run:")
    for command in follow_commands(job_id, str(job_dir / f"slurm-{job_id}")):
        print(command)
    return 0


def node_list(environ) -> list[str]:
    """The step's nodes, expanded by `scontrol show hostnames` (the pure expansion when scontrol is absent)."""
    expr = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not expr:
        raise LaunchError("SLURM_JOB_NODELIST is not set: run this under srun inside a SLURM job")
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            done = subprocess.run([scontrol, "show", "hostnames", expr], capture_output=True, text=True, timeout=30)
            if done.returncode == 0 and done.stdout.split():
                return done.stdout.split()
        except subprocess.TimeoutExpired:
            pass
    return expand_hostlist(expr)


def run_rank(*, config: str, overrides: list[str], backend: str, gpus_per_node: int) -> int:
    environ = dict(os.environ)
    rank = slurm.read_rank(environ, node_list(environ))
    env = slurm.rank_environment(environ, rank, backend=backend, gpus_per_node=gpus_per_node)
    print(env[contract.ENV_OUTPUT_PREFIX] + slurm.describe_rank(rank, env), flush=True)
    argv = contract.train_command(sys.executable, config, overrides, backend=backend)
    # Until the trainer installs its handler (after Python starts), an early preemption warning is ignored
    # rather than fatal (SIGUSR1's default action kills); SIGTERM keeps its default. Ignored survives exec.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    os.execve(argv[0], argv, env)
    return 0  # not reached
