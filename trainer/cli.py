"""`python -m trainer COMMAND ...`: the worker's entry point (what runs inside each rank).

Users normally go through `strata` (launch/cli.py), which calls this module; Horovod users can also call
it directly: `horovodrun -np 2 -H localhost:2 python -m trainer train configs/classifier.yaml`.

Every user error ends here as one line on stderr and exit code 2. TensorFlow is imported only after the
config has been validated, so a typo fails in well under a second.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from launch.contract import INTERRUPTED_EXIT_CODE
from trainer.errors import ConfigError, UserError
from trainer.tasks import TASKS

INFERENCE_COMMANDS = {task.command: task.command_help for task in TASKS.values()}  # classify, summarize


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would print the usage too)
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m trainer", description="Strata worker: runs inside one rank.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def with_overrides(sp):
        sp.add_argument("config", help="experiment YAML, e.g. configs/classifier.yaml, or a run directory "
                                       "(its saved config.yaml: resumes that run)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optimizer.lr=3e-4 (repeatable)")

    t = sub.add_parser("train", help="train (resumes from the run directory's latest checkpoint)")
    with_overrides(t)
    t.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N more steps (checkpointed), e.g. to split a run into chunks")
    v = sub.add_parser("validate", help="check a config (and that its run directory can resume with it); "
                                        "print it resolved, as JSON")
    with_overrides(v)
    v.add_argument("--replicas", default=None, metavar="N[,N...]",
                   help="also check the parallel layout for each number of data-parallel replicas; print "
                        '{"config": ..., "layouts": [...]}')
    v.add_argument("--replicas-as", default=None, metavar="TEXT",
                   help="how the user asked for the replicas, for the messages; {n} is the count (e.g. '-np ({n})')")
    pl = sub.add_parser("plan", help="print ranks, devices, stages, levels, memory and schedule")
    with_overrides(pl)
    pl.add_argument("--ranks", default="localhost:0", help="host:local_rank of every rank, comma-separated")
    pl.add_argument("--dry-run", action="store_true", help="measure levels and run one pipelined step")
    pl.add_argument("--device-memory", default=None, metavar="SIZE",
                    help="memory per device, e.g. 80GB: refuse a run that does not fit, show the largest that does")
    e = sub.add_parser("evaluate", help="metrics of a trained run on a split")
    e.add_argument("run_dir")
    e.add_argument("--split", choices=["val", "test"], default="test")
    for name, what in INFERENCE_COMMANDS.items():
        c = sub.add_parser(name, help=f"run a trained model on {what}")
        c.add_argument("run_dir")
        c.add_argument("texts", nargs="+")
        if name == "generate":
            _generate_options(c)
    x = sub.add_parser("export", help="write a SavedModel that serves raw text")
    x.add_argument("run_dir")
    x.add_argument("--out", default=None, help="output directory (default RUN_DIR/export)")
    from trainer.data.commands import add_parser as add_data_parser

    add_data_parser(sub)  # data prepare | verify
    return p


def _generate_options(c: argparse.ArgumentParser) -> None:
    """`generate`'s sampling options (trainer/models/generation.py)."""
    def at_least(low, kind):
        def parse(text: str):
            value = kind(text)
            if value < low:
                raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
            return value
        parse.__name__ = kind.__name__
        return parse

    c.add_argument("--max-tokens", dest="max_tokens", type=at_least(1, int), default=32,
                   help="most tokens to generate per prompt (default 32)")
    c.add_argument("--temperature", type=at_least(0.0, float), default=0.0,
                   help="0 (default): greedy; > 0: sample from softmax(logits / T)")
    c.add_argument("--top-k", dest="top_k", type=at_least(0, int), default=0,
                   help="sample among the K most likely tokens only (default 0: all)")
    c.add_argument("--seed", type=at_least(0, int), default=0, help="seed of the sampling (default 0)")


