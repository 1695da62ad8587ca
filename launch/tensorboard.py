"""`strata tensorboard RUN_DIR`: TensorBoard on a run's event files, bound to 127.0.0.1 by default."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def tensorboard_argv(run_dir: str, *, host: str, port: int) -> list[str]:
    """The TensorBoard command line (pure): logdir is the run's tensorboard/ folder if it has one."""
    logdir = Path(run_dir) / "tensorboard"
    if not logdir.is_dir():
        logdir = Path(run_dir)
    return [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", host, "--port", str(port)]


def serve(run_dir: str, *, host: str = "127.0.0.1", port: int = 6006) -> int:
    if not Path(run_dir).is_dir():
        print(f"strata: error: {run_dir}: no such run directory; pass the run_dir of a `strata train` run",
              file=sys.stderr)
        return 2
    argv = tensorboard_argv(run_dir, host=host, port=port)
    print(f"strata: TensorBoard at http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    # Through the worker's output filter (trainer/output.py): TensorBoard imports TensorFlow, whose log lines
    # would be the first thing the user reads.
    os.execv(argv[0], [argv[0], "-m", "trainer.output", *argv[1:]])
    return 0
