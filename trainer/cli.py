"""`python -m trainer COMMAND ...`: the worker's entry point (what runs inside each rank).

Users normally go through `strata` (launch/cli.py), which calls this module; Horovod users can also call
it directly: `horovodrun -np 2 -H localhost:2 python -m trainer train configs/classifier.yaml`.

Every user error ends here as one line on stderr and exit code 2. TensorFlow is imported only after the
config has been validated, so a typo fails in well under a second.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from trainer.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would print the usage too)
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m trainer", description="Strata worker: runs inside one rank.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def with_overrides(sp):
        sp.add_argument("config", help="experiment YAML, e.g. configs/classifier.yaml")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optimizer.lr=3e-4 (repeatable)")

    t = sub.add_parser("train", help="train (resumes from the run directory's latest checkpoint)")
    with_overrides(t)
    t.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N more steps (checkpointed), e.g. to split a run into chunks")
    v = sub.add_parser("validate", help="check a config and print it resolved, as JSON")
    with_overrides(v)
    pl = sub.add_parser("plan", help="print ranks, devices, stages, levels, memory and schedule")
    with_overrides(pl)
    pl.add_argument("--ranks", default="localhost:0", help="host:local_rank of every rank, comma-separated")
    pl.add_argument("--dry-run", action="store_true", help="measure levels and run one pipelined step")
    e = sub.add_parser("evaluate", help="metrics of a trained run on a split")
    e.add_argument("run_dir")
    e.add_argument("--split", choices=["val", "test"], default="test")
    for name, what in (("classify", "texts to classify"), ("summarize", "documents to summarize")):
        c = sub.add_parser(name, help=f"run a trained model on {what}")
        c.add_argument("run_dir")
        c.add_argument("texts", nargs="+")
    x = sub.add_parser("export", help="write a SavedModel that serves raw text")
    x.add_argument("run_dir")
    x.add_argument("--out", default=None, help="output directory (default RUN_DIR/export)")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ info logs out of the console
    try:
        args = _parser().parse_args(argv)
        return _dispatch(args)
    except UserError as err:
        print(f"strata: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("strata: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from trainer.config import load_config

    if args.command == "validate":
        cfg = load_config(args.config, args.overrides)
        print(json.dumps(cfg.model_dump(mode="json")))
        return 0
    if args.command == "plan":
        from trainer.plan import parse_ranks, run_plan

        cfg = load_config(args.config, args.overrides)
        return run_plan(cfg, parse_ranks(args.ranks), dry_run=args.dry_run)
    if args.command == "train":
        cfg = load_config(args.config, args.overrides)
        if args.stop_after is not None and args.stop_after < 1:
            raise UserError(f"--stop-after {args.stop_after}: must be a positive number of steps")
        return _train(cfg, stop_after=args.stop_after)
    _require_run_dir(args.run_dir)  # before TensorFlow loads (trainer.experiment imports it): a typo fails fast
    from trainer.experiment import load_run_config

    cfg = load_run_config(args.run_dir)
    if args.command in ("classify", "summarize"):
        wanted = "classification" if args.command == "classify" else "summarization"
        if cfg.task != wanted:
            other = "summarize" if args.command == "classify" else "classify"
            raise UserError(f"{args.run_dir} holds a {cfg.task} model; use `strata {other}`")
    exp, _ = _restore(cfg)
    if args.command == "evaluate":
        from trainer.loop import evaluate
        from trainer.strategy.single import SingleDevice

        metrics = evaluate(exp, SingleDevice(), split=args.split)
        print(json.dumps({"split": args.split, "step": exp.checkpointer.latest_step, **metrics}))
    elif args.command == "classify":
        _classify(exp, args.texts)
    elif args.command == "summarize":
        from trainer.loop import decode_summaries

        for text, summary in zip(args.texts, decode_summaries(exp, exp.vocab.encode_batch(args.texts, cfg.data.max_len))):
            print(summary)
    elif args.command == "export":
        from trainer.export import export_saved_model

        out = export_saved_model(exp, Path(args.out) if args.out else exp.run_dir / "export")
        print(f"exported SavedModel to {out} (signature serving_default: text -> "
              f"{'label, probability' if cfg.task == 'classification' else 'summary'})")
    return 0


def _require_run_dir(run_dir: str) -> None:
    """UserError unless `run_dir` holds the resolved config `strata train` writes (trainer.experiment's
    CONFIG_FILE, named here so this check needs no TensorFlow)."""
    if not (Path(run_dir) / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a Strata run directory (no config.yaml); pass the directory "
                        "`strata train` created")


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


def _classify(exp, texts: list[str]) -> None:
    import tensorflow as tf

    tokens = tf.constant(exp.vocab.encode_batch(texts, exp.cfg.data.max_len))
    probs = exp.model({"tokens": tokens}, training=False)["probability"].numpy()
    for text, p in zip(texts, probs):
        print(json.dumps({"label": int(p >= 0.5), "probability": round(float(p), 4), "text": text}))


def _train(cfg, *, stop_after: int | None) -> int:
    from trainer.cpu_affinity import pin_from_env

    pin_from_env()  # opt-in (STRATA_PIN_CPU=1), before any thread starts
    from trainer import preemption

    if preemption.enabled():  # SLURM ranks: a warning signal during start-up is kept, not fatal
        preemption.install_handlers()
    from trainer.data.splits import load_splits

    splits = load_splits(cfg.data, cfg.task)  # data-file errors surface here, before TensorFlow loads
    from trainer.experiment import configure_runtime, prepare
    from trainer.loop import train
    from trainer.strategy import make_strategy

    strategy = make_strategy(cfg)
    configure_runtime(cfg)
    if strategy.is_chief:
        per_replica = cfg.data.batch_size // strategy.num_replicas
        print(f"strata: {strategy.describe()} | global batch {cfg.data.batch_size} = "
              f"{strategy.num_replicas} x {per_replica} per replica", flush=True)
    exp = prepare(cfg, strategy, training=True, splits=splits)
    if getattr(strategy, "elastic", False):  # started by `strata launch --elastic` (HOROVOD_ELASTIC=1)
        from trainer.elastic import train_elastic

        state = train_elastic(exp, strategy, stop_after=stop_after)
    else:
        state = train(exp, strategy, stop_after=stop_after)
    if strategy.is_chief:
        shown = " ".join(f"{k}={v:.4f}" for k, v in state.eval_metrics.items())
        reason = f" ({state.stop_reason})" if state.stop_reason else ""
        print(f"strata: step {state.step}/{cfg.train.steps}{reason} | validation {shown or '(not evaluated yet)'}")
        print(f"strata: run directory {exp.run_dir} | TensorBoard: strata tensorboard {exp.run_dir}")
        (exp.run_dir / "metrics.json").write_text(json.dumps({"step": state.step, **state.eval_metrics}))
    return preemption.exit_code(state)  # 75 = preempted, checkpoint saved: requeue me


if __name__ == "__main__":
    sys.exit(main())
