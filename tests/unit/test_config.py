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


# ------------------------------------------------------------------- YAML 1.1 booleans (issue 10)
def test_off_on_yes_no_stay_strings_in_files_and_overrides(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("name: no\nmodel: {kind: summarizer}\ntrain: {mixed_precision: off, deterministic: no}\n"
                      "data: {tfds_summary_key: on}\nlogging: {progress_bar: off}\n")
    cfg = load_config(config)
    assert (cfg.name, cfg.train.mixed_precision, cfg.data.tfds_summary_key) == ("no", "off", "on")
    assert cfg.train.deterministic is False and cfg.logging.progress_bar is False  # real bools still read them
    cfg = load_config(CONFIGS / "classifier.yaml", ["train.mixed_precision=off", "name=yes",
                                                    "data.tfds_text_key=off", "train.deterministic=no"])
    assert (cfg.name, cfg.train.mixed_precision, cfg.data.tfds_text_key) == ("yes", "off", "off")
    assert cfg.train.deterministic is False
    assert parse_override("train.deterministic=true") == (["train", "deterministic"], True)
    assert parse_override("train.mixed_precision=off") == (["train", "mixed_precision"], "off")


# ------------------------------------------------------------------------- did you mean (issue 15)
@pytest.mark.parametrize("override, suggestion", [
    ("optimizer.learning_rate=0.1", "optimizer.learning_rate: unknown key; did you mean optimizer.lr?"),
    ("model.hiden_dim=3", "model.hiden_dim: unknown key; did you mean model.hidden_dim?"),
    ("trian.steps=3", "trian: unknown key; did you mean train?"),
    ("data.batchsize=8", "did you mean data.batch_size?"),
    ("optimizer.warmup=10", "did you mean optimizer.warmup_steps?"),
    ("train.early_stopping={metrc: val_loss}", "did you mean train.early_stopping.metric?"),
    ("distribution.pipeline={stage: 2}", "did you mean distribution.pipeline.stages?"),
])
def test_unknown_keys_suggest_the_field_meant(override, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "summarizer.yaml", [override])
    assert suggestion in str(err.value)


def test_unknown_key_without_a_likely_field_keeps_the_generic_hint():
    with pytest.raises(ConfigError, match=r"model.zebra: unknown key; check the spelling"):
        load_config(CONFIGS / "classifier.yaml", ["model.zebra=1"])


# --------------------------------------------------------------------- data settings never ignored
@pytest.mark.parametrize("override, fragment", [
    ("data.val_path=v.jsonl", "data.val_path is ignored with data.source builtin (the built-in corpus is used); "
                              "set data.source=jsonl (or csv/tsv) to read it, or remove data.val_path"),
    ("data.test_path=t.jsonl", "data.test_path is ignored with data.source builtin"),
    ("data.tfds_name=cnn", "data.tfds_name is ignored with data.source builtin (the built-in corpus is used); "
                           "set data.source=tfds"),
])
def test_paths_the_source_does_not_read_are_errors(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "classifier.yaml", [override])
    assert fragment in str(err.value) and "data: data." not in str(err.value)


# ---------------------------------------------------------------------------- warm-up of short runs
def test_a_warmup_as_long_as_the_run_is_capped_with_a_note():
    cfg = load_config(CONFIGS / "summarizer.yaml", ["train.steps=50"])  # warmup_steps: 50 in the file
    steps, note = cfg.warmup()
    assert steps == 5 and "optimizer.warmup_steps (50) is not below train.steps (50)" in note
    assert "capped at 5 step(s)" in note
    assert load_config(CONFIGS / "summarizer.yaml").warmup() == (50, None)  # a warm-up that fits is kept
    assert load_config(CONFIGS / "classifier.yaml", ["train.steps=5"]).warmup()[0] == 0


# ------------------------------------------------------------------- a run directory as the config
def test_a_run_directory_is_a_config_that_resumes_it(tmp_path):
    run = tmp_path / "moved"
    run.mkdir()
    saved = load_config(CONFIGS / "classifier.yaml", ["train.steps=30", "run_dir=runs/elsewhere"])
    (run / "config.yaml").write_text(saved.to_yaml())
    cfg = load_config(run, ["train.steps=40"])
    assert cfg.run_dir == str(run) and cfg.train.steps == 40 and cfg.model == saved.model
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty: a directory without config.yaml"):
        load_config(tmp_path / "empty")


def test_a_run_may_gain_a_test_file_but_not_other_data_changes(tmp_path):
    from trainer.experiment import check_resume_compatible

    files = ["data.source=jsonl", "data.train_path=t.jsonl", f"run_dir={tmp_path}"]
    (tmp_path / "config.yaml").write_text(load_config(CONFIGS / "classifier.yaml", files).to_yaml())
    check_resume_compatible(load_config(CONFIGS / "classifier.yaml", [*files, "data.test_path=x.jsonl"]), tmp_path)
    with pytest.raises(ConfigError, match=r"different data config \(data.val_path: None -> 'v.jsonl'\)"):
        check_resume_compatible(load_config(CONFIGS / "classifier.yaml", [*files, "data.val_path=v.jsonl"]), tmp_path)
