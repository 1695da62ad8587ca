"""Unit tests for trainer.data: corpora, readers, vocabulary (Python and in-graph), splits, encoding."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.config import BuiltinData, DataConfig
from trainer.data import (
    BOS,
    CANONICAL_VERB,
    COUNT_WORDS,
    EOS,
    NEGATIVE_WORDS,
    PAD,
    POSITIVE_WORDS,
    UNK,
    VERB_SYNONYMS,
    Splits,
    Vocabulary,
    encode_splits,
    load_splits,
    make_classification_corpus,
    make_summarization_corpus,
    read_examples,
    read_tfds,
    standardize,
    tf_decoder,
    tf_encoder,
    training_texts,
)
from trainer.data.corpora import best_accuracy, majority_sentiment
from trainer.data.splits import LabelSet, check_split, describe_splits
from trainer.errors import DataError
from trainer.tasks import CLASSIFICATION, SUMMARIZATION, Task


# -------------------------------------------------------------------------------------- corpora
@pytest.mark.parametrize("make", [make_classification_corpus, make_summarization_corpus])
def test_corpora_are_deterministic_and_seeded(make):
    assert make(50, 7) == make(50, 7)
    assert make(50, 7) != make(50, 8)


def test_classification_corpus_is_balanced_short_and_its_clean_label_is_the_count_rule():
    corpus = make_classification_corpus(2001, seed=3, label_noise=0.0)
    labels = [e["label"] for e in corpus]
    assert set(labels) == {0, 1} and abs(sum(labels) - len(labels) / 2) <= 0.5
    pos, neg = set(POSITIVE_WORDS), set(NEGATIVE_WORDS)
    for e in corpus:
        words = standardize(e["text"])
        assert 1 <= len(words) <= 64
        assert e["text"] == e["text"].lower()
        n_pos, n_neg = sum(w in pos for w in words), sum(w in neg for w in words)
        assert n_pos != n_neg and int(n_pos > n_neg) == e["label"] == majority_sentiment(e["text"])
    # Both classes use both word lists: no single word tells the classes apart (the count does).
    texts = [set(standardize(e["text"])) for e in corpus]
    best_single_word = max(max(acc, 1 - acc) for w in pos | neg
                           for acc in [sum((w in t) == bool(y) for t, y in zip(texts, labels)) / len(corpus)])
    assert best_single_word < 0.6
    assert sum(bool(t & pos) and bool(t & neg) for t in texts) > 0.4 * len(corpus)


@pytest.mark.parametrize("n, noise", [(500, 0.1), (200, 0.1), (2001, 0.25), (301, 0.0)])
def test_classification_label_noise_gives_a_known_best_accuracy(n, noise):
    seed = 17
    clean = make_classification_corpus(n, seed, label_noise=0.0)
    noisy = make_classification_corpus(n, seed, label_noise=noise)
    assert [e["text"] for e in noisy] == [e["text"] for e in clean]  # noise flips labels, never texts
    flipped = [c["label"] for c, e in zip(clean, noisy) if c["label"] != e["label"]]
    assert len(flipped) == round(noise * n)
    assert abs(flipped.count(0) - flipped.count(1)) <= 1  # from both classes alike: still balanced
    assert abs(sum(e["label"] for e in noisy) - n / 2) <= 1
    # The Bayes-optimal rule (the clean label) is right exactly on the examples not flipped.
    rule = sum(majority_sentiment(e["text"]) == e["label"] for e in noisy) / n
    assert rule == pytest.approx(best_accuracy(n, noise), abs=1e-12)
    assert best_accuracy(500, 0.1) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="label_noise"):
        make_classification_corpus(10, seed, label_noise=0.5)


def _fact_words(document: str) -> set[str]:
    """Document words plus the canonical forms of its verbs and number words."""
    words = set(standardize(document))
    return words | {CANONICAL_VERB[w] for w in words if w in CANONICAL_VERB} | {
        COUNT_WORDS[w] for w in words if w in COUNT_WORDS}


def test_summarization_summaries_are_rewrites_found_in_the_document():
    corpus = make_summarization_corpus(500, seed=5)
    canonical = set(VERB_SYNONYMS)
    for e in corpus:
        doc, summary = standardize(e["document"]), standardize(e["summary"])
        assert len(doc) <= 60 and 1 <= len(summary) <= 10
        assert set(summary) <= _fact_words(e["document"]), e
        # A rewrite, not a copy: the canonical verb never occurs in the document.
        assert not canonical & set(doc)
        assert e["summary"] not in e["document"]


def test_summarization_lead_baseline_is_clearly_worse():
    from rouge_score import rouge_scorer

    corpus = make_summarization_corpus(300, seed=11)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    lead = []
    for e in corpus:
        n = len(e["summary"].split())
        lead_words = " ".join(standardize(e["document"])[:n])
        assert lead_words != e["summary"]
        lead.append(scorer.score(e["summary"], lead_words)["rougeL"].fmeasure)
    # The fact sentence is at a random position, so leading words are mostly filler.
    assert np.mean(lead) < 0.35


# -------------------------------------------------------------------------------------- readers
def _write(tmp_path: Path, name: str, content: str | bytes) -> str:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(p)


def _data_error(path: str, fmt: str, task: Task = CLASSIFICATION) -> str:
    with pytest.raises(DataError) as info:
        read_examples(path, fmt, task)
    message = str(info.value)
    assert "\n" not in message and Path(path).name in message
    # No chained traceback: shown to users as one line.
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)
    return message


def test_reads_jsonl_csv_tsv_with_label_spellings_and_blank_lines(tmp_path):
    jsonl = _write(tmp_path, "a.jsonl", '{"text": "good", "label": 1}\n\n  \n{"text": "bad", "label": "0"}\n'
                                        '{"text": "ok", "label": true}\n{"text": "meh", "label": "FALSE"}\n')
    assert [e["label"] for e in read_examples(jsonl, "jsonl", CLASSIFICATION)] == [1, 0, 1, 0]
    csv_path = _write(tmp_path, "a.csv", 'id,text,label\n1,"hello, world",1\n\n2,bye,false\n')
    assert read_examples(csv_path, "csv", CLASSIFICATION) == [
        {"text": "hello, world", "label": 1}, {"text": "bye", "label": 0}]
    tsv = _write(tmp_path, "a.tsv", "document\tsummary\na long document\tshort\n")
    assert read_examples(tsv, "tsv", SUMMARIZATION) == [{"document": "a long document", "summary": "short"}]


@pytest.mark.parametrize(
    "name, content, fmt, task, expected",
    [
        ("empty.jsonl", "", "jsonl", CLASSIFICATION, "empty"),
        ("blank.jsonl", "\n  \n", "jsonl", CLASSIFICATION, "empty"),
        ("latin.jsonl", b'{"text": "a", "label": 1}\n\n{"text": "caf\xe9", "label": 1}\n', "jsonl",
         CLASSIFICATION, ":3: not valid UTF-8"),
        ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "a", "label": 1\n', "jsonl", CLASSIFICATION,
         ":2: malformed JSON"),
        ("list.jsonl", '{"text": "a", "label": 1}\n["a", 1]\n', "jsonl", CLASSIFICATION, ":2: expected a JSON object"),
        ("nokey.jsonl", '{"text": "a", "label": 1}\n{"txt": "a", "label": 1}\n', "jsonl", CLASSIFICATION,
         ":2: missing key 'text'; each line needs keys text, label"),
        ("nosum.jsonl", '{"document": "a b"}\n', "jsonl", SUMMARIZATION, ":1: missing key 'summary'"),
        ("emptytext.jsonl", '{"text": "  ", "label": 1}\n', "jsonl", CLASSIFICATION, ":1: 'text' is empty"),
        ("label.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": -2}\n', "jsonl", CLASSIFICATION,
         ":2: label -2 is invalid; labels must be class ids 0, 1, 2, ..."),
        ("labelfloat.jsonl", '{"text": "a", "label": 0.5}\n', "jsonl", CLASSIFICATION, ":1: label 0.5 is invalid"),
        ("label.csv", "text,label\na,1\nb, \n", "csv", CLASSIFICATION, ":3: label ' ' is invalid"),
        ("tabs.csv", "text\tlabel\na\t1\n", "csv", CLASSIFICATION,
         ":1: this file is tab-separated (its header splits on tabs into text, label) but data.source is csv; "
         "set data.source=tsv"),
        ("commas.tsv", "document,summary\na,b\n", "tsv", SUMMARIZATION,
         "this file is comma-separated (its header splits on commas into document, summary) but data.source is "
         "tsv; set data.source=csv"),
        ("header.csv", "sentence,label\na,1\n", "csv", CLASSIFICATION, ":1: header has columns [sentence, label] but "
         "needs text, label"),
        ("header.tsv", "document\tabstract\na\tb\n", "tsv", SUMMARIZATION, "needs document, summary"),
        ("only_header.csv", "text,label\n", "csv", CLASSIFICATION, "no examples"),
        ("fields.csv", "text,label\na,1\nb,1,extra\n", "csv", CLASSIFICATION, ":3: expected 2 fields"),
        ("emptysum.tsv", "document\tsummary\nsome text\t \n", "tsv", SUMMARIZATION, ":2: 'summary' is empty"),
    ],
)
def test_reader_errors_are_one_line_with_file_and_line(tmp_path, name, content, fmt, task, expected):
    message = _data_error(_write(tmp_path, name, content), fmt, task)
    assert expected in message, message


def test_labels_are_class_ids_or_names_checked_across_files(tmp_path):
    lines = [{"text": f"t{i}", "label": ["cat", "dog", "bird"][i % 3]} for i in range(30)]
    train = _write(tmp_path, "train.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    splits = load_splits(DataConfig(source="jsonl", train_path=train, val_fraction=0.2), CLASSIFICATION)
    assert splits.labels == LabelSet(3, ("bird", "cat", "dog"))  # names sorted: ids do not depend on file order
    assert {e["label"] for e in splits.train + splits.val} == {0, 1, 2}
    assert describe_splits(splits).endswith("3 classes: bird, cat, dog")
    arrays = encode_splits(splits, Vocabulary.build(training_texts(splits, CLASSIFICATION), 50),
                           DataConfig(), CLASSIFICATION)
    assert arrays["train"]["label"].dtype == np.int32  # K-way: class ids for the softmax cross-entropy
    ids = _write(tmp_path, "ids.jsonl", "".join(json.dumps({"text": f"t{i}", "label": str(i % 4)}) + "\n"
                                               for i in range(20)))
    assert load_splits(DataConfig(source="jsonl", train_path=ids), CLASSIFICATION).labels == LabelSet(4)
    zeros = _write(tmp_path, "zeros.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": false}\n')
    assert load_splits(DataConfig(source="jsonl", train_path=zeros), CLASSIFICATION).labels == LabelSet(2)
    test = _write(tmp_path, "test.jsonl", '{"text": "a", "label": "dog"}\n{"text": "b", "label": "fish"}\n')
    with pytest.raises(DataError, match=r"test.jsonl: label 'fish' is not a class of the training file "
                                        r"\(classes: 'bird', 'cat', 'dog'\)"):
        load_splits(DataConfig(source="jsonl", train_path=train, test_path=test), CLASSIFICATION)
    mixed = _write(tmp_path, "mixed.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "cat"}\n')
    with pytest.raises(DataError, match="mix class ids"):
        load_splits(DataConfig(source="jsonl", train_path=mixed), CLASSIFICATION)
    one = _write(tmp_path, "one.jsonl", '{"text": "a", "label": "cat"}\n{"text": "b", "label": "cat"}\n')
    with pytest.raises(DataError, match="at least two classes"):
        load_splits(DataConfig(source="jsonl", train_path=one), CLASSIFICATION)


def test_a_run_without_a_test_file_refuses_to_evaluate_test():
    files = DataConfig(source="jsonl", train_path="t.jsonl", val_path="v.jsonl")
    with pytest.raises(DataError, match=r"runs/x: this run has no test split .*--split val, or add test_path"):
        check_split(files, "test", "runs/x")
    check_split(files, "val", "runs/x")
    check_split(files.model_copy(update={"test_path": "t.jsonl"}), "test", "runs/x")
    check_split(DataConfig(), "test", "runs/x")  # the built-in corpus has a real test split


def test_reader_missing_file_and_directory(tmp_path):
    assert "file not found" in _data_error(str(tmp_path / "nope.jsonl"), "jsonl")
    (tmp_path / "dir.csv").mkdir()
    assert "is a directory" in _data_error(str(tmp_path / "dir.csv"), "csv")


def test_read_tfds_without_tensorflow_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(DataError, match="pip install tensorflow-datasets"):
        read_tfds("cnn_dailymail", "/nonexistent", "train", "article", "highlights")


# ------------------------------------------------------------------------------------ vocabulary
def test_vocabulary_build_order_save_load(tmp_path):
    vocab = Vocabulary.build(["b a c a", "c b a", "d"], max_size=7)
    assert vocab.tokens == ["<pad>", "<unk>", "<s>", "</s>", "a", "b", "c"]  # ties (b, c) alphabetical
    assert vocab.size == 7
    vocab.save(tmp_path / "vocab.json")
    assert json.loads((tmp_path / "vocab.json").read_text()) == vocab.tokens
    assert Vocabulary.load(tmp_path / "vocab.json") == vocab
    with pytest.raises(DataError, match="not found"):
        Vocabulary.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[\"<pad>\", ")
    with pytest.raises(DataError, match="corrupt"):
        Vocabulary.load(tmp_path / "bad.json")
    (tmp_path / "nospecial.json").write_text('["a", "b"]')
    with pytest.raises(DataError, match="corrupt"):
        Vocabulary.load(tmp_path / "nospecial.json")


def test_encode_pads_truncates_and_decode_stops_at_eos():
    vocab = Vocabulary.build(["the cat sat"], max_size=50)
    cat, sat, the = (vocab.token_id(w) for w in ("cat", "sat", "the"))
    assert vocab.encode("The CAT, zebra!", 5) == [the, cat, UNK, PAD, PAD]
    assert vocab.encode("the cat sat the cat", 4, add_bos=True, add_eos=True) == [BOS, the, cat, EOS]
    assert vocab.encode("cat", 4, add_eos=True) == [cat, EOS, PAD, PAD]
    batch = vocab.encode_batch(["cat", "sat sat"], 3)
    assert batch.dtype == np.int32 and batch.shape == (3 - 1, 3)
    assert vocab.encode_batch([], 3).shape == (0, 3)
    assert vocab.decode([BOS, the, PAD, cat, EOS, sat]) == "the cat"
    assert vocab.decode([cat, 999]) == "cat <unk>"


TRICKY = [
    "The CAT sat on the mat.",
    "don't STOP -- it's the dog's bone!!!",
    "naïve café: Ünïcode, Kelvin \u212a and \u0130stanbul",
    "unknown zebra words",
    "",
    "   \t\n ",
    "'' ' 42 b4 x-ray 3.14",
    "the " * 40,
]


def test_python_and_tf_encoders_agree_and_save(tmp_path):
    import tensorflow as tf

    vocab = Vocabulary.build(["the cat sat on the mat", "don't stop it's the dog's bone 42 b4", "x ray"], 100)
    for kw in ({}, {"add_bos": True}, {"add_eos": True}, {"add_bos": True, "add_eos": True}):
        got = tf_encoder(vocab, 12, **kw)(tf.constant(TRICKY)).numpy()
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, vocab.encode_batch(TRICKY, 12, **kw), err_msg=str(kw))

    class Serving(tf.Module):
        def __init__(self):
            super().__init__()
            self.encode = tf_encoder(vocab, 12, add_eos=True)
            self.decode = tf_decoder(vocab)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def roundtrip(self, texts):
            return self.decode(self.encode(texts))

    tf.saved_model.save(Serving(), str(tmp_path / "serving"))
    loaded = tf.saved_model.load(str(tmp_path / "serving"))
    got = [s.decode() for s in loaded.roundtrip(tf.constant(TRICKY)).numpy()]
    assert got == [vocab.decode(row) for row in vocab.encode_batch(TRICKY, 12, add_eos=True)]

    ids = np.array([[BOS, 4, UNK, 999, PAD, EOS, 5], [EOS, 4, 4, 4, 4, 4, 4]], np.int32)
    decoded = [s.decode() for s in tf_decoder(vocab)(tf.constant(ids)).numpy()]
    assert decoded == [vocab.decode(ids[0]), ""]


# ---------------------------------------------------------------------------------------- splits
def _small_builtin(**kw) -> DataConfig:
    return DataConfig(builtin=BuiltinData(train_examples=200, val_examples=50, test_examples=50, seed=9), **kw)


@pytest.mark.parametrize("task, key", [(CLASSIFICATION, "text"), (SUMMARIZATION, "document")],
                         ids=["classification", "summarization"])
def test_builtin_splits_use_distinct_streams(task, key):
    splits = load_splits(_small_builtin(), task)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (200, 50, 50)
    train = {e[key] for e in splits.train}
    assert not train & {e[key] for e in splits.val} and not train & {e[key] for e in splits.test}
    assert splits.val != splits.test
    assert load_splits(_small_builtin(), task) == splits


def test_file_splits_carve_validation_deterministically(tmp_path):
    lines = [json.dumps({"text": f"example number {i}", "label": i % 2}) for i in range(40)]
    path = _write(tmp_path, "train.jsonl", "\n".join(lines) + "\n")
    cfg = DataConfig(source="jsonl", train_path=path, val_fraction=0.25)
    splits = load_splits(cfg, CLASSIFICATION)
    assert (len(splits.train), len(splits.val)) == (30, 10)
    assert splits.test is None  # no test file: no test split (evaluating "test" is refused, never val)
    assert splits.origin == {"train": "train.jsonl, 75% after carving val",
                             "val": "carved 25% from train.jsonl, data.val_fraction"}
    assert describe_splits(splits).startswith(
        "data: train 30 (train.jsonl, 75% after carving val), val 10 (carved 25% from train.jsonl, "
        "data.val_fraction), test none (no data.test_path")
    assert not {e["text"] for e in splits.train} & {e["text"] for e in splits.val}
    assert load_splits(cfg, CLASSIFICATION) == splits
    val = _write(tmp_path, "val.jsonl", lines[0] + "\n")
    with_val = load_splits(DataConfig(source="jsonl", train_path=path, val_path=val, test_path=val), CLASSIFICATION)
    assert len(with_val.train) == 40 and len(with_val.val) == 1 and len(with_val.test) == 1
    assert describe_splits(with_val) == "data: train 40 (train.jsonl), val 1 (val.jsonl), test 1 (val.jsonl), 2 classes"


def test_one_example_cannot_be_carved(tmp_path):
    path = _write(tmp_path, "one.csv", "text,label\nhello,1\n")
    with pytest.raises(DataError, match="one.csv: only 1 example"):
        load_splits(DataConfig(source="csv", train_path=path), CLASSIFICATION)


def test_training_texts_use_the_train_split_only():
    splits = Splits(train=[{"document": "d1", "summary": "s1"}], val=[{"document": "dv", "summary": "sv"}])
    assert training_texts(splits, SUMMARIZATION) == ["d1", "s1"]
    assert training_texts(Splits(train=[{"text": "t", "label": 1}]), CLASSIFICATION) == ["t"]


def test_encode_splits_shapes_and_teacher_forcing_shift():
    cfg = _small_builtin(max_len=48, summary_len=5)  # short summary_len: some summaries are truncated
    splits = load_splits(cfg, SUMMARIZATION)
    vocab = Vocabulary.build(training_texts(splits, SUMMARIZATION), cfg.vocab_size)
    arrays = encode_splits(splits, vocab, cfg, SUMMARIZATION)
    assert set(arrays) == {"train", "val", "test"}
    train = arrays["train"]
    assert train["document"].shape == (200, 48) and train["summary_in"].shape == (200, 5)
    assert all(a.dtype == np.int32 for a in train.values())
    s_in, s_out = train["summary_in"], train["summary_out"]
    assert (s_in[:, 0] == BOS).all()
    assert ((s_out == EOS).sum(axis=1) == 1).all()  # every target ends (EOS kept when truncating)
    shifted = s_in[:, 1:] != PAD
    np.testing.assert_array_equal(s_in[:, 1:][shifted], s_out[:, :-1][shifted])

    cls_cfg = _small_builtin()
    cls = load_splits(cls_cfg, CLASSIFICATION)
    cls_arrays = encode_splits(cls, Vocabulary.build(training_texts(cls, CLASSIFICATION), 500), cls_cfg,
                               CLASSIFICATION)
    assert cls_arrays["val"]["tokens"].shape == (50, 64) and cls_arrays["val"]["tokens"].dtype == np.int32
    assert cls_arrays["val"]["label"].dtype == np.float32 and cls_arrays["val"]["label"].shape == (50,)


def test_data_modules_do_not_import_tensorflow():
    import subprocess

    code = ("import sys, trainer.data, trainer.data.splits; "
            "sys.exit(int(any(m.split('.')[0] in ('tensorflow', 'keras') for m in sys.modules)))")
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, env={"PYTHONPATH": str(root)}).returncode == 0


# ---------------------------------------------------------------------------------- learnability
def test_bag_of_embeddings_learns_the_classification_corpus():
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    cfg = DataConfig(builtin=BuiltinData(train_examples=2000, val_examples=400, test_examples=1, seed=1,
                                         label_noise=0.0))  # clean labels: is it learnable at all
    splits = load_splits(cfg, CLASSIFICATION)
    vocab = Vocabulary.build(training_texts(splits, CLASSIFICATION), cfg.vocab_size)
    arrays = encode_splits(splits, vocab, cfg, CLASSIFICATION)
    model = keras.Sequential([
        keras.Input((cfg.max_len,), dtype="int32"),
        keras.layers.Embedding(vocab.size, 16),  # no masking: padding must not stop it learning either
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy", metrics=["accuracy"])
    train = tf.data.Dataset.from_tensor_slices((arrays["train"]["tokens"], arrays["train"]["label"]))
    model.fit(train.shuffle(2000, seed=0).repeat().batch(32), steps_per_epoch=150, epochs=1, shuffle=False, verbose=0)
    _, accuracy = model.evaluate(arrays["val"]["tokens"], arrays["val"]["label"], verbose=0)
    assert accuracy >= 0.93
