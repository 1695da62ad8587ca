"""`strata data prepare` in-process: shards decode back to the documents, the index is right, the output
does not depend on the worker count, and mixing tokenizers, settings or inputs is refused."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tests.textdata import UNICODE_DOC, documents, tokenizer, write_jsonl
from trainer.data import pydocs
from trainer.data.documents import FIELD_JOIN
from trainer.data.prepare import PrepareSpec, doc_split, prepare
from trainer.data.shards import INDEX, PreparedData
from trainer.data.subword import SubwordTokenizer, train_tokenizer
from trainer.errors import DataError


def _inputs(d: Path) -> tuple[list[str], list[str]]:
    """A folder of JSONL, CSV, TSV and plain text, and the documents they hold in reading order."""
    docs = list(documents())
    folder = d / "corpus"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", docs[:40] + [UNICODE_DOC])
    with open(folder / "b.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["title", "text"])
        w.writerows([[f"t{i}", doc] for i, doc in enumerate(docs[40:80])])
    with open(folder / "c.tsv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["text"])
        w.writerows([[doc] for doc in docs[80:120]])
    paragraphs = [p.replace("\n\n", "\n") for p in docs[120:]]
    (folder / "sub" / "d.txt").write_text("\n\n\n".join(paragraphs) + "\n", encoding="utf-8")
    (folder / ".hidden").write_text("skipped")
    return [str(folder)], docs[:40] + [UNICODE_DOC] + docs[40:120] + paragraphs


def _spec(out: Path, inputs: list[str], **kw) -> PrepareSpec:
    base = dict(inputs=inputs, tokenizer="bpe", vocab_size=400, shard_tokens=997, val_fraction=0.2, workers=1,
                progress=False)
    return PrepareSpec(out=out, **{**base, **kw})


def _stream(out: Path, index: dict, split: str) -> np.ndarray:
    files = [out / e["file"] for e in index["shards"] if e["split"] == split]
    return np.concatenate([np.fromfile(f, dtype=index["dtype"]) for f in files])


def test_shards_decode_back_to_every_document_and_the_index_describes_them(tmp_path):
    inputs, docs = _inputs(tmp_path)
    out = tmp_path / "prepared"
    index, worked = prepare(_spec(out, inputs))
    assert worked and (out / INDEX).is_file() and not (out / "index.partial.json").exists()
    tok = SubwordTokenizer.load(out / "tokenizer.model")  # trained on these inputs
    model_sha = hashlib.sha256((out / "tokenizer.model").read_bytes()).hexdigest()
    assert tok.sha256 == index["tokenizer"]["sha256"] == model_sha
    assert index["vocab_size"] == tok.vocab_size == 400
    # trained on the training documents only: held-out text stays unseen by the tokenizer too
    train_docs = [d for d in docs if doc_split(d, seed=0, val_fraction=0.2) == 0]
    assert tok.sha256 == train_tokenizer(train_docs, vocab_size=400).sha256
    assert index["dtype"] == "<u2" and index["special_ids"]["eod"] == 3 and index["byte_fallback"]
    for split, code in (("train", 0), ("val", 1)):
        expected = [d for d in docs if doc_split(d, seed=0, val_fraction=0.2) == code]
        stream = _stream(out, index, split)
        ends = np.flatnonzero(stream == 3)
        assert ends[-1] == len(stream) - 1  # the stream ends with a document's end
        decoded = [tok.decode(part) for part in np.split(stream, ends + 1)[:-1]]
        assert decoded == expected  # every character of every document, in order (UNICODE_DOC included)
        assert index["splits"][split] == {"tokens": len(stream), "documents": len(expected),
                                          "shards": -(-len(stream) // 997)}
    assert UNICODE_DOC in [d for d in docs if doc_split(d, seed=0, val_fraction=0.2) == 0] + \
        [d for d in docs if doc_split(d, seed=0, val_fraction=0.2) == 1]
    for entry in index["shards"]:
        data = (out / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == 2 * entry["tokens"]
    last = {e["split"]: e["file"] for e in index["shards"]}
    assert all(e["tokens"] == 997 for e in index["shards"] if e["file"] != last[e["split"]])
    assert [s["path"] for s in index["sources"]] == sorted(s["path"] for s in index["sources"])
    assert len(index["sources"]) == 4 and all(len(s["sha256"]) == 64 for s in index["sources"])


def test_fields_are_joined_and_the_output_does_not_depend_on_workers(tmp_path):
    docs = documents()
    records = [{"document": a, "summary": b} for a, b in zip(docs[:60], docs[60:120])]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    model = tmp_path / "given.model"
    tokenizer("bpe", 400).save(model)
    one = prepare(_spec(tmp_path / "one", [str(path)], fields=["document", "summary"], tokenizer_model=str(model),
                        shard_tokens=500))[0]
    two = prepare(_spec(tmp_path / "two", [str(path)], fields=["document", "summary"], tokenizer_model=str(model),
                        shard_tokens=500, workers=2))[0]
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(names) > 4
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    tok = tokenizer("bpe", 400)
    first = _stream(tmp_path / "one", one, "train")
    want = next(r for r in records
                if doc_split(r["document"] + FIELD_JOIN + r["summary"], seed=0, val_fraction=0.2) == 0)
    assert tok.decode(first[: np.argmax(first == 3)]) == want["document"] + FIELD_JOIN + want["summary"]
    assert two == one


def test_an_existing_directory_is_resumed_only_with_the_same_inputs_settings_and_tokenizer(tmp_path):
    inputs, _ = _inputs(tmp_path)
    out = tmp_path / "prepared"
    index, _ = prepare(_spec(out, inputs))
    again, worked = prepare(_spec(out, inputs))
    assert not worked and again == index
    other = tmp_path / "other.model"
    tokenizer("bpe", 450).save(other)
    with pytest.raises(DataError, match=r"--tokenizer-model .*other.model \(sha256 \w+\) did not produce the data"):
        prepare(_spec(out, inputs, tokenizer_model=str(other)))
    with pytest.raises(DataError, match="holds a different preparation .shard_tokens was 997, now 500"):
        prepare(_spec(out, inputs, shard_tokens=500))
    with pytest.raises(DataError, match="prepared with another tokenizer"):
        prepare(_spec(out, inputs, vocab_size=450))
    Path(inputs[0], "a.jsonl").write_text('{"text": "changed"}\n')
    with pytest.raises(DataError, match="prepared from other inputs"):
        prepare(_spec(out, inputs))
    data = PreparedData.open(out)
    data.expect_tokenizer(index["tokenizer"]["sha256"], "same")
    with pytest.raises(DataError, match=r"tokenizer x.model \(sha256 \w+\) did not produce the data in"):
        data.expect_tokenizer(tokenizer("bpe", 450).sha256, "x.model")


@pytest.mark.parametrize("files,fields,fragment", [
    ({"a.jsonl": "", "b.txt": "\n\n  \n"}, ["text"], "no documents: every input is empty"),
    ({"a.jsonl": '{"body": "x"}\n'}, ["text"], "a.jsonl:1: missing key 'text' (keys here: body); choose"),
    ({"a.jsonl": '{"text": 3}\n'}, ["text"], "a.jsonl:1: 'text' must be a string"),
    ({"a.jsonl": '{"text": "ok"}\n{oops\n'}, ["text"], "a.jsonl:2: not valid JSON"),
    ({"a.csv": "title,body\nx,y\n"}, ["text"], "a.csv:1: no column 'text' in the header (title, body)"),
    ({"a.txt": b"caf\xe9\n"}, ["text"], "a.txt:1: not valid UTF-8 (byte 0xe9)"),
    ({"tfds/mnist/3.0.1/dataset_info.json": "{}", "tfds/mnist/3.0.1/mnist-train.tfrecord-00000": b"\x00\xff"},
     ["text"], "mnist/3.0.1: a TensorFlow Datasets directory"),
])
def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, files, fields, fragment):
    folder = tmp_path / "in"
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as err:
        prepare(_spec(tmp_path / "out", [str(folder)], fields=fields))
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option,fragment", [
    ({"seed": -1}, "--seed -1: must be a non-negative integer"), ({"val_fraction": 1.0}, "--val-fraction 1.0"),
    ({"shard_tokens": 0}, "--shard-tokens 0"), ({"fields": [""]}, "--field"), ({"vocab_size": 5}, "--vocab-size 5"),
    ({"tokenizer_model": "none.model"}, "--tokenizer-model none.model: file not found"),
])
def test_bad_options_are_refused_before_reading_anything(tmp_path, option, fragment):
    with pytest.raises(DataError, match=fragment):
        prepare(_spec(tmp_path / "out", [str(tmp_path / "never-read.jsonl")], **option))


def test_pydocs_selects_public_docstrings_in_a_fixed_order(tmp_path):
    root = tmp_path / "lib"
    for rel, src in {"b.py": '"""Module b."""\ndef f():\n    """F does x."""\ndef _g():\n    """private"""\n',
                     "a/__init__.py": '"""Package a."""\nclass C:\n    """C."""\n    def m(self):\n        """M."""\n',
                     "_private.py": '"""hidden"""', "test/t.py": '"""a test"""', "c.py": "x = 1\n",
                     "pydoc_data/topics.py": "topics = {'while': 'The while loop.', 'if': 'The if statement.'}"
                     }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(src)
    assert list(pydocs.documents(root)) == ["Package a.\n\nC.\n\nM.", "Module b.\n\nF does x.", "The if statement.",
                                            "The while loop."]
    assert pydocs.fingerprint(root)["files"] == 4  # a/__init__, b, c, topics
