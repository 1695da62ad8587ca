"""Security: configs are data, user strings never reach a shell, run directories and logs hold no secrets.

(TensorBoard binding to 127.0.0.1 by default is tested in test_training_features.py.)
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, REPO, STRATA, TINY_CLASSIFIER, run_cmd, strata

CLASSIFIER = CONFIGS / "classifier.yaml"
# Names a shell would act on: quotes, command substitution (both forms), a command separator, spaces.
HOSTILE = "a b'c\"d $(touch pwned1) `touch pwned2`; touch pwned3 &"
SECRETS = {"AWS_SECRET_ACCESS_KEY": "sekrit123aws", "HOROVOD_SECRET_TOKEN": "sekrit456hvd",
           "WANDB_API_KEY": "sekrit789wandb"}


def _injected(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("pwned*")]


@pytest.mark.parametrize("command", ["train", "launch"])
def test_a_yaml_python_tag_is_rejected_and_never_executed(tmp_path: Path, command: str):
    marker = tmp_path / "executed"
    config = tmp_path / "evil.yaml"
    config.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\nmodel: {{kind: classifier}}\n')
    argv = ["launch", "-np", "2"] if command == "launch" else ["train"]
    done = strata(*argv, str(config), "--set", f"run_dir={tmp_path / 'run'}", timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(lines) == 1 and "python/object/apply:os.system" in lines[0] and str(config) in lines[0], lines
    assert not marker.exists(), "the YAML tag ran a command"
    assert not (tmp_path / "run").exists()


@pytest.mark.multi_process
def test_hostile_paths_never_reach_a_shell_and_no_secret_reaches_the_run(tmp_path: Path):
    """`strata launch -np 2` with a config path and run_dir full of shell syntax: the job runs as asked,
    nothing is injected, and secrets from the environment appear neither in the run directory (config,
    TensorBoard events, checkpoints, metrics) nor in the output."""
    hostile = tmp_path / HOSTILE
    hostile.mkdir()
    config = hostile / f"{HOSTILE}.yaml"
    shutil.copy(CLASSIFIER, config)
    run_dir = hostile / "run"
    cwd = tmp_path / "cwd"  # where a shell would have run the injected commands
    cwd.mkdir()
    done = run_cmd([STRATA, "launch", "-np", "2", str(config), *TINY_CLASSIFIER, "--set", f"run_dir={run_dir}",
                    "--set", "train.steps=4", "--set", "optimizer.warmup_steps=0", "--set", "checkpoint.every=2",
                    "--set", "eval.every=4"],
                   timeout=300, cwd=cwd, **SECRETS)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert (run_dir / "checkpoints" / "ckpt-4.manifest.json").is_file() and (run_dir / "metrics.json").is_file()
    assert _injected(tmp_path, REPO) == [], "a shell interpreted the path"

    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any("tfevents" in p.name for p in files) and (run_dir / "config.yaml") in files
    for value in SECRETS.values():
        leaks = [str(p.relative_to(run_dir)) for p in files if value.encode() in p.read_bytes()]
        assert leaks == [], f"{value} found in {leaks}"
        assert value not in done.stdout + done.stderr
