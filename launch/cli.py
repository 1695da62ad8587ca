"""The `strata` command.

The launcher never imports the trainer: it talks to it through a command line (`python -m trainer ...`),
a config file and environment variables, so either side can be replaced. Single-process commands are
handed over with exec (exit codes and signals pass through untouched).
"""
from __future__ import annotations

import argparse
import os
import sys

from launch import doctor, launcher, tensorboard
from launch.contract import USAGE_EXIT_CODE, train_command, trainer_command
from launch.errors import LaunchError
from launch.stopping import DEFAULT_GRACE_S, FAILURE_GRACE_S


class UsageError(Exception):
    """A bad command line: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="strata", description="Distributed training for TensorFlow.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a config in this process (resumes automatically)")
    t.add_argument("config")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--stop-after", type=int, default=None, metavar="N")
    e = sub.add_parser("evaluate", help="metrics of a trained run")
    e.add_argument("run_dir")
    e.add_argument("--split", choices=["val", "test"], default="test")
    _inference_parsers(sub)
    x = sub.add_parser("export", help="SavedModel serving raw text")
    x.add_argument("run_dir")
    x.add_argument("--out", default=None)
    tb = sub.add_parser("tensorboard", help="open TensorBoard on a run directory (binds 127.0.0.1)")
    tb.add_argument("run_dir")
    tb.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    tb.add_argument("--port", type=int, default=6006)
    sub.add_parser("doctor", help="what is installed and usable here")
    _plan_parser(sub)
    la = sub.add_parser("launch", help="start N data-parallel workers (Horovod or MultiWorkerMirrored)")
    la.add_argument("-np", type=int, required=True, dest="np", help="number of worker processes (ranks)")
    la.add_argument("-H", dest="hosts", default=None, help="hosts and slots, e.g. node1:4,node2:4 (default localhost:NP)")
    la.add_argument("--hostfile", default=None, help="file of `host slots=N` lines")
    la.add_argument("--backend", choices=["horovod", "multi_worker"], default=None,
                    help="default: the config's distribution.backend if it is one of these, else horovod")
    la.add_argument("--mpi", action="store_true", help="Horovod's MPI controller instead of Gloo")
    la.add_argument("--stop-after", type=int, default=None, metavar="N",
                    help="stop after N more steps (checkpointed); relaunch to continue")
    la.add_argument("--elastic", action="store_true",
                    help="Horovod elastic: workers may leave and (re)join; hosts from --host-discovery-script")
    la.add_argument("--min-np", type=int, default=None, help="elastic: fewest workers to keep training (default 1)")
    la.add_argument("--max-np", type=int, default=None, help="elastic: most workers (default -np)")
    la.add_argument("--host-discovery-script", default=None, metavar="SCRIPT",
                    help="elastic: executable printing one `host:slots` line per available host")
    la.add_argument("--blacklist-cooldown-range", type=int, nargs=2, default=[10, 300], metavar=("LO", "HI"),
                    help="elastic: seconds before a host whose worker failed may rejoin (default 10 300)")
    la.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, metavar="SECONDS",
                    help="after Ctrl-C or SIGTERM, how long every rank may take to reach the step they agree on, "
                         "checkpoint it and exit before it is killed (default: %(default)g; a second Ctrl-C "
                         f"kills at once). Ranks of a failed or hung job get at most {FAILURE_GRACE_S:g} s")
    la.add_argument("config")
    la.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _slurm_parser(sub)
    # Everything after `data` (options included: no prefix chars) is parsed by `python -m trainer data`.
    d = sub.add_parser("data", add_help=False, prefix_chars="\0",
                       help="prepare | verify a token-shard dataset (see `strata data --help`)")
    d.add_argument("data_args", nargs=argparse.REMAINDER)
    return p


def _inference_parsers(sub) -> None:
    """classify | summarize | generate RUN TEXT...; generate's options are checked by the trainer's parser."""
    for name in ("classify", "summarize", "generate"):
        c = sub.add_parser(name, help=f"{name} texts with a trained run" if name != "generate" else
                           "continue prompts with a trained language model (JSON lines)")
        c.add_argument("run_dir")
        c.add_argument("texts", nargs="+")
    g = sub.choices["generate"]
    g.add_argument("--max-tokens", default=None, help="most tokens to generate per prompt (default 32)")
    g.add_argument("--temperature", default=None, help="0 (default): greedy; > 0: sample from softmax(logits / T)")
    g.add_argument("--top-k", dest="top_k", default=None, help="sample among the K most likely tokens (default: all)")
    g.add_argument("--seed", default=None, help="seed of the sampling (default 0)")


def _plan_parser(sub) -> None:
    pl = sub.add_parser("plan", help="show ranks -> hosts -> devices -> stages -> levels, memory and schedule")
    pl.add_argument("config")
    pl.add_argument("-np", type=int, default=1, dest="np", help="number of data-parallel replicas (ranks)")
    pl.add_argument("-H", dest="hosts", default=None, help="hosts and slots, e.g. node1:4,node2:4")
    pl.add_argument("--hostfile", default=None, help="file of `host slots=N` lines")
    pl.add_argument("--dry-run", action="store_true",
                    help="also build the model, measure each level and run one pipelined step (no training)")
    pl.add_argument("--device-memory", default=None, metavar="SIZE",
                    help="memory per device, e.g. 80GB: refuse a run that does not fit (zero 0..3 shown), and show "
                         "the largest depth that fits")
    pl.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _slurm_parser(sub) -> None:
    s = sub.add_parser("slurm", help="submit to SLURM (sbatch), or run one rank inside a SLURM job")
    ssub = s.add_subparsers(dest="slurm_command", required=True, parser_class=_Parser)
    su = ssub.add_parser("submit", help="render slurm/strata.sbatch.j2 for CONFIG and sbatch it")
    su.add_argument("config")
    su.add_argument("--nodes", type=int, default=1)
    su.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU only (default)")
    su.add_argument("--ntasks-per-node", type=int, default=None,
                    help="ranks per node (default: one per GPU, or per pipeline's devices; 1 without GPUs)")
    su.add_argument("--time", default=None, help="time limit, e.g. 2:00:00 or 1-00:00:00")
    su.add_argument("--partition", default=None)
    su.add_argument("--account", default=None)
    su.add_argument("--job-name", default=None, help="default: strata-<config name>")
    su.add_argument("--backend", choices=["horovod", "multi_worker"], default=None,
                    help="default: the config's distribution.backend if it is one of these, else horovod")
    su.add_argument("--warning", type=int, default=90, metavar="SECONDS",
                    help="preemption warning: SIGUSR1 this many seconds before the time limit (default 90)")
    su.add_argument("--template", default=None, help="your own copy of slurm/strata.sbatch.j2")
    su.add_argument("--dry-run", action="store_true",
                    help="run the checks of a real submit (saying which could not run), print the batch script; "
                         "write and submit nothing")
    su.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    rr = ssub.add_parser("run-rank", help="(inside a job, under srun) start this task's rank of CONFIG")
    rr.add_argument("config")
    rr.add_argument("--backend", choices=["horovod", "multi_worker"], required=True)
    rr.add_argument("--gpus-per-node", type=int, default=0)
    rr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _slurm(args: argparse.Namespace) -> int:
    from launch import slurm_jobs

    if args.slurm_command == "submit":
        return slurm_jobs.submit(config=args.config, overrides=args.overrides, backend=args.backend,
                                 nodes=args.nodes, ntasks_per_node=args.ntasks_per_node,
                                 gpus_per_node=args.gpus_per_node, time=args.time, partition=args.partition,
                                 account=args.account, job_name=args.job_name, warning=args.warning,
                                 template=args.template, dry_run=args.dry_run)
    return slurm_jobs.run_rank(config=args.config, overrides=args.overrides, backend=args.backend,
                               gpus_per_node=args.gpus_per_node)


def _elastic_spec(args: argparse.Namespace):
    """The elastic part of `strata launch`, or None; UsageError for elastic options without --elastic."""
    from launch.elastic_checks import ElasticSpec

    given = [flag for flag, value in (("--min-np", args.min_np), ("--max-np", args.max_np),
                                      ("--host-discovery-script", args.host_discovery_script)) if value is not None]
    if not args.elastic:
        if given:
            raise UsageError(f"{given[0]} needs --elastic")
        return None
    if args.host_discovery_script is None:
        raise UsageError("--elastic needs --host-discovery-script SCRIPT (prints `host:slots` lines)")
    return ElasticSpec(min_np=1 if args.min_np is None else args.min_np,
                       max_np=args.np if args.max_np is None else args.max_np,
                       discovery_script=args.host_discovery_script,
                       cooldown_range=tuple(args.blacklist_cooldown_range))


def trainer_argv(args: argparse.Namespace) -> list[str]:
    """The `python -m trainer` command line for a single-process command (pure)."""
    python = sys.executable
    if args.command == "train":
        return train_command(python, args.config, args.overrides, stop_after=args.stop_after)
    if args.command == "evaluate":
        return trainer_command(python, "evaluate", args.run_dir, "--split", args.split)
    if args.command in ("classify", "summarize"):
        return trainer_command(python, args.command, args.run_dir, "--", *args.texts)
    if args.command == "generate":  # values are checked by the trainer's parser
        options = [item for flag, value in (("--max-tokens", args.max_tokens), ("--temperature", args.temperature),
                                            ("--top-k", args.top_k), ("--seed", args.seed)) if value is not None
                   for item in (flag, value)]
        return trainer_command(python, "generate", args.run_dir, *options, "--", *args.texts)
    if args.command == "plan":
        argv = trainer_command(python, "plan", args.config, "--ranks", ",".join(args.placement),
                               overrides=args.overrides)
        argv += ["--device-memory", args.device_memory] if args.device_memory is not None else []
        return argv + (["--dry-run"] if args.dry_run else [])
    if args.command == "export":
        return trainer_command(python, "export", args.run_dir, *(["--out", args.out] if args.out else []))
    if args.command == "data":
        return trainer_command(python, "data", *args.data_args)
    raise ValueError(args.command)


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command == "doctor":
            return doctor.run()
        if args.command == "tensorboard":
            return tensorboard.serve(args.run_dir, host=args.host, port=args.port)
        if args.command == "launch":
            spec = launcher.check_launch(np=args.np, hosts_spec=args.hosts, hostfile=args.hostfile,
                                         backend=args.backend, mpi=args.mpi, config=args.config,
                                         overrides=args.overrides, stop_after=args.stop_after,
                                         elastic=_elastic_spec(args))
            return launcher.run(spec, grace_seconds=args.grace)
        if args.command == "slurm":
            return _slurm(args)
        if args.command == "plan":
            args.placement = launcher.rank_hosts(np=args.np, hosts_spec=args.hosts, hostfile=args.hostfile)
        command = trainer_argv(args)
    except (UsageError, LaunchError) as err:
        print(f"strata: error: {err}", file=sys.stderr)
        return USAGE_EXIT_CODE
    sys.stdout.flush()
    os.execv(command[0], command)  # replaces this process: no shell, arguments passed as a list
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
