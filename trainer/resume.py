"""What a start of `strata train` will do with an existing run directory, decided before TensorFlow loads.

A run directory holds the resolved `config.yaml` it was trained with and committed checkpoints
(`checkpoints/ckpt-N.manifest.json`, see checkpoint_manifest.py). Reading those two small things costs
milliseconds, so every question that only they answer is settled here, before a second is spent on
TensorFlow: does the new config fit the checkpoint (model, data, seed unchanged), is there anything left
to train, and what does a changed `train.steps` do to the learning rate.

`train.steps` is not frozen, but the learning-rate schedule depends on it: a cosine or linear decay is
planned over `train.steps`, so resuming a run at step k with a different total moves the rate at step k
(a finished 100-step cosine run sits at 0; the same step of a 200-step schedule is near half the peak: an
unplanned warm restart). So a changed `train.steps` is
  * applied, and said so, when the new schedule does not depend on it at step k and after: a constant
    schedule, or a decay that has not begun (k is still inside the warm-up);
  * refused otherwise, with the rates before and after and the ways to go on.
A run already at or past `train.steps` has nothing to do, and says so instead of evaluating again.

Pure Python (yaml and the manifests' file names): no TensorFlow import.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from launch import contract
from trainer import checkpoint_manifest as files
from trainer.errors import ConfigError

CONFIG_FILE = contract.RUN_CONFIG_FILE
CHECKPOINT_DIR = contract.CHECKPOINT_DIR
# Sections that must not change when a run is resumed: they define what the checkpoint means.
FROZEN_ON_RESUME = ("model", "data", "seed")


# ----------------------------------------------------------------------------------- checkpoints
def latest_checkpoint(directory: Path) -> tuple[int, float] | None:
    """(step, time it was saved) of the newest committed checkpoint in `directory`, or None.

    The commit time is the manifest's modification time (its atomic rename is the commit); directories
    written before manifests existed fall back to the `.index` files. Files are not verified here (that
    reads every byte): restoring still skips a damaged checkpoint and says so.
    """
    directory = Path(directory)
    for steps, path_of in ((files.committed_steps(directory),
                            lambda s: files.manifest_path(directory, files.checkpoint_name(s))),
                           (files.indexed_steps(directory),
                            lambda s: directory / f"{files.checkpoint_name(s)}.index")):
        for step in steps:
            try:
                return step, path_of(step).stat().st_mtime
            except OSError:
                continue  # deleted while we looked (a save sweeping old checkpoints)
    return None


def start_message(directory: Path, step: int) -> str:
    """`strata: resuming from step N (checkpoint ckpt-N, saved <local time>)` or `strata: starting at step 0`."""
    if step == 0:
        return "strata: starting at step 0"
    name = files.checkpoint_name(step)
    saved = ""
    for path in (files.manifest_path(Path(directory), name), Path(directory) / f"{name}.index"):
        try:
            saved = f", saved {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(path.stat().st_mtime))}"
            break
        except OSError:
            continue
    return f"strata: resuming from step {step} (checkpoint {name}{saved})"


# ---------------------------------------------------------------------------------- learning rate
def lr_at(step: int, optimizer: dict, total_steps: int, num_replicas: int = 1) -> float:
    """The rate trainer.optim.WarmupSchedule gives optimizer step `step` (0-based), in plain Python.

    `optimizer` is the config's `optimizer` section as a dict. A unit test checks this against the
    TensorFlow schedule, which is what training uses; this copy only serves messages.
    """
    peak = optimizer["lr"] * (num_replicas if optimizer.get("scale_lr_with_replicas") else 1)
    warmup, decay = optimizer.get("warmup_steps", 0), optimizer.get("schedule", "constant")
    min_ratio = optimizer.get("min_lr_ratio", 0.0)
    if step < warmup:
        return peak * (step + 1.0) / max(warmup, 1)
    progress = min(max((step - warmup) / max(float(total_steps) - warmup, 1.0), 0.0), 1.0)
    factor = {"cosine": 0.5 * (1.0 + math.cos(math.pi * progress)), "linear": 1.0 - progress}.get(decay, 1.0)
    return peak * (min_ratio + (1.0 - min_ratio) * factor)


def depends_on_steps(optimizer: dict, step: int) -> bool:
    """Whether the rate at `step` or later would change with `train.steps` (a decay that has begun or will)."""
    return optimizer.get("schedule", "constant") != "constant" and step >= optimizer.get("warmup_steps", 0)


# ------------------------------------------------------------------------------------- decisions
@dataclass(frozen=True)
class StartDecision:
    """What a start does: `nothing_to_do` (the run is already at train.steps), and lines to print first."""

    nothing_to_do: bool
    notes: tuple[str, ...] = ()


def check_frozen(saved: dict, new: dict, run_dir: Path) -> None:
    """Refuse to resume a run directory that was trained with a different model, data or seed.

    `data.test_path` is left out: the test split never touches training, so a run may gain one later (see
    `_without_test_path` for the rest)."""
    saved, new = _without_test_path(saved), _without_test_path(new)
    for section in FROZEN_ON_RESUME:
        if saved.get(section) != new.get(section):
            diff = _first_difference(saved.get(section), new.get(section), section)
            raise ConfigError(
                f"{run_dir}: this run directory was trained with a different {section} config ({diff}); "
                f"resume with the same {section}, or start a new run with --set run_dir=<new dir>"
            )


def _without_test_path(raw: dict) -> dict:
    """`raw` without data.test_path and data.verify_shards (a check, not the data), and without the data keys
    added since older runs were saved (prepared_path, seq_len, ...) while they hold their defaults."""
    from trainer.config import DataConfig

    data = raw.get("data")
    if not isinstance(data, dict):
        return raw
    defaults = DataConfig().model_dump(mode="json")
    newer = ("prepared_path", "seq_len", "verify_shards", "tokenizer")
    return {**raw, "data": {k: v for k, v in data.items() if k not in ("test_path", "verify_shards")
                            and not (k in newer and v == defaults[k])}}


def _first_difference(a, b, path: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}")
    return f"{path}: {a!r} -> {b!r}"


def decide_start(saved: dict, new: dict, step: int | None, run_dir: Path) -> StartDecision:
    """Decide a start on `run_dir` (pure): `saved` and `new` are resolved configs as dicts, `step` the newest
    committed checkpoint (None: none yet). Raises ConfigError when the start must not happen."""
    check_frozen(saved, new, run_dir)
    total = new["train"]["steps"]
    if step is None or step == 0:
        return StartDecision(False)
    if step >= total:
        return StartDecision(True, (f"strata: already at step {step}, train.steps is {total}: nothing to do",))
    old_total = saved.get("train", {}).get("steps", total)
    if old_total == total:
        return StartDecision(False)
    opt, old_opt = new["optimizer"], saved.get("optimizer", new["optimizer"])
    before, after = lr_at(step, old_opt, old_total), lr_at(step, opt, total)
    change = f"train.steps changed from {old_total} to {total}"
    if not depends_on_steps(opt, step):
        why = ("the constant learning-rate schedule does not depend on it" if opt["schedule"] == "constant" else
               f"the {opt['schedule']} decay has not begun (step {step} is inside the {opt['warmup_steps']} "
               f"warm-up steps) and now runs to step {total}")
        was = f" (it was {before:.3g} under the saved config)" if not math.isclose(before, after) else ""
        return StartDecision(False, (f"strata: {change}: applied; {why}; the rate at step {step} is {after:.3g}{was}",))
    raise ConfigError(
        f"{run_dir}: {change}, but the {opt['schedule']} learning-rate schedule depends on it: resuming at "
        f"step {step} would move the rate from {before:.3g} to {after:.3g} "
        f"({'an unplanned warm restart' if after > before else 'a jump the schedule never planned'}); keep "
        f"--set train.steps={old_total}, go on at a rate you choose with --set optimizer.schedule=constant "
        f"--set optimizer.lr=RATE, or start a new run with --set run_dir=<new dir>")


def check_run_dir(cfg) -> StartDecision:
    """`decide_start` for `cfg` and the files of its run directory (a fresh directory: nothing to check)."""
    run_dir = cfg.resolved_run_dir()
    saved_file = run_dir / CONFIG_FILE
    if not saved_file.is_file():
        return StartDecision(False)
    try:
        saved = yaml.safe_load(saved_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{saved_file}: cannot read the run's saved config ({type(err).__name__}); "
                          "restore it, or start a new run with --set run_dir=<new dir>") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{saved_file}: not a Strata config; restore it, or start a new run with "
                          "--set run_dir=<new dir>")
    latest = latest_checkpoint(run_dir / CHECKPOINT_DIR)
    step = latest[0] if latest else None
    if step is not None and step >= cfg.train.steps:  # "nothing to do" only on a checkpoint that would load
        step = newest_intact_step(run_dir / CHECKPOINT_DIR)
    return decide_start(saved, cfg.model_dump(mode="json"), step, run_dir)


def newest_intact_step(directory: Path) -> int | None:
    """The newest committed checkpoint whose files all match its manifest (reads every byte), or None.

    Only the finished-run shortcut needs this: a damaged newest checkpoint must not make a run look done when
    restoring would fall back to an older one and train on."""
    for step in files.committed_steps(directory):
        if files.verify(directory, files.checkpoint_name(step)) is None:
            return step
    return None


def env_rank(environ=os.environ) -> int:
    """This process's rank as its launcher set it (strata launch, horovodrun, mpirun, srun), 0 if none did:
    known before any backend starts, so that only rank 0 prints the start-up decisions."""
    return contract.env_int(environ, contract.LAUNCHER_RANK_VARS, 0)