def main(argv: list[str] | None = None) -> int:
    from trainer import output

    output.install()  # first: TensorFlow's own log lines filtered off fd 2 (STRATA_TF_LOGS=1 shows them)
    try:
        args = _parser().parse_args(argv)
        return _dispatch(args)
    except UserError as err:
        print(f"strata: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as stop:
        if hasattr(stop, "exit_code"):  # preemption.StoppedDuringStartup: Ctrl-C/SIGTERM before anything was written
            print(stop.message, file=sys.stderr)
            return stop.exit_code
        print("strata: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "data":  # no config, no TensorFlow
        from trainer.data.commands import run

        return run(args)
    from trainer.config import load_config

    if args.command == "validate":
        return _validate(args)
    if args.command == "plan":
        from trainer.plan import parse_ranks, run_plan

        cfg = load_config(args.config, args.overrides)
        return run_plan(cfg, parse_ranks(args.ranks), dry_run=args.dry_run, device_memory=args.device_memory)
    if args.command == "train":
        cfg = load_config(args.config, args.overrides)
        if args.stop_after is not None and args.stop_after < 1:
            raise UserError(f"--stop-after {args.stop_after}: must be a positive number of steps")
        return _train(cfg, stop_after=args.stop_after)
    from trainer.config import load_run_config

    cfg = load_run_config(args.run_dir)  # no TensorFlow yet: a wrong directory or split fails in a second
    if args.command == "evaluate":
        from trainer.data.splits import check_split

        check_split(cfg.data, args.split, args.run_dir)  # before TensorFlow: never score val as "test"
    if args.command in INFERENCE_COMMANDS and args.command != cfg.task.command:
        raise UserError(f"{args.run_dir} holds a {cfg.task} model; use `strata {cfg.task.command}`")
    exp, _ = _restore(cfg)
    if args.command == "evaluate":
        from trainer.loop import evaluate
        from trainer.strategy.single import SingleDevice

        metrics = evaluate(exp, SingleDevice(), split=args.split)
        names = {"classes": list(exp.labels.names)} if exp.labels.names else {}
        print(json.dumps({"split": args.split, "step": exp.checkpointer.latest_step, **names, **metrics}))
    elif args.command in INFERENCE_COMMANDS:  # JSON lines: one per input, with the input
        options = {name: getattr(args, name) for name in exp.task.command_options}
        for answer in exp.task.answer(exp, args.texts, **options):
            print(json.dumps(answer))
    elif args.command == "export":
        from trainer.export import export_saved_model

        out = export_saved_model(exp, Path(args.out) if args.out else exp.run_dir / "export")
        outputs = exp.task.serving_outputs(exp.labels)
        print(f"exported SavedModel to {out} (signature serving_default: text -> {outputs})")
    return 0


def _validate(args: argparse.Namespace) -> int:
    """The config, checked against its run directory (`strata launch` refuses a bad resume before any rank
    starts) and, with --replicas, laid out for each replica count; printed as JSON (launch/contract.py)."""
    from trainer.config import load_config
    from trainer.parallel.layout import LayoutError, layout_for
    from trainer.resume import check_run_dir

    cfg = load_config(args.config, args.overrides)
    check_run_dir(cfg)
    resolved = cfg.model_dump(mode="json")
    if args.replicas is None:
        print(json.dumps(resolved))
        return 0
    counts = args.replicas.split(",")
    if not all(c.isdigit() and int(c) > 0 for c in counts):
        raise UserError(f"--replicas {args.replicas!r}: expected positive whole numbers, e.g. --replicas 1,2")
    try:
        layouts = [layout_for(cfg, int(n), args.replicas_as).to_json() for n in counts]
    except LayoutError as err:
        raise ConfigError(str(err)) from None
    print(json.dumps({"config": resolved, "layouts": layouts}))
    return 0


def _restore(cfg):
    """A trained run's experiment with its latest checkpoint loaded (single device)."""
    from trainer.experiment import configure_runtime, prepare
    from trainer.strategy.single import SingleDevice

    configure_runtime(cfg)
    exp = prepare(cfg, SingleDevice(), training=False)
    step = exp.checkpointer.restore_latest()
    if step == 0:
        raise UserError(f"{exp.run_dir}: no checkpoint yet; train first with `strata train`")
    return exp, step


def _print_data_facts(cfg, splits) -> None:
    """What the run trains on (examples per split and where each came from) and any setting adjusted."""
    from trainer.data.splits import describe_splits

    print(f"strata: {describe_splits(splits)}", flush=True)
    _, note = cfg.warmup()
    if note:
        print(f"strata: note: {note}", flush=True)


def _run_training(exp, strategy, stop_after: int | None):
    """The training loop (elastic when started by `strata launch --elastic`); a data error raised inside
    tf.data (a shard damaged while training) comes out as the one-line DataError it was."""
    import tensorflow as tf

    from trainer.data.stream import data_error_in

    try:
        if getattr(strategy, "elastic", False):  # HOROVOD_ELASTIC=1
            from trainer.elastic_loop import train_elastic

            return train_elastic(exp, strategy, stop_after=stop_after)
        from trainer.loop import train

        return train(exp, strategy, stop_after=stop_after)
    except tf.errors.OpError as err:
        data_error = data_error_in(err)
        if data_error is None:
            raise
        raise data_error from None


def _before_tensorflow(cfg) -> bool:
    """Start-up that needs no TensorFlow: catch the stop signals, check the run directory against the config
    (its saved config and newest checkpoint: milliseconds) and say what this start does (rank 0). True when
    the run has nothing left to do."""
    from trainer import preemption, resume
    from trainer.strategy import launched_world_size

    rank = resume.env_rank()
    multi_process = cfg.distribution.backend in ("horovod", "multi_worker") or launched_world_size() > 1
    # From now on Ctrl-C, SIGTERM and SIGUSR1 stop the run at a checkpointed step.
    preemption.install(multi_process=multi_process, rank=rank,
                       checkpoints=cfg.resolved_run_dir() / resume.CHECKPOINT_DIR)
    decision = resume.check_run_dir(cfg)
    if rank == 0:
        for note in decision.notes:
            print(note, flush=True)
    return decision.nothing_to_do


def _train(cfg, *, stop_after: int | None) -> int:
    from trainer.allocator import choose_allocator
    from trainer.cpu_affinity import pin_from_env

    pin_from_env()  # opt-in (STRATA_PIN_CPU=1), before any thread starts
    choose_allocator(cfg)  # zero 3: TensorFlow's CPU tensors from malloc, not a pool that never shrinks
    if _before_tensorflow(cfg):
        return 0
    from trainer import preemption
    from trainer.data.splits import load_splits
    from trainer.resume import env_rank

    # Data-file errors surface here, before TensorFlow loads; prepared shards' checksums: rank 0 only.
    splits = load_splits(cfg.data, cfg.task, verify=cfg.data.verify_shards and env_rank() == 0)
    from trainer.experiment import configure_runtime, prepare
    from trainer.strategy import make_strategy

    strategy = make_strategy(cfg)
    configure_runtime(cfg)
    preemption.reclaim_handlers()  # the backend's runtime may have taken SIGTERM over (MultiWorkerMirrored)
    preemption.files_written()  # from here on the run directory may be written: a signal stops at a step
    if strategy.is_chief:
        per_replica = cfg.data.batch_size // strategy.num_replicas
        print(f"strata: {strategy.describe()} | global batch {cfg.data.batch_size} = "
              f"{strategy.num_replicas} x {per_replica} per replica", flush=True)
        _print_data_facts(cfg, splits)
    exp = prepare(cfg, strategy, training=True, splits=splits)
    state = _run_training(exp, strategy, stop_after)
    if strategy.is_chief:
        if not state.stop_signal:  # a signal stop has said where it stopped (preemption.StopHook), unevaluated
            shown = " ".join(f"{k}={v:.4f}" for k, v in state.eval_metrics.items())
            reason = f" ({state.stop_reason})" if state.stop_reason else ""
            mfu = f" | MFU {state.mfu:.2%}" if state.mfu is not None else ""
            print(f"strata: step {state.step}/{cfg.train.steps}{reason} | validation {shown or '(not evaluated yet)'}"
                  f"{mfu}")
            (exp.run_dir / "metrics.json").write_text(json.dumps({"step": state.step, **state.eval_metrics}))
        print(f"strata: run directory {exp.run_dir} | TensorBoard: strata tensorboard {exp.run_dir}")
    return preemption.exit_code(state)  # 130 after Ctrl-C; 75 after SIGTERM/SIGUSR1: checkpoint saved, run again


if __name__ == "__main__":
    sys.exit(main())
