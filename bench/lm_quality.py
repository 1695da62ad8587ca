"""Does `lm_small` learn language? Its held-out perplexity after a few minutes of training on the built-in
pydocs corpus, beside a smoothed bigram model fitted on the same training tokens and scored on the same
held-out targets (both printed, and one JSON line last).

    .venv/bin/python bench/lm_quality.py [--steps 1200] [--prepared data/pydocs] [--quick]

1. prepares `--prepared` with `strata data prepare --builtin pydocs` if it is not prepared yet;
2. trains configs/lm_small.yaml there for `--steps` steps (`strata train`, a fresh run directory);
3. scores the whole val split with `strata evaluate --split val` (per-token loss, perplexity);
4. fits an interpolated Kneser-Ney bigram on every train token and scores the same val targets: each
   val sequence's tokens 1..L given the token before (what the model predicts, minus its longer context).

--quick: 150 steps and a smaller model, to check that the script runs (the model does not beat the bigram
that early).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.data.shards import PreparedData  # noqa: E402
from trainer.data.stream import TokenStream  # noqa: E402

STRATA = [sys.executable, "-m", "launch.cli"]


def strata(*args: str) -> str:
    done = subprocess.run([*STRATA, *args], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"strata {' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def split_tokens(data: PreparedData, split: str) -> np.ndarray:
    """Every token of a split in stream order (memory-mapped shards, concatenated: fine at pydocs' size)."""
    shards = data.split(split)
    return np.concatenate([np.memmap(p, dtype=data.dtype, mode="r") for p in shards.paths]).astype(np.int64)


def kneser_ney_bigram(tokens: np.ndarray, vocab: int):
    """log P(w | v) of an interpolated Kneser-Ney bigram fitted on `tokens` (discount from the count-of-counts),
    backing off to the continuation unigram, itself mixed with a uniform distribution so no id has
    probability 0. Returns a function (prev ids, next ids) -> log-probabilities."""
    pairs = tokens[:-1] * vocab + tokens[1:]
    keys, counts = np.unique(pairs, return_counts=True)
    n1, n2 = np.sum(counts == 1), np.sum(counts == 2)
    discount = n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.5
    prev, nxt = keys // vocab, keys % vocab
    context_total = np.bincount(prev, weights=counts, minlength=vocab)
    context_types = np.bincount(prev, minlength=vocab).astype(np.float64)
    continuation = np.bincount(nxt, minlength=vocab).astype(np.float64)
    p_cont = 0.99 * continuation / continuation.sum() + 0.01 / vocab

    def logprob(v: np.ndarray, w: np.ndarray) -> np.ndarray:
        query = v * vocab + w
        at = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
        c = np.where(keys[at] == query, counts[at], 0).astype(np.float64)
        total = context_total[v]
        seen = total > 0
        p = p_cont[w].copy()
        backoff = discount * context_types[v[seen]] / total[seen]
        p[seen] = np.maximum(c[seen] - discount, 0) / total[seen] + backoff * p_cont[w[seen]]
        return np.log(p)

    return logprob


def bigram_perplexity(data: PreparedData, seq_len: int) -> tuple[float, int]:
    """The bigram's per-token perplexity on the val targets the model is scored on, and their count."""
    logprob = kneser_ney_bigram(split_tokens(data, "train"), data.vocab_size)
    val = TokenStream(data, "val", seq_len=seq_len, global_batch=1, shuffle=False)
    rows = val.sequences(np.arange(val.num_sequences))
    prev, nxt = rows[:, :-1].reshape(-1).astype(np.int64), rows[:, 1:].reshape(-1).astype(np.int64)
    return math.exp(-float(np.mean(logprob(prev, nxt)))), len(nxt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepared", default=str(REPO / "data" / "pydocs"))
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--keep-run", default=None, help="train into this run directory and keep it")
    opts = p.parse_args()
    if not (Path(opts.prepared) / "index.json").is_file():
        print(f"preparing {opts.prepared} (strata data prepare --builtin pydocs)", file=sys.stderr, flush=True)
        strata("data", "prepare", "--builtin", "pydocs", "--out", opts.prepared, "--vocab-size", "2000",
               "--no-progress")
    overrides = ["--set", f"data.prepared_path={opts.prepared}", "--set", "logging.progress_bar=false",
                 "--set", "eval.max_batches=null"]
    steps = 150 if opts.quick else opts.steps
    if opts.quick:
        overrides += ["--set", "model.layers=2", "--set", "model.d_model=64", "--set", "model.ff_dim=256"]
    run_dir = Path(opts.keep_run) if opts.keep_run else Path(tempfile.mkdtemp(prefix="strata-lm-quality-")) / "run"
    began = time.perf_counter()
    strata("train", "configs/lm_small.yaml", *overrides, "--set", f"train.steps={steps}",
           "--set", f"eval.every={steps}", "--set", f"run_dir={run_dir}")
    train_s = time.perf_counter() - began
    model = json.loads(strata("evaluate", str(run_dir), "--split", "val").strip().splitlines()[-1])
    data = PreparedData.open(opts.prepared, verify=False)
    seq_len = int(yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["seq_len"])
    bigram, targets = bigram_perplexity(data, seq_len)
    if not opts.keep_run:
        shutil.rmtree(run_dir.parent, ignore_errors=True)
    print(f"lm_small after {steps} steps ({train_s:.0f} s): held-out perplexity {model['perplexity']:.2f} "
          f"(loss {model['loss']:.4f}) over {targets:,} val tokens")
    print(f"Kneser-Ney bigram fitted on the same {data.split('train').tokens:,} train tokens: held-out perplexity "
          f"{bigram:.2f}")
    print(json.dumps({"steps": steps, "train_seconds": round(train_s), "lm_perplexity": round(model["perplexity"], 3),
                      "bigram_perplexity": round(bigram, 3), "val_tokens": targets,
                      "lm_beats_bigram": model["perplexity"] < bigram}))


if __name__ == "__main__":
    main()
