"""The streaming input pipeline alone: tokens/s and the peak memory of a process iterating it, on a small
and a large prepared corpus (random token shards + index, written directly: no text is tokenized); and
(`train`) a TRAINING process of configs/lm_small.yaml on the same corpus: the tokens/s its step consumes
beside the input pipeline's tokens/s alone at the same shape, in the same process, and its peak RSS.

Each measurement runs in a fresh child process (so its peak RSS is its own) and prints one JSON line;
the parent prints them as a table. Measurements are registered in MEASUREMENTS by name: a measurement is
a function (prepared directory, options) -> dict of figures, run in the child.

    .venv/bin/python bench/input.py [--quick] [--sizes-gb 0.1 5] [--seq-len 1024] [--batch 32] [--steps 300]

Generated corpora live in a temporary folder (--workdir) and are deleted at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from trainer.data.shards import FORMAT, INDEX, TOKENIZER, VERSION, shard_name, write_json_atomic  # noqa: E402

VOCAB = 8000  # `strata data prepare`'s default vocabulary, which configs/lm_small.yaml trains with
SHARD_TOKENS = 1 << 26  # 128 MiB of uint16 per shard


def generate(directory: Path, gigabytes: float, *, seed: int = 0) -> Path:
    """A prepared directory of random uint16 token ids (end-of-document id 3 every ~1000 tokens)."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    total = int(gigabytes * 1e9) // 2
    shards, written = [], 0
    (directory / TOKENIZER).write_bytes(b"placeholder: bench corpora are not tokenized text")
    while written < total:
        n = min(SHARD_TOKENS, total - written)
        tokens = rng.integers(4, VOCAB, size=n, dtype=np.uint16)
        tokens[rng.integers(0, n, size=max(1, n // 1000))] = 3
        name = shard_name("train", len(shards))
        data = tokens.tobytes()
        (directory / name).write_bytes(data)
        shards.append({"file": name, "split": "train", "tokens": n, "documents": int((tokens == 3).sum()),
                       "sha256": hashlib.sha256(data).hexdigest(), "next": [0, 0]})
        written += n
        del tokens, data
    val = rng.integers(4, VOCAB, size=min(1 << 20, max(total // 100, 1 << 16)), dtype=np.uint16)
    (directory / shard_name("val", 0)).write_bytes(val.tobytes())  # a held-out split, as training requires
    shards.append({"file": shard_name("val", 0), "split": "val", "tokens": len(val), "documents": 0,
                   "sha256": hashlib.sha256(val.tobytes()).hexdigest(), "next": [0, 0]})
    model_sha = hashlib.sha256((directory / TOKENIZER).read_bytes()).hexdigest()
    write_json_atomic(directory / INDEX, {
        "format": FORMAT, "version": VERSION, "dtype": "<u2", "vocab_size": VOCAB,
        "special_ids": {"pad": 0, "unk": 1, "bos": 2, "eod": 3}, "byte_fallback": True,
        "tokenizer": {"file": TOKENIZER, "sha256": model_sha, "spec": {"bench": "random ids"}},
        "sources": [{"bench": "random", "seed": seed}], "settings": {"shard_tokens": SHARD_TOKENS},
        "shards": shards, "splits": {"train": {"tokens": written, "documents": 0, "shards": len(shards)},
                                     "val": {"tokens": len(val), "documents": 0, "shards": 1}}})
    return directory


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def measure_input(directory: Path, opts: argparse.Namespace) -> dict:
    """tokens/s of the tf.data stream alone (and of the numpy reader), open time with sha256 checks, peak RSS."""
    from trainer.data.stream import TokenStream

    start = time.perf_counter()
    stream = TokenStream.open(directory, "train", seq_len=opts.seq_len, global_batch=opts.batch, seed=1,
                              verify=not opts.no_verify)
    open_s = time.perf_counter() - start
    tokens_per_step = opts.batch * opts.seq_len
    start = time.perf_counter()
    for step in range(opts.steps):
        stream.rows(step)
    numpy_tps = opts.steps * tokens_per_step / (time.perf_counter() - start)
    import tensorflow as tf  # noqa: F401  (after the numpy figure: its import is not part of reading)

    it = iter(stream.dataset(start_step=opts.steps))
    for _ in range(opts.warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(opts.steps):
        next(it)
    tfdata_tps = opts.steps * tokens_per_step / (time.perf_counter() - start)
    return {"open_s": round(open_s, 2), "numpy_tokens_per_s": round(numpy_tps),
            "tfdata_tokens_per_s": round(tfdata_tps), "peak_rss_mb": round(peak_rss_mb())}


def measure_training(directory: Path, opts: argparse.Namespace) -> dict:
    """configs/lm_small.yaml trained on the corpus through the real path (experiment + loop, one device):
    the tokens/s its steps consume (the loop's own figure, over the last log window, compilation excluded),
    the tf.data stream's tokens/s alone at the same sequence length and batch (measured first, same
    process), their ratio, and the process's peak RSS."""
    import tempfile as tmp

    from trainer.config import load_config
    from trainer.data.stream import TokenStream
    from trainer.experiment import configure_runtime, prepare
    from trainer.loop import train
    from trainer.strategy.single import SingleDevice

    steps = max(opts.train_steps, 4)
    run_dir = tmp.mkdtemp(prefix="strata-bench-train-")
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "lm_small.yaml", [
        f"data.prepared_path={directory}", f"run_dir={run_dir}", f"train.steps={steps}",
        f"train.log_every={steps // 2}", f"eval.every={10 * steps}", "eval.max_batches=1",
        f"checkpoint.every={10 * steps}", "logging.progress_bar=false", f"data.verify_shards={not opts.no_verify}"])
    stream = TokenStream.open(directory, "train", seq_len=cfg.data.seq_len, global_batch=cfg.data.batch_size,
                              seed=1, verify=False)
    it = iter(stream.dataset(start_step=10 * steps))
    for _ in range(opts.warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(opts.steps):
        next(it)
    input_tps = opts.steps * cfg.data.batch_size * cfg.data.seq_len / (time.perf_counter() - start)
    del it
    stream.close()
    configure_runtime(cfg)
    strategy = SingleDevice()
    state = train(prepare(cfg, strategy, training=True), strategy)
    shutil.rmtree(run_dir, ignore_errors=True)
    train_tps = state.train_logs["tokens_per_sec"]
    return {"seq_len": cfg.data.seq_len, "batch": cfg.data.batch_size, "input_tokens_per_s": round(input_tps),
            "train_step_tokens_per_s": round(train_tps), "input_over_train": round(input_tps / train_tps, 1),
            "peak_rss_mb": round(peak_rss_mb())}


# name -> function(prepared directory, options) -> figures; run in a fresh child process each.
MEASUREMENTS = {"input": measure_input, "train": measure_training}


def _child(opts: argparse.Namespace) -> None:
    figures = MEASUREMENTS[opts.child](Path(opts.dir), opts)
    print(json.dumps(figures), flush=True)


def _run_child(name: str, directory: Path, argv: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", name, "--dir", str(directory), *argv],
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"bench/input.py: measurement {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny corpora (0.01 and 0.1 GB), few steps: a smoke test")
    p.add_argument("--sizes-gb", type=float, nargs="+", default=[0.1, 5.0])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--train-steps", type=int, default=100, help="steps of the training measurement")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check at open")
    p.add_argument("--workdir", default=None, help="where to generate the corpora (default: a temporary folder)")
    p.add_argument("--only", nargs="+", default=list(MEASUREMENTS), choices=list(MEASUREMENTS))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.child:
        return _child(opts)
    if opts.quick:
        opts.sizes_gb, opts.steps, opts.warmup, opts.train_steps = [0.01, 0.1], 50, 5, 10
    argv = ["--seq-len", str(opts.seq_len), "--batch", str(opts.batch), "--steps", str(opts.steps),
            "--warmup", str(opts.warmup), "--train-steps", str(opts.train_steps)]
    argv += ["--no-verify"] if opts.no_verify else []
    work = Path(tempfile.mkdtemp(prefix="strata-bench-input-", dir=opts.workdir))
    rows = []
    try:
        for gb in opts.sizes_gb:
            start = time.perf_counter()
            directory = generate(work / f"corpus-{gb}gb", gb)
            print(f"generated {gb} GB in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            for name in opts.only:
                rows.append({"measurement": name, "corpus_gb": gb, **_run_child(name, directory, argv)})
                print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nseq_len {opts.seq_len}, global batch {opts.batch}, {opts.steps} steps, one process, {os.cpu_count()} cores")
    for name in opts.only:
        mine = [row for row in rows if row["measurement"] == name]
        keys = [k for k in mine[0] if k not in ("measurement", "corpus_gb")]
        print(" | ".join(["measurement", "corpus GB", *keys]))
        for row in mine:
            print(" | ".join(str(row[k]) for k in ["measurement", "corpus_gb", *keys]))


if __name__ == "__main__":
    main()
