"""`python -m trainer data prepare|verify` (what `strata data ...` runs). No TensorFlow here."""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from launch.contract import INTERRUPTED_EXIT_CODE


def add_parser(sub) -> None:
    """Add the `data` command and its subcommands to the trainer's argparse subparsers."""
    d = sub.add_parser("data", prog="strata data",
                       help="prepare a corpus into token shards (subword tokenizer), verify one")
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=type(d))
    p = dsub.add_parser("prepare", help="tokenize files/folders (or a built-in corpus) into token shards + index")
    p.add_argument("inputs", nargs="*", help="JSONL, CSV, TSV or plain-text files, or folders of them")
    p.add_argument("--builtin", default=None, metavar="NAME", help="a built-in corpus instead of files: pydocs")
    p.add_argument("--out", required=True, type=Path, help="the prepared dataset directory to write (or resume)")
    p.add_argument("--field", dest="fields", action="append", default=None, metavar="NAME",
                   help="JSONL key / CSV column holding the text (default text); repeat to join several, "
                        "e.g. --field document --field summary")
    p.add_argument("--text-docs", choices=["paragraph", "line", "file"], default="paragraph",
                   help="plain text: one document per paragraph (default), line or file")
    p.add_argument("--tokenizer", choices=["bpe", "unigram"], default="bpe", help="train this kind (default bpe: tensorflow-text's in-graph tokenizer gives the same ids)")
    p.add_argument("--vocab-size", type=int, default=8000, help="vocabulary of the trained tokenizer (default 8000)")
    p.add_argument("--tokenizer-model", default=None, metavar="FILE",
                   help="use this SentencePiece .model instead of training one")
    p.add_argument("--sample-chars", type=int, default=10_000_000,
                   help="train the tokenizer on a sample of about this many characters (default 10M)")
    p.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard (default 16777216)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of documents held out for validation (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val assignment and the tokenizer sample")
    p.add_argument("--workers", type=int, default=0, help="tokenizing processes (default 0: every core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    v = dsub.add_parser("verify", help="check every shard of a prepared directory (sizes and sha256)")
    v.add_argument("directory")


def _terminated(signum, frame):  # SIGTERM ends the run like Ctrl-C: finished shards are kept
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """Run `data prepare` or `data verify`; user errors propagate as DataError (one line, exit 2)."""
    if args.data_command == "verify":
        return _verify(args.directory)
    from trainer.data.prepare import PrepareSpec, prepare

    spec = PrepareSpec(out=args.out, inputs=args.inputs, builtin=args.builtin, fields=args.fields or ["text"],
                       text_docs=args.text_docs, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                       tokenizer_model=args.tokenizer_model, sample_chars=args.sample_chars,
                       shard_tokens=args.shard_tokens, val_fraction=args.val_fraction, seed=args.seed,
                       workers=args.workers, progress=not args.no_progress)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        index, worked = prepare(spec)
    except KeyboardInterrupt:
        print(f"strata: interrupted: finished shards are kept in {spec.out}; run the same command again to resume",
              file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    print(summary(spec.out, index) if worked else f"strata: {spec.out} is already prepared with these inputs and "
          f"settings; nothing to do\n{summary(spec.out, index)}")
    return 0


def summary(out: Path, index: dict) -> str:
    """One line: tokens, documents and shards per split, and the tokenizer."""
    splits = " | ".join(f"{name}: {s['tokens']:,} tokens, {s['documents']:,} documents, {s['shards']} shards"
                        for name, s in index["splits"].items())
    return (f"strata: prepared {out} | {splits} | tokenizer vocab {index['vocab_size']} "
            f"sha256 {index['tokenizer']['sha256'][:12]} | {index['dtype']}")


def _verify(directory: str) -> int:
    from trainer.data.shards import PreparedData

    data = PreparedData.open(directory, verify=True)
    total = sum(int(e["tokens"]) for e in data.index["shards"])
    print(f"strata: {directory}: ok, {len(data.index['shards'])} shards, {total:,} tokens, sha256 of every "
          "shard and of the tokenizer match the index")
    return 0

