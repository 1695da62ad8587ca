"""The `lm` model kind's config: levels, the prepared data source, and the refusals that need no TensorFlow."""
from __future__ import annotations

import pytest

from tests.conftest import CONFIGS
from trainer.config import config_from_dict, load_config
from trainer.errors import ConfigError

LM = {"name": "x", "model": {"kind": "lm", "layers": 3},
      "data": {"source": "prepared", "prepared_path": "some/dir", "batch_size": 8}}


def _with(**sections) -> dict:
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in LM.items()}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def test_lm_levels_and_task():
    cfg = config_from_dict(_with())
    assert cfg.model.level_names() == ["embed", "block_1", "block_2", "block_3", "head"]
    assert cfg.task.name == "language_modeling" and cfg.task.command == "generate"
    assert cfg.model.tie_embeddings and cfg.model.positions == "rotary"


@pytest.mark.parametrize("sections,fragment", [
    ({"distribution": {"pipeline": {"stages": 2, "micro_batches": 2}}},
     "model.tie_embeddings: the tied embedding is used by level embed (stage 1) and level head (stage 2), and "
     "pipeline stages cannot share a variable; set model.tie_embeddings=false"),
    ({"data": {"source": "builtin", "prepared_path": None}},
     "trains on prepared token shards; set data.source=prepared"),
    ({"data": {"prepared_path": None}}, "source 'prepared' needs data.prepared_path"),
    ({"data": {"source": "jsonl", "train_path": "t.jsonl"}}, "data.prepared_path is ignored with data.source jsonl"),
    ({"model": {"num_heads": 3}}, "divisible by num_heads"),
    ({"model": {"d_model": 12, "num_heads": 4}}, "rotary positions need an even head width"),
])
def test_lm_refusals_are_one_line(sections, fragment):
    with pytest.raises(ConfigError) as err:
        config_from_dict(_with(**sections))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_untied_lm_pipelines_and_other_kinds_refuse_prepared_data():
    untied = _with(model={"tie_embeddings": False}, distribution={"pipeline": {"stages": 2, "micro_batches": 2}})
    assert config_from_dict(untied).distribution.pipeline.stages == 2
    with pytest.raises(ConfigError, match="data.source prepared is read by model.kind lm only, not classifier"):
        config_from_dict({"name": "x", "model": {"kind": "classifier"},
                          "data": {"source": "prepared", "prepared_path": "d"}})
    with pytest.raises(ConfigError, match="data.tokenizer 'xx': expected word, bpe, unigram or a SentencePiece"):
        config_from_dict({"name": "x", "model": {"kind": "classifier"}, "data": {"tokenizer": "xx"}})
    with pytest.raises(ConfigError, match="data.tokenizer 'bpe': expected a SentencePiece .model file"):
        config_from_dict(_with(data={"tokenizer": "bpe"}))  # prepared data has its tokenizer already
    with pytest.raises(ConfigError, match=r"data.vocab_size \(100\) is too small for a bpe tokenizer"):
        config_from_dict({"name": "x", "model": {"kind": "summarizer"}, "data": {"tokenizer": "bpe", "vocab_size": 100}})
    assert config_from_dict({"name": "x", "model": {"kind": "classifier"}, "data": {"tokenizer": "t.model"}})


def test_shipped_lm_configs():
    small = load_config(CONFIGS / "lm_small.yaml")
    assert small.data.source == "prepared" and small.data.prepared_path == "data/pydocs"
