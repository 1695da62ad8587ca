"""The bad-input catalogue: each case exits 2 with ONE line naming what is wrong, no traceback, and no
run directory left behind. Cases run the real `strata` command in a subprocess."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import CONFIGS, strata

CLASSIFIER = str(CONFIGS / "classifier.yaml")
GOOD_LINE = '{"text": "good food", "label": 1}'


def _write(path: Path, text: str | bytes) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


# (id, build argv from tmp dir, fragment the message must contain)
CASES = [
    ("missing-config", lambda d: ["train", str(d / "nope.yaml")], "config file not found"),
    ("yaml-syntax", lambda d: ["train", _write(d / "c.yaml", "name: x\nmodel: {kind: classifier\n")], "line"),
    ("empty-config", lambda d: ["train", _write(d / "c.yaml", "")], "config is empty"),
    ("top-level-list", lambda d: ["train", _write(d / "c.yaml", "- a\n- b\n")], "must be a mapping"),
    ("non-utf8-config", lambda d: ["train", _write(d / "c.yaml", b"name: caf\xe9\n")], "not UTF-8"),
    ("unknown-key", lambda d: ["train", CLASSIFIER, "--set", "model.hiden_dim=3"], "model.hiden_dim: unknown key"),
    ("wrong-type", lambda d: ["train", CLASSIFIER, "--set", "optimizer.lr=fast"], "optimizer.lr"),
    ("negative-batch", lambda d: ["train", CLASSIFIER, "--set", "data.batch_size=-4"], "data.batch_size"),
    ("unknown-model-kind", lambda d: ["train", CLASSIFIER, "--set", "model.kind=cnn"], "model.kind"),
    ("accum-not-dividing", lambda d: ["train", CLASSIFIER, "--set", "train.grad_accum=5"], "grad_accum (5) must divide"),
    ("heads-not-dividing", lambda d: ["train", str(CONFIGS / "transformer_small.yaml"), "--set", "model.num_heads=5"],
     "divisible by num_heads"),
    ("set-without-equals", lambda d: ["train", CLASSIFIER, "--set", "optimizer.lr"], "expected KEY=VALUE"),
    ("set-into-value", lambda d: ["train", CLASSIFIER, "--set", "data.batch_size.x=1"], "is a value, not a section"),
    ("bad-run-name", lambda d: ["train", CLASSIFIER, "--set", "name=my run;rm"], "name"),
    ("warmup-too-long", lambda d: ["train", CLASSIFIER, "--set", "optimizer.warmup_steps=500"], "warmup_steps"),
    ("decay-needs-adamw", lambda d: ["train", CLASSIFIER, "--set", "optimizer.weight_decay=0.1"], "adamw"),
    ("profile-reversed", lambda d: ["train", CLASSIFIER, "--set", "logging.profile_steps=[9,3]"], "profile_steps"),
    ("jsonl-without-path", lambda d: ["train", CLASSIFIER, "--set", "data.source=jsonl"], "train_path"),
    ("data-file-missing", lambda d: ["train", CLASSIFIER, "--set", "data.source=jsonl",
                                     "--set", f"data.train_path={d / 'none.jsonl'}"], "none.jsonl"),
    ("data-malformed-line", lambda d: ["train", CLASSIFIER, "--set", "data.source=jsonl", "--set",
                                       "data.train_path=" + _write(d / "x.jsonl", GOOD_LINE + "\n{oops\n")],
     "x.jsonl:2"),
    ("data-label-out-of-range", lambda d: ["train", CLASSIFIER, "--set", "data.source=jsonl", "--set",
                                           "data.train_path=" + _write(d / "x.jsonl", GOOD_LINE.replace("1", "7"))],
     "label"),
    ("data-empty-file", lambda d: ["train", CLASSIFIER, "--set", "data.source=jsonl",
                                   "--set", f"data.train_path={_write(d / 'e.jsonl', '')}"], "e.jsonl"),
    ("batch-larger-than-data", lambda d: ["train", CLASSIFIER, "--set", "data.builtin.train_examples=50",
                                          "--set", "data.batch_size=64"], "batch_size"),
    ("unknown-flag", lambda d: ["train", CLASSIFIER, "--bogus"], "--bogus"),
    ("evaluate-not-a-run", lambda d: ["evaluate", str(d)], "not a Strata run directory"),
    ("tensorboard-missing-dir", lambda d: ["tensorboard", str(d / "missing")], "no such run directory"),
]


@pytest.mark.parametrize("argv_for,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, argv_for, fragment: str):
    run_dir = tmp_path / "run"
    argv = argv_for(tmp_path)
    if argv[0] == "train":
        argv += ["--set", f"run_dir={run_dir}"]
    done = strata(*argv, cwd=tmp_path, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert len(lines) == 1 and lines[0].startswith("strata: error: "), done.stderr
    assert fragment in lines[0], lines[0]
    assert not run_dir.exists(), "a failed start must not leave a run directory"
    assert not (tmp_path / "runs").exists()
