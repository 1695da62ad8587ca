"""`pip install .` works for users who bring their own environment: the wheel holds both packages, the
`strata` entry point and the configs-free code; the launcher never imports the trainer."""
from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import REPO


def test_wheel_contains_trainer_launch_and_the_strata_command(tmp_path: Path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next(tmp_path.glob("strata-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "trainer/cli.py" in names and "launch/cli.py" in names and "trainer/strategy/horovod.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "strata = launch.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert not any(n.startswith("tests/") for n in names)


def test_launch_never_imports_trainer():
    for path in (REPO / "launch").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for module in modules:
                assert not module.startswith(("trainer", "tensorflow", "horovod", "keras")), f"{path.name} imports {module}"


def test_only_the_strategy_layer_imports_horovod_or_tf_distribute():
    for path in (REPO / "trainer").rglob("*.py"):
        if "strategy" in path.parts:
            continue
        text = path.read_text()
        assert "import horovod" not in text and "tf.distribute" not in text, path
