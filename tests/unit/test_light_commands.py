"""Commands that must answer without TensorFlow: a wrong run directory is reported before TensorFlow (seconds
to import) loads. TensorFlow is made unimportable in a fresh interpreter, so an import would be an error."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import child_env

_WITHOUT_TF = """
import sys
sys.modules["tensorflow"] = None  # any `import tensorflow` now raises ImportError
from trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", [["evaluate"], ["classify"], ["summarize"], ["generate"], ["export"]])
def test_a_missing_run_dir_is_reported_before_tensorflow_loads(tmp_path, command):
    texts = ["some text"] if command[0] in ("classify", "summarize", "generate") else []
    argv = [*command, str(tmp_path / "nonexistent"), *texts]
    done = subprocess.run([sys.executable, "-c", _WITHOUT_TF, *argv], capture_output=True, text=True, timeout=60,
                          env=child_env())
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"strata: error: {tmp_path / 'nonexistent'}: not a Strata run directory "
                                   "(no config.yaml); pass the directory `strata train` created"), done.stderr
