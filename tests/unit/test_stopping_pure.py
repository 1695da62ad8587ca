"""Pure parts of stopping and resuming: the resume decisions (trainer/resume.py), the stop votes and messages
(trainer/preemption.py) and the launcher's side of the contract (launch/stopping.py)."""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from launch import contract, stopping
from trainer import preemption, resume
from trainer.config import load_config
from trainer.errors import ConfigError

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "classifier.yaml"


def _config(*overrides: str) -> dict:
    return load_config(CONFIG, list(overrides)).model_dump(mode="json")


# ------------------------------------------------------------------------------- resume decisions
def test_a_fresh_or_unchanged_run_just_starts_or_resumes(tmp_path):
    saved = _config()
    assert resume.decide_start(saved, _config(), None, tmp_path) == resume.StartDecision(False)
    assert resume.decide_start(saved, _config(), 120, tmp_path) == resume.StartDecision(False)


@pytest.mark.parametrize("new_steps", [400, 300])
def test_a_run_at_or_past_train_steps_has_nothing_to_do(tmp_path, new_steps):
    decision = resume.decide_start(_config(), _config(f"train.steps={new_steps}"), 400, tmp_path)
    assert decision == resume.StartDecision(True, (f"strata: already at step 400, train.steps is {new_steps}: "
                                                   "nothing to do",))


def test_more_steps_on_a_decaying_schedule_are_refused_with_the_rates_and_the_fixes(tmp_path):
    with pytest.raises(ConfigError) as err:
        resume.decide_start(_config("train.steps=100"), _config("train.steps=200"), 100, tmp_path)
    message = str(err.value)
    assert "train.steps changed from 100 to 200, but the cosine learning-rate schedule depends on it" in message
    assert "from 0 to 0.00" in message and "an unplanned warm restart" in message
    assert "--set train.steps=100" in message and "optimizer.schedule=constant" in message and "run_dir=" in message
    with pytest.raises(ConfigError, match="a jump the schedule never planned"):  # fewer steps: the rate drops
        resume.decide_start(_config(), _config("train.steps=200"), 100, tmp_path)


def test_a_changed_train_steps_is_applied_where_the_rate_does_not_depend_on_it(tmp_path):
    constant = ("optimizer.schedule=constant",)
    decision = resume.decide_start(_config(*constant), _config(*constant, "train.steps=800"), 100, tmp_path)
    assert not decision.nothing_to_do
    assert decision.notes == ("strata: train.steps changed from 400 to 800: applied; the constant learning-rate "
                          "schedule does not depend on it; the rate at step 100 is 0.005",)
    (note,) = resume.decide_start(_config(), _config("train.steps=800"), 10, tmp_path).notes  # inside warm-up
    assert "applied; the cosine decay has not begun (step 10 is inside the 20 warm-up steps)" in note


def test_a_different_model_is_still_refused_first(tmp_path):
    with pytest.raises(ConfigError, match=r"model.hidden_dim: 32 -> 48"):
        resume.decide_start(_config(), _config("model.hidden_dim=48", "train.steps=100"), 400, tmp_path)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_the_plain_python_rate_is_the_schedule_training_uses(schedule):
    from trainer.optim import WarmupSchedule

    opt = _config(f"optimizer.schedule={schedule}", "optimizer.min_lr_ratio=0.1")["optimizer"]
    tf_schedule = WarmupSchedule(opt["lr"], warmup_steps=opt["warmup_steps"], total_steps=400, decay=schedule,
                                 min_ratio=0.1)
    for step in (0, 5, 19, 20, 21, 150, 399, 400, 500):
        assert resume.lr_at(step, opt, 400) == pytest.approx(float(tf_schedule(step)), rel=1e-5)


def test_the_latest_checkpoint_and_the_start_message_come_from_the_manifests(tmp_path):
    assert resume.latest_checkpoint(tmp_path) is None
    assert resume.start_message(tmp_path, 0) == "strata: starting at step 0"
    for step in (90, 120):
        (tmp_path / f"ckpt-{step}.manifest.json").write_text("{}")
    (tmp_path / "ckpt-150.index").write_text("")  # a save that never committed: not a checkpoint
    saved = time.mktime((2026, 3, 4, 5, 6, 7, 0, 0, -1))
    os.utime(tmp_path / "ckpt-120.manifest.json", (saved, saved))
    assert resume.latest_checkpoint(tmp_path) == (120, saved)
    assert resume.start_message(tmp_path, 120) == \
        "strata: resuming from step 120 (checkpoint ckpt-120, saved 2026-03-04 05:06:07)"


