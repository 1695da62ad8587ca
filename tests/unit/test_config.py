"""Config loading: shipped configs validate, overrides are typed, errors are one line with the path."""
from __future__ import annotations

import pytest

from tests.conftest import CONFIGS
from trainer.config import apply_overrides, config_from_dict, load_config, parse_override
from trainer.errors import ConfigError


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.data.batch_size % cfg.train.grad_accum == 0


def test_overrides_are_parsed_as_yaml_values():
    assert parse_override("optimizer.lr=0.5") == (["optimizer", "lr"], 0.5)
    assert parse_override("train.deterministic=false") == (["train", "deterministic"], False)
    assert parse_override("logging.profile_steps=[2, 4]") == (["logging", "profile_steps"], [2, 4])
    assert parse_override("name=a=b") == (["name"], "a=b")


def test_overrides_create_sections_and_do_not_mutate_input():
    raw = {"name": "x", "model": {"kind": "classifier"}}
    out = apply_overrides(raw, ["data.builtin.seed=7", "model.hidden_dim=8"])
    assert out["data"]["builtin"]["seed"] == 7 and out["model"]["hidden_dim"] == 8
    assert "data" not in raw


def test_override_wins_over_file():
    cfg = load_config(CONFIGS / "classifier.yaml", ["data.batch_size=16", "optimizer.lr=3e-4"])
    assert cfg.data.batch_size == 16 and cfg.optimizer.lr == 3e-4  # YAML reads 3e-4 as text; the schema converts


def test_yaml_tags_cannot_run_code(tmp_path):
    bad = tmp_path / "evil.yaml"
    bad.write_text("name: !!python/object/apply:os.system ['touch pwned']\nmodel: {kind: classifier}\n")
    with pytest.raises(ConfigError):
        load_config(bad)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"name": "x", "model": {"kind": "classifier", "embed_dim": 0}}, "model.embed_dim"),
        ({"name": "x", "model": {"kind": "classifier"}, "trian": {}}, "trian: unknown key"),
        ({"name": "x"}, "model: required but missing"),
        ({"name": "x", "model": {"kind": "classifier"}, "train": {"early_stopping": {"metric": "rougeL"}}},
         "val_accuracy"),
        ({"name": "x", "model": {"kind": "summarizer"}, "data": {"source": "tfds"}}, "tfds_name"),
    ],
)
def test_errors_are_one_line_with_dotted_path(raw, fragment):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, source="c.yaml")
    message = str(err.value)
    assert "\n" not in message and message.startswith("c.yaml: ")
    assert fragment in message, message


def test_resolved_config_round_trips():
    cfg = load_config(CONFIGS / "summarizer.yaml", ["train.steps=70"])
    import yaml

    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


# ------------------------------------------------------------------------------- pipeline section
def _pipeline_cfg(pipeline: dict, **sections) -> dict:
    raw = {"name": "p", "model": {"kind": "summarizer", "encoder_layers": 2}, "data": {"batch_size": 32},
           "distribution": {"pipeline": pipeline}}
    raw.update(sections)
    return raw


def test_pipeline_section_defaults_and_explicit_partition():
    cfg = config_from_dict(_pipeline_cfg({"stages": 2}))
    pipe = cfg.distribution.pipeline
    assert (pipe.stages, pipe.micro_batches, pipe.schedule, pipe.partition, pipe.recompute) == (2, 4, "1f1b", "auto", False)
    split = [["embed", "encoder_1", "encoder_2"], ["decoder", "attention", "output"]]
    assert config_from_dict(_pipeline_cfg({"stages": 2, "partition": split})).distribution.pipeline.partition == split


@pytest.mark.parametrize("pipeline, sections, message", [
    ({"stages": 7}, {}, "stages (7) exceeds the 6 levels of the summarizer"),
    ({"stages": 2, "micro_batches": 5}, {}, "micro_batches (5) must divide data.batch_size (32)"),
    ({"stages": 2, "partition": [["embed", "encoder_1"], ["decoder", "attention", "output"]]}, {},
     "level 'encoder_2' is in no stage"),
    ({"stages": 2, "partition": [["embed", "decodr"], ["attention", "output"]]}, {}, "did you mean 'decoder'"),
    ({"stages": 3, "partition": [["embed"], ["encoder_1", "encoder_2", "decoder", "attention", "output"]]}, {},
     "lists 2 stages but stages is 3"),
    ({"stages": 2, "devices": ["/gpu:0"]}, {}, "lists 1 devices for 2 stages"),
    ({"stages": 2}, {"train": {"grad_accum": 2}}, "train.grad_accum must be 1 with distribution.pipeline"),
    ({"stages": 2}, {"train": {"mixed_precision": "float16"}}, "float16"),
    ({"stages": 2, "recompute": True}, {"model": {"kind": "summarizer", "dropout": 0.1}}, "model.dropout"),
    ({"stages": 2, "schedule": "zigzag"}, {}, "distribution.pipeline.schedule"),
    ({"stages": 2, "micro_batches": 0}, {}, "distribution.pipeline.micro_batches"),
])
def test_pipeline_errors_name_the_field(pipeline, sections, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(_pipeline_cfg(pipeline, **sections))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_pipeline_refuses_mirrored_backend():
    raw = _pipeline_cfg({"stages": 2})
    raw["distribution"]["backend"] = "mirrored"
    with pytest.raises(ConfigError, match="does not combine with backend mirrored"):
        config_from_dict(raw)
