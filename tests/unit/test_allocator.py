"""trainer/allocator.py: a ZeRO-3 run asks TensorFlow's oneDNN CPU allocator for the system allocator."""
from pathlib import Path

from trainer.allocator import ENV_SYSTEM_ALLOCATOR, choose_allocator
from trainer.config import load_config

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "lm_1b.yaml"


def test_zero3_uses_the_system_allocator_unless_the_user_said_otherwise():
    zero3 = load_config(CONFIG, ["distribution.zero=3"])
    environ: dict[str, str] = {}
    assert choose_allocator(zero3, environ) and environ == {ENV_SYSTEM_ALLOCATOR: "1"}
    mine = {ENV_SYSTEM_ALLOCATOR: "0"}
    assert not choose_allocator(zero3, mine) and mine == {ENV_SYSTEM_ALLOCATOR: "0"}


def test_other_runs_keep_tensorflows_default():
    for zero in (0, 1, 2):
        environ: dict[str, str] = {}
        assert not choose_allocator(load_config(CONFIG, [f"distribution.zero={zero}"]), environ) and environ == {}