def test_the_rank_is_known_before_any_backend_starts():
    assert resume.env_rank({}) == 0
    assert resume.env_rank({"HOROVOD_RANK": "3"}) == 3 and resume.env_rank({"OMPI_COMM_WORLD_RANK": "1"}) == 1


# ---------------------------------------------------------------------------------- stop votes
def test_votes_pick_the_stop_signal_ctrl_c_first():
    assert preemption.stop_signal([0.0, 0.0, 0.0]) is None
    assert preemption.stop_signal([0.0, 2.0, 4.0]) == signal.SIGTERM  # summed over ranks
    assert preemption.stop_signal([1.0, 1.0, 0.0]) == signal.SIGINT


def test_what_the_user_is_told():
    assert preemption.notice(signal.SIGINT, phase="training", multi=False, rank=0) == \
        "strata: Ctrl-C: stopping after this step and saving a checkpoint; Ctrl-C again to stop at once, without it"
    assert preemption.notice(signal.SIGTERM, phase="training", multi=True, rank=1) == \
        "strata: rank 1 got SIGTERM: stopping after the same step on every rank and saving a checkpoint"
    assert preemption.lost_message(212, 200) == ("strata: second Ctrl-C: stopping now without a checkpoint; steps "
                                                 "after 200 (the last checkpoint) will be redone")
    assert preemption.lost_message(200, 200).endswith("step 200 is checkpointed, nothing is lost")
    assert preemption.lost_message(None, 200).endswith("no step has run yet, nothing is lost")
    assert preemption.lost_message(7, None).endswith("there is none yet, so the next start begins at step 0")


@pytest.mark.parametrize("signum", contract.STOP_SIGNALS)
def test_the_launcher_reads_the_chiefs_stop_line(signum):
    line = preemption.stop_line(210, signum)
    assert contract.parse_stop_line(f"[1,0]<stdout>:{line}\n") == (210, contract.STOP_LABELS[signum])
    assert contract.stop_exit_code(contract.STOP_LABELS[signum]) == preemption.STOP_EXIT_CODES[signum]
    assert contract.STOPPED_EXIT_CODES == tuple(sorted(set(preemption.STOP_EXIT_CODES.values())))


# ------------------------------------------------------------------------------- launcher side
def test_the_launcher_finds_the_ranks_under_horovodrun_or_mpirun():
    table = {
        10: (1, ["horovodrun", "-np", "2"]),
        11: (10, ["python", "-c", "from multiprocessing.spawn import spawn_main"]),  # Gloo's middleman
        12: (11, ["/bin/sh", "-c", "HOROVOD_RANK=0 python -m trainer train c.yaml"]),
        13: (12, ["/venv/bin/python", "-m", "trainer", "train", "c.yaml"]),
        14: (10, ["mpirun", "-np", "2"]),
        15: (14, ["python", "-m", "trainer", "train", "c.yaml"]),
        16: (1, ["python", "-m", "trainer", "train", "other.yaml"]),  # another job's rank: not ours
    }
    assert stopping.trainer_descendants(table, 10) == [13, 15]


def test_the_committed_step_and_the_lost_line(tmp_path):
    assert stopping.committed_step(tmp_path) is None and stopping.committed_step(None) is None
    (tmp_path / "checkpoints").mkdir()
    for name in ("ckpt-5.manifest.json", "ckpt-40.manifest.json", "ckpt-50.index", "checkpoint"):
        (tmp_path / "checkpoints" / name).write_text("")
    assert stopping.committed_step(tmp_path) == 40
    assert stopping.lost("second Ctrl-C: stopping now", 40) == ("strata: second Ctrl-C: stopping now without a "
                                                                 "checkpoint; steps after 40 (the last checkpoint) "
                                                                 "will be redone")
    assert re.match(r"strata: Ctrl-C: .* \(waiting up to 60 s, --grace\); Ctrl-C again",
                    stopping.notice(signal.SIGINT, stopping.DEFAULT_GRACE_S))
