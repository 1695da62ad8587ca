"""`strata tensorboard RUN_DIR`: TensorBoard on a run's event files, bound to 127.0.0.1 by default.

TensorBoard names a run after its folder relative to --logdir: given the run's tensorboard/ folder itself it
shows one run called ".", and `--logdir_spec NAME:PATH` shows "NAME/.". So TensorBoard is pointed at a
small folder of its own that holds one link, named after the run, to the run's event folder: the run shows
under its own name. The folder is per user and per run directory (reused by the next call, nothing piles up).
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path


def event_dir(run_dir: str) -> Path:
    """The folder holding the run's event files: RUN_DIR/tensorboard if it exists, else RUN_DIR."""
    logdir = Path(run_dir) / "tensorboard"
    return logdir if logdir.is_dir() else Path(run_dir)


def view_dir(run_dir: str, root: Path) -> tuple[Path, str]:
    """(the folder TensorBoard serves, the run's name in it) for `run_dir` (pure): one folder per run
    directory under `root`, keyed by the run directory's absolute path; the name is its last component."""
    path = Path(os.path.abspath(run_dir))
    key = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return root / key, path.name or "run"


def tensorboard_argv(run_dir: str, *, host: str, port: int, root: Path) -> list[str]:
    """The TensorBoard command line (pure): --logdir is the run's view folder (see `view_dir`)."""
    view, _ = view_dir(run_dir, root)
    return [sys.executable, "-m", "tensorboard.main", "--logdir", str(view), "--host", host, "--port", str(port)]


def default_root() -> Path:
    return Path(tempfile.gettempdir()) / f"strata-tensorboard-{os.getuid()}"


def link_run(run_dir: str, root: Path) -> Path:
    """Create (or repoint) the view folder's link to the run's events; return the link."""
    root.mkdir(mode=0o700, exist_ok=True)
    if root.stat().st_uid != os.getuid() or root.is_symlink():  # a shared /tmp: never serve another user's links
        raise PermissionError(f"{root} is not this user's own folder")
    view, name = view_dir(run_dir, root)
    view.mkdir(exist_ok=True)
    link, tmp = view / name, view / f".{name}.new"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(event_dir(run_dir).resolve(), target_is_directory=True)
    os.replace(tmp, link)  # atomic: a TensorBoard already serving this view never sees the link missing
    return link


def serve(run_dir: str, *, host: str = "127.0.0.1", port: int = 6006) -> int:
    if not Path(run_dir).is_dir():
        print(f"strata: error: {run_dir}: no such run directory; pass the run_dir of a `strata train` run",
              file=sys.stderr)
        return 2
    root = default_root()
    try:
        link = link_run(run_dir, root)
    except OSError as err:
        print(f"strata: error: cannot prepare TensorBoard's folder {root}: {err}; set TMPDIR to a folder of "
              "your own", file=sys.stderr)
        return 2
    argv = tensorboard_argv(run_dir, host=host, port=port, root=root)
    print(f"strata: TensorBoard at http://{host}:{port}/ (run {link.name!r}; Ctrl-C to stop)", flush=True)
    # Through the worker's output filter (trainer/output.py): TensorBoard imports TensorFlow, whose log lines
    # would be the first thing the user reads.
    os.execv(argv[0], [argv[0], "-m", "trainer.output", *argv[1:]])
    return 0
