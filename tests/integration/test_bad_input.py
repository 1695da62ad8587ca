"""The bad-input catalogue: each case exits 2 with ONE line naming what is wrong, no traceback, and no
run directory left behind. Cases run the real `strata` command in a subprocess."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, REPO, STRATA, TINY_CLASSIFIER as TINY, child_env, strata

CLASSIFIER = str(CONFIGS / "classifier.yaml")
GOOD_LINE = '{"text": "good food", "label": 1}'
SUMMARIZER = str(CONFIGS / "summarizer.yaml")
PIPE = "stages: 2, micro_batches: 4"
TINY_SUMMARIZER = ["--set", "data.builtin.train_examples=200", "--set", "logging.progress_bar=false"]


def _write(path: Path, text: str | bytes) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def _jsonl(d: Path, text: str | bytes) -> list[str]:
    return ["train", CLASSIFIER, "--set", "data.source=jsonl", "--set", "data.train_path=" + _write(d / "x.jsonl", text)]


LM = str(CONFIGS / "lm_small.yaml")


def _prepared(d: Path, *, val_fraction: float = 0.1) -> str:
    """A small prepared directory (real docstrings, a 400-piece BPE tokenizer, shards of 997 tokens)."""
    from tests.textdata import documents, prepare_small

    return str(prepare_small(d / "prepared", documents()[:300], val_fraction=val_fraction))


def _lm(d: Path, prepared: str, *more: str) -> list[str]:
    return ["train", LM, "--set", f"data.prepared_path={prepared}", "--set", "data.batch_size=8",
            "--set", "data.seq_len=32", *more]


def _damaged(d: Path, how: str) -> list[str]:
    """A prepared directory with one train shard truncated or one byte changed (same size)."""
    prepared = Path(_prepared(d))
    shard = prepared / "train-00001.bin"
    data = bytearray(shard.read_bytes())
    if how == "truncate":
        shard.write_bytes(bytes(data[:10]))
    else:
        data[100] ^= 0x01
        shard.write_bytes(bytes(data))
    return _lm(d, str(prepared))


def _other_tokenizer(d: Path) -> list[str]:
    from tests.textdata import tokenizer

    tokenizer("bpe", 450).save(d / "other.model")
    return _lm(d, _prepared(d), "--set", f"data.tokenizer={d / 'other.model'}")


def _fake_lm_run(d: Path) -> str:
    (d / "lmrun").mkdir()
    _write(d / "lmrun" / "config.yaml", f"name: x\nmodel: {{kind: lm}}\n"
                                        f"data: {{source: prepared, prepared_path: {d / 'p'}}}\n")
    return str(d / "lmrun")


def _fake_run(d: Path) -> str:
    """A run directory of a model trained on a file with no test file (its config is all evaluate reads first)."""
    (d / "fake").mkdir()
    _write(d / "fake" / "config.yaml", f"name: x\nmodel: {{kind: classifier}}\n"
                                       f"data: {{source: jsonl, train_path: {d / 't.jsonl'}}}\n")
    return str(d / "fake")


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
    ("decay-needs-adamw", lambda d: ["train", CLASSIFIER, "--set", "optimizer.weight_decay=0.1"], "adamw"),
    ("profile-reversed", lambda d: ["train", CLASSIFIER, "--set", "logging.profile_steps=[9,3]"], "profile_steps"),
    ("jsonl-without-path", lambda d: ["train", CLASSIFIER, "--set", "data.source=jsonl"], "train_path"),
    ("data-file-missing", lambda d: ["train", CLASSIFIER, "--set", "data.source=jsonl",
                                     "--set", f"data.train_path={d / 'none.jsonl'}"], "none.jsonl"),
    ("data-malformed-line", lambda d: ["train", CLASSIFIER, "--set", "data.source=jsonl", "--set",
                                       "data.train_path=" + _write(d / "x.jsonl", GOOD_LINE + "\n{oops\n")],
     "x.jsonl:2"),
    ("data-label-out-of-range", lambda d: ["train", CLASSIFIER, "--set", "data.source=jsonl", "--set",
                                           "data.train_path=" + _write(d / "x.jsonl", GOOD_LINE.replace("1", "-1"))],
     "label"),
    ("data-empty-file", lambda d: ["train", CLASSIFIER, "--set", "data.source=jsonl",
                                   "--set", f"data.train_path={_write(d / 'e.jsonl', '')}"], "e.jsonl"),
    ("batch-larger-than-data", lambda d: ["train", CLASSIFIER, "--set", "data.builtin.train_examples=50",
                                          "--set", "data.batch_size=64"], "batch_size"),
    ("unknown-flag", lambda d: ["train", CLASSIFIER, "--bogus"], "--bogus"),
    ("evaluate-not-a-run", lambda d: ["evaluate", str(d)], "not a Strata run directory"),
    ("tensorboard-missing-dir", lambda d: ["tensorboard", str(d / "missing")], "no such run directory"),
    # --- more config values
    ("unknown-section", lambda d: ["train", CLASSIFIER, "--set", "trainer.steps=5"], "trainer: unknown key"),
    ("bool-wrong-type", lambda d: ["train", CLASSIFIER, "--set", "train.deterministic=maybe"], "train.deterministic"),
    ("zero-steps", lambda d: ["train", CLASSIFIER, "--set", "train.steps=0"], "train.steps"),
    ("negative-lr", lambda d: ["train", CLASSIFIER, "--set", "optimizer.lr=-0.1"], "optimizer.lr"),
    ("keep-zero", lambda d: ["train", CLASSIFIER, "--set", "checkpoint.keep=0"], "checkpoint.keep"),
    ("fraction-out-of-range", lambda d: ["train", CLASSIFIER, "--set", "data.val_fraction=1.5"], "data.val_fraction"),
    ("tfds-for-classifier", lambda d: ["train", CLASSIFIER, "--set", "data.source=tfds", "--set", "data.tfds_name=x",
                                       "--set", f"data.tfds_data_dir={d}"], "supported for the summarizers only"),
    # --- more data files
    ("data-not-utf8", lambda d: _jsonl(d, b'{"text": "caf\xe9", "label": 1}\n'), "x.jsonl:1: not valid UTF-8"),
    ("data-missing-key", lambda d: _jsonl(d, '{"text": "good food"}\n'), "x.jsonl:1: missing key 'label'"),
    ("data-text-not-string", lambda d: _jsonl(d, '{"text": 5, "label": 1}\n'), "'text' must be a string"),
    ("data-is-a-directory", lambda d: ["train", CLASSIFIER, "--set", "data.source=jsonl",
                                       "--set", f"data.train_path={d}"], "is a directory"),
    ("csv-header-only", lambda d: ["train", CLASSIFIER, "--set", "data.source=csv", "--set",
                                   "data.train_path=" + _write(d / "x.csv", "text,label\n")], "no examples"),
    ("csv-missing-column", lambda d: ["train", CLASSIFIER, "--set", "data.source=csv", "--set",
                                      "data.train_path=" + _write(d / "x.csv", "text,lbl\nhi,1\n")], "missing label"),
    # --- command lines, host lists and run directories
    ("stop-after-zero", lambda d: ["train", CLASSIFIER, "--stop-after", "0"], "--stop-after 0"),
    ("evaluate-bad-split", lambda d: ["evaluate", str(d), "--split", "train"], "invalid choice: 'train'"),
    ("tensorboard-bad-port", lambda d: ["tensorboard", str(d), "--port", "http"], "invalid int value"),
    ("hostfile-bad-slots", lambda d: ["launch", "-np", "2", "--hostfile", _write(d / "hosts", "localhost slots=two\n"),
                                      CLASSIFIER], "hosts:1: slots 'two' is not a whole number"),
    ("hostfile-bad-line", lambda d: ["launch", "-np", "2", "--hostfile",
                                     _write(d / "hosts", "# rack 1\nlocalhost slots=2 gpus=4\n"), CLASSIFIER],
     "hosts:2: cannot read"),
    ("hostfile-missing", lambda d: ["launch", "-np", "2", "--hostfile", str(d / "nope"), CLASSIFIER], "not found"),
    ("hosts-empty-entry", lambda d: ["launch", "-np", "2", "-H", "localhost:1,,b:1", CLASSIFIER], "empty entry"),
    ("run-dir-under-a-file", lambda d: ["train", CLASSIFIER, *TINY, "--set",
                                        f"run_dir={_write(d / 'file.txt', 'x')}/run"], "is a file, not a directory"),
    # --- pipeline layouts: refused by the config check, the launcher (replicas known) or `strata plan`
    ("pipeline-micro-batches", lambda d: ["train", SUMMARIZER, "--set", f"distribution.pipeline={{{PIPE},"
                                          " micro_batches: 5}"], "micro_batches (5) must divide data.batch_size (32)"),
    ("pipeline-stages-over-levels", lambda d: ["train", SUMMARIZER, "--set", "distribution.pipeline={stages: 9}"],
     "stages (9) exceeds the 5 levels"),
    ("pipeline-level-in-no-stage", lambda d: ["train", SUMMARIZER, "--set", f"distribution.pipeline={{{PIPE}, "
                                              "partition: [[embed], [decoder, attention, output]]}"],
     "level 'encoder_1' is in no stage"),
    ("pipeline-per-replica", lambda d: ["launch", "-np", "2", SUMMARIZER, "--set",
                                        f"distribution.pipeline={{{PIPE}, micro_batches: 32}}"],
     "distribution.pipeline.micro_batches (32) must divide the per-replica batch (16) of data.batch_size 32 over "
     "-np (2)"),
    ("pipeline-mirrored", lambda d: ["train", SUMMARIZER, "--set", "distribution.backend=mirrored", "--set",
                                     f"distribution.pipeline={{{PIPE}}}"], "does not combine with backend mirrored"),
    ("pipeline-device-name", lambda d: ["train", SUMMARIZER, "--set",
                                        f"distribution.pipeline={{{PIPE}, devices: [gpu0, /gpu:1]}}"],
     "distribution.pipeline.devices.0: must name one device"),
    ("pipeline-device-missing", lambda d: ["train", SUMMARIZER, *TINY_SUMMARIZER, "--set",
                                           f"distribution.pipeline={{{PIPE}, devices: [/gpu:0, /gpu:1]}}"],
     "/gpu:0 is not a device of this process"),
    ("plan-replicas", lambda d: ["plan", SUMMARIZER, "-np", "3", "--set", f"distribution.pipeline={{{PIPE}}}"],
     "data.batch_size (32) must be divisible by -np (3)"),
    # --- data facts never hidden, splits never mislabelled, hints that name the fix (issue 15)
    ("builtin-ignores-val-path", lambda d: ["train", CLASSIFIER, "--set", f"data.val_path={d / 'v.jsonl'}"],
     "data.val_path is ignored with data.source builtin (the built-in corpus is used); set data.source=jsonl"),
    ("unknown-key-did-you-mean", lambda d: ["train", CLASSIFIER, "--set", "optimizer.learning_rate=0.1"],
     "optimizer.learning_rate: unknown key; did you mean optimizer.lr?"),
    ("csv-source-on-a-tsv-file", lambda d: ["train", CLASSIFIER, "--set", "data.source=csv", "--set",
                                            "data.train_path=" + _write(d / "x.tsv", "text\tlabel\ngood\t1\nbad\t0\n")],
     "this file is tab-separated (its header splits on tabs into text, label) but data.source is csv; "
     "set data.source=tsv"),
    ("evaluate-test-without-test-file", lambda d: ["evaluate", _fake_run(d), "--split", "test"],
     "this run has no test split (trained without data.test_path), and validation scores are never reported as "
     "test scores; evaluate with --split val, or add test_path: FILE under data:"),
    ("val-label-not-in-train", lambda d: ["train", CLASSIFIER, "--set", "data.source=jsonl", "--set",
                                          "data.train_path=" + _write(d / "t.jsonl", f"{GOOD_LINE}\n{GOOD_LINE}\n"),
                                          "--set", "data.val_path=" + _write(d / "v.jsonl", GOOD_LINE.replace("1", "2"))],
     "v.jsonl: label 2 is not a class of the training file (classes: 0..1)"),
    ("train-a-directory-without-config", lambda d: ["train", str(d)], "a directory without config.yaml"),
    # --- language models on prepared token shards (issue 12)
    ("prepared-missing-index", lambda d: _lm(d, str(d)), "no index.json, so not a prepared dataset directory"),
    ("prepared-missing-dir", lambda d: _lm(d, str(d / "nope")), "nope: no such prepared dataset directory; create "
                                                                 "it with `strata data prepare`"),
    ("prepared-truncated-shard", lambda d: _damaged(d, "truncate"), "train-00001.bin: 10 bytes, the index says 1994"),
    ("prepared-corrupted-shard", lambda d: _damaged(d, "flip"),
     "train-00001.bin: sha256 differs from the index: the shard is corrupted"),
    ("prepared-other-tokenizer", _other_tokenizer, "other.model (data.tokenizer) (sha256"),
    ("prepared-empty-val-split", lambda d: _lm(d, _prepared(d, val_fraction=0.0)), "the val split is empty (0 tokens)"),
    ("prepared-smaller-than-a-batch", lambda d: _lm(d, _prepared(d), "--set", "data.batch_size=4096"),
     "fewer than one global batch of 4096"),
    ("lm-on-builtin-data", lambda d: ["train", LM, "--set", "data.source=builtin", "--set", "data.prepared_path=null"],
     "model.kind lm trains on prepared token shards; set data.source=prepared"),
    ("lm-tied-pipeline", lambda d: ["train", LM, "--set", "distribution.pipeline={stages: 2, micro_batches: 2}"],
     "set model.tie_embeddings=false to pipeline this model"),
    ("generate-negative-temperature", lambda d: ["generate", str(d), "--temperature", "-1", "hello"],
     "argument --temperature: must be >= 0.0"),
    ("evaluate-lm-test-split", lambda d: ["evaluate", _fake_lm_run(d), "--split", "test"],
     "prepared data has train and val splits only; evaluate with --split val"),
    # --- sharded data parallel (ZeRO, issue 13): refused by the config check, before any process starts
    ("zero-single", lambda d: ["train", CLASSIFIER, "--set", "distribution.zero=2"],
     "distribution.zero (2) shards state over Horovod ranks but distribution.backend is single"),
    ("zero-mirrored", lambda d: ["train", CLASSIFIER, "--set", "distribution.backend=mirrored",
                                 "--set", "distribution.zero=1"], "backend is mirrored; use backend horovod"),
    ("zero-multi-worker", lambda d: ["launch", "-np", "2", "--backend", "multi_worker", CLASSIFIER,
                                     "--set", "distribution.zero=1"], "implemented for backend horovod only"),
    ("zero-level", lambda d: ["train", CLASSIFIER, "--set", "distribution.zero=4"], "distribution.zero"),
    ("zero-float16", lambda d: ["launch", "-np", "2", "--backend", "horovod", CLASSIFIER, "--set",
                                "distribution.zero=2", "--set", "train.mixed_precision=float16"],
     "float16 (loss scaling) is not supported with distribution.zero; use bfloat16"),
    ("zero3-tied-embeddings", lambda d: ["launch", "-np", "2", "--backend", "horovod", LM,
                                         "--set", "distribution.zero=3"],
     "model.tie_embeddings shares one matrix between levels embed and head; set model.tie_embeddings=false"),
    ("zero3-dropout", lambda d: ["launch", "-np", "2", "--backend", "horovod", str(CONFIGS / "transformer_small.yaml"),
                                 "--set", "distribution.zero=3"], "but model.dropout is 0.1; set model.dropout=0.0"),
    ("zero3-jit-compile", lambda d: ["launch", "-np", "2", "--backend", "horovod", SUMMARIZER, "--set",
                                     "distribution.zero=3", "--set", "train.jit_compile=true"],
     "train.jit_compile does not combine with distribution.zero 3"),
    ("zero3-pipeline", lambda d: ["launch", "-np", "2", "--backend", "horovod", SUMMARIZER, "--set",
                                  "distribution.zero=3", "--set", f"distribution.pipeline={{{PIPE}}}"],
     "distribution.zero 3 does not combine with distribution.pipeline: zero 3's level-by-level engine is itself a "
     "schedule over the levels; use distribution.zero=2 with a pipeline"),
    ("plan-device-memory-unreadable", lambda d: ["plan", CLASSIFIER, "--device-memory", "lots"],
     "--device-memory 'lots': expected a positive size such as 80GB"),
    ("plan-does-not-fit", lambda d: ["plan", str(CONFIGS / "transformer_small.yaml"), "--device-memory", "1MB"],
     "per rank with distribution.zero=0 over 1 rank(s): does not fit in 1MB (--device-memory)"),
    ("plan-zero3-level-too-large", lambda d: ["plan", str(CONFIGS / "transformer_small.yaml"), "-np", "2",
                                              "--device-memory", "2MB", "--set", "distribution.backend=horovod",
                                              "--set", "distribution.zero=3", "--set", "model.dropout=0.0"],
     "its largest level, decoder_block_0 (50.2K parameters), needs 14.1 MiB whole while it runs under zero 3"),
]


@pytest.mark.parametrize("argv_for,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, argv_for, fragment: str):
    run_dir = tmp_path / "run"
    argv = argv_for(tmp_path)
    if argv[0] in ("train", "launch") and not any(a.startswith("run_dir=") for a in argv):
        argv += ["--set", f"run_dir={run_dir}"]
    done = strata(*argv, cwd=tmp_path, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert len(lines) == 1 and lines[0].startswith("strata: error: "), done.stderr
    assert fragment in lines[0], lines[0]
    assert not run_dir.exists(), "a failed start must not leave a run directory"
    assert not (tmp_path / "runs").exists()


# Refused only after TensorFlow has been imported (it lists the process's devices): no GPU has number 98.
AFTER_TF = ["train", SUMMARIZER, *TINY_SUMMARIZER, "--set",
            f"distribution.pipeline={{{PIPE}, devices: [/gpu:98, /gpu:99]}}"]
ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d+:\d+:\d+(\.\d+)?\s+\d+\s+\S+:\d+\] ", re.M)


def _as_a_user(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """AFTER_TF in the environment a user has: no TF_CPP_MIN_LOG_LEVEL (TF_ENABLE_ONEDNN_OPTS=1 from
    child_env: TensorFlow's oneDNN path, and its log lines, on any x86-64 CPU)."""
    environ = child_env(**env)
    environ.pop("TF_CPP_MIN_LOG_LEVEL")
    return subprocess.run([STRATA, *AFTER_TF, "--set", f"run_dir={tmp_path / 'run'}"], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=environ)


def test_the_whole_stderr_is_strata_s_one_line_even_after_tensorflow_loaded(tmp_path: Path):
    done = _as_a_user(tmp_path)
    assert done.returncode == 2
    assert re.fullmatch(r"strata: error: distribution\.pipeline\.devices: /gpu:98 is not a device of this "
                        r"process[^\n]*\n", done.stderr), done.stderr


def test_strata_tf_logs_lets_tensorflow_s_lines_through(tmp_path: Path):
    shown = _as_a_user(tmp_path, STRATA_TF_LOGS="1")
    assert shown.returncode == 2 and shown.stderr.splitlines()[-1].startswith("strata: error: ")
    if not ABSL_LINE.search(shown.stderr):
        pytest.skip("TensorFlow printed no log line on this CPU even with TF_ENABLE_ONEDNN_OPTS=1 and no "
                    "TF_CPP_MIN_LOG_LEVEL: nothing for STRATA_TF_LOGS=1 to show here")
    assert len(shown.stderr.splitlines()) > 1
