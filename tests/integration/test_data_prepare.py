"""`strata data prepare / verify` as a user runs them: interrupted runs resume to the same bytes, the
built-in corpus works without a download, bad input is one line and exit 2, and no TensorFlow is loaded."""
from __future__ import annotations

import filecmp
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import STRATA, child_env, strata, run_cmd
from tests.textdata import documents, tokenizer, write_jsonl
from trainer.data.prepare import doc_split
from trainer.data.subword import SubwordTokenizer


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _interrupt(argv: list[str], out: Path, *, after_shards: int, sig: int) -> subprocess.CompletedProcess:
    """Start a prepare run, send `sig` once its partial index lists `after_shards` shards, wait for it."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(json.loads((out / "index.partial.json").read_text())["shards"]) >= after_shards:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    workers = _children(proc.pid)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    deadline = time.monotonic() + 20  # the spawned tokenizer workers end with their parent
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers), "tokenizer workers outlived the killed run"
    assert not (out / "index.json").exists(), "the run finished before it was interrupted: use more data"
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def test_interrupted_runs_resume_to_the_bytes_of_an_uninterrupted_run(tmp_path):
    docs = [f"{i}: {d}" for i in range(4) for d in documents()]  # ~600k characters, ~130 shards
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    model = tmp_path / "tok.model"
    tokenizer("bpe", 400).save(model)

    def argv(out: Path) -> list[str]:
        return [STRATA, "data", "prepare", str(corpus), "--tokenizer-model", str(model), "--out", str(out),
                "--shard-tokens", "1000", "--val-fraction", "0.1", "--workers", "2", "--no-progress"]

    reference = strata(*argv(tmp_path / "ref")[1:], timeout=300)
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "out"
    first = _interrupt(argv(out), out, after_shards=3, sig=signal.SIGINT)  # Ctrl-C
    assert first.returncode == 130 and "interrupted: finished shards are kept" in first.stderr, first.stderr
    kept = len(json.loads((out / "index.partial.json").read_text())["shards"])
    second = _interrupt(argv(out), out, after_shards=kept + 5, sig=signal.SIGKILL)  # no chance to clean up
    assert second.returncode == -signal.SIGKILL
    done = strata(*argv(out)[1:], timeout=300)
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert names == sorted(p.name for p in out.iterdir()) and len(names) > 30
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "ref", out, names, shallow=False)
    assert not mismatch and not errors and len(match) == len(names)


def test_builtin_pydocs_corpus_holds_out_whole_documents(tmp_path):
    out = tmp_path / "pydocs"
    done = strata("data", "prepare", "--builtin", "pydocs", "--out", str(out), "--vocab-size", "1000",
                  "--sample-chars", "300000", "--workers", "1", "--no-progress", timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"prepared {out} | train: " in done.stdout
    index = json.loads((out / "index.json").read_text())
    assert index["sources"][0]["builtin"] == "pydocs" and index["splits"]["train"]["documents"] > 500
    tok = SubwordTokenizer.load(out / "tokenizer.model")

    def decoded(split: str) -> list[str]:
        tokens = np.concatenate([np.fromfile(out / e["file"], index["dtype"]) for e in index["shards"]
                                 if e["split"] == split])
        return [tok.decode(part) for part in np.split(tokens, np.flatnonzero(tokens == 3) + 1)[:-1]]

    train, val = decoded("train"), decoded("val")
    assert len(val) == index["splits"]["val"]["documents"] > 10 and len(train) == index["splits"]["train"]["documents"]
    assert all(doc_split(d, seed=0, val_fraction=0.05) == 1 for d in val) and not set(val) & set(train)
    assert any("Return" in d for d in val)  # real prose, e.g. "Return the ..."


_NO_TF = """
import sys
from trainer.cli import main
code = main(sys.argv[1:])
assert "tensorflow" not in sys.modules, "data prepare imported TensorFlow"
sys.exit(code)
"""


def _no_tf(*args: str) -> subprocess.CompletedProcess:
    """`python -m trainer ARGS` in a process that fails if TensorFlow got imported."""
    return run_cmd([sys.executable, "-c", _NO_TF, *args])


def test_bad_input_is_one_line_and_exit_2_and_no_tensorflow_is_imported(tmp_path):
    out, model, other = tmp_path / "prepared", tmp_path / "tok.model", tmp_path / "other.model"
    tokenizer("bpe", 400).save(model)
    tokenizer("bpe", 450).save(other)
    done = _no_tf("data", "prepare", str(write_jsonl(tmp_path / "d.jsonl", documents()[:100])), "--out", str(out),
                  "--tokenizer-model", str(model), "--shard-tokens", "1000", "--workers", "2")
    assert done.returncode == 0, done.stderr
    verified = _no_tf("data", "verify", str(out))
    assert verified.returncode == 0 and f"{out}: ok, " in verified.stdout, verified.stderr
    with open(out / "train-00001.bin", "r+b") as f:
        f.truncate(10)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cases = [
        (["prepare", str(tmp_path / "d.jsonl"), "--out", str(out), "--tokenizer-model", str(other)],
         "other.model (sha256"),
        (["verify", str(out)], "train-00001.bin: 10 bytes, the index says 2000"),
        (["verify", str(tmp_path)], "no index.json, so not a prepared dataset directory"),
        (["prepare", str(empty), "--out", str(tmp_path / "new")], "no documents: every input is empty"),
        (["prepare", "--builtin", "wiki", "--out", str(tmp_path / "new")], "--builtin 'wiki' is unknown"),
        (["prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "new")], "nope.txt: no such file or folder"),
        (["prepare", str(empty), "--out", str(tmp_path / "new"), "--vocab-size", "12"], "--vocab-size 12: must be"),
    ]
    for i, (args, fragment) in enumerate(cases):  # the first through `strata`, the rest straight to the trainer
        done = strata("data", *args) if i == 0 else run_cmd([sys.executable, "-m", "trainer", "data", *args])
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and fragment in lines[0], (args, done.stderr)
        assert lines[0].startswith("strata: error: ")
    assert not (tmp_path / "new").exists()
