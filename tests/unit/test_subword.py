"""The subword tokenizer loses no character: decode(encode(x)) == x for any Unicode string."""
from __future__ import annotations

import random

import pytest

from tests.textdata import UNICODE_DOC, documents, random_string, tokenizer
from trainer.data.subword import BOS_ID, EOD_ID, PAD_ID, UNK_ID, SubwordTokenizer, sample_lines, train_tokenizer
from trainer.errors import DataError


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_round_trip_on_generated_strings_and_a_unicode_document(model_type):
    tok = tokenizer(model_type)
    rng = random.Random(1234)
    texts = [random_string(rng) for _ in range(3000)] + [UNICODE_DOC, "", " ", "▁", "\ue000\ue001", "\ue000▁"]
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert tok.decode(ids) == text, (text, ids)
        assert UNK_ID not in ids and EOD_ID not in ids and PAD_ID not in ids
    # real text is compressed into subwords, not spelled out as bytes
    prose = " ".join(documents()[:50])
    assert len(tok.encode(prose)) < 0.8 * len(prose)


def test_special_ids_hash_and_save(tmp_path):
    tok = tokenizer("bpe")
    assert tok.special_ids == {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eod": EOD_ID} == \
        {"pad": 0, "unk": 1, "bos": 2, "eod": 3}
    assert tok.vocab_size == 400 and tok.byte_fallback
    tok.save(tmp_path / "t.model")
    again = SubwordTokenizer.load(tmp_path / "t.model")
    assert again.sha256 == tok.sha256 and again.encode(UNICODE_DOC) == tok.encode(UNICODE_DOC)
    # training is deterministic: the same sample gives the same model (so a re-run prepares identical data)
    assert train_tokenizer(documents(), vocab_size=400).sha256 == tok.sha256


def test_sample_is_bounded_and_deterministic():
    lines = sample_lines(documents(), max_chars=5000, seed=0)
    assert 4000 < sum(map(len, lines)) <= 5000
    assert lines == sample_lines(documents(), max_chars=5000, seed=0)
    assert lines != sample_lines(documents(), max_chars=5000, seed=1)


def test_bad_tokenizer_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match=r"--vocab-size 5000 is too large .*at most \d+"):
        train_tokenizer(["just a few words here"], vocab_size=5000)
    with pytest.raises(DataError, match="--vocab-size 100: must be between"):
        train_tokenizer(documents(), vocab_size=100)
    with pytest.raises(DataError, match=r"--vocab-size 300 is too small for the distinct characters .*at least \d+"):
        train_tokenizer(documents(), vocab_size=300)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="junk.model: not a SentencePiece model"):
        SubwordTokenizer.load(tmp_path / "junk.model")
    with pytest.raises(DataError, match="none.model: tokenizer model not found"):
        SubwordTokenizer.load(tmp_path / "none.model")
