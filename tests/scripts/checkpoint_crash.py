"""Kill a process with SIGKILL at random moments while it saves checkpoints; check every restore.

    python tests/scripts/checkpoint_crash.py kill --dir D --kills 20 --seed 6   # prints one JSON summary line
    python tests/scripts/checkpoint_crash.py restore --dir D                    # restores D, prints JSON

`kill` imports TensorFlow once, then for each trial forks a *saver* (builds Strata's classifier and Adam,
restores D, then saves checkpoints of steps n+1, n+2, ... into D as fast as it can, logging `saving N` before
and `saved N` after each save) and SIGKILLs it after a random delay. It then forks a *restorer*, a process
that never saw the saver's memory, which builds the model afresh, restores D and checks that
  - the restored step is the last step whose save returned, or the step being saved when the kill came
    (its manifest may have been committed just before the kill, before `saved N` was written), and
  - every variable holds that step's values (each save sets every variable to its step number), so a
    checkpoint mixing files of two saves would be caught.
Forking after `import tensorflow` but before any op runs is safe (no TensorFlow threads exist yet) and saves
a 4 s import per process. The trials share D, so later savers start from what a crash left behind.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402  (imported before forking: the expensive part, done once)

from trainer.checkpoint import Checkpointer, random_state  # noqa: E402
from trainer.config import ClassifierModel, OptimizerConfig  # noqa: E402
from trainer.tasks import build_model  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402

VOCAB, MAX_LEN = 8_000, 16  # ~0.5 M weights, ~6 MB a checkpoint with Adam's slots: saves take a while


def build(directory: Path, *, write: bool) -> tuple[Checkpointer, list]:
    """Strata's classifier, Adam and Checkpointer, as a run builds them."""
    model = build_model(ClassifierModel(embed_dim=64, hidden_dim=64), vocab_size=VOCAB, max_len=MAX_LEN,
                        summary_len=4)
    model({"tokens": tf.zeros([2, MAX_LEN], tf.int32)})
    optimizer = build_optimizer(OptimizerConfig(), total_steps=10**6, num_replicas=1, mixed_precision="off")
    optimizer.build(model.trainable_variables)
    checkpointer = Checkpointer(directory, keep=2, write=write, model=model, optimizer=optimizer,
                                rng=random_state(model))
    return checkpointer, [*model.variables, *optimizer.variables]


def stamp(variables: list, step: int) -> None:
    """Set every variable to `step`: the saved values then say which save they came from."""
    for v in variables:
        v.assign(np.full(v.shape, step, dtype=tf.as_dtype(v.dtype).as_numpy_dtype))


def wrong_values(variables: list, step: int) -> list[str]:
    return [v.path if hasattr(v, "path") else v.name for v in variables if not np.all(np.asarray(v.numpy()) == step)]


def saver(directory: Path, log_path: Path) -> None:
    """Save forever (until killed), logging around each save with unbuffered writes."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    checkpointer, variables = build(directory, write=True)
    step = checkpointer.restore_latest()
    while True:
        step += 1
        stamp(variables, step)
        os.write(log, f"saving {step}\n".encode())
        checkpointer.save(step)
        os.write(log, f"saved {step}\n".encode())


def restore(directory: Path) -> dict:
    """Restore `directory` into a freshly built model; report the step, fallbacks and any wrong values."""
    checkpointer, variables = build(directory, write=False)
    step = checkpointer.restore_latest()
    return {"step": step, "skipped": [list(s) for s in checkpointer.skipped],
            "wrong": wrong_values(variables, step)[:3]}


def in_child(target, *args) -> int:
    """Run `target(*args)` in a forked child; return its pid (the child never returns here)."""
    pid = os.fork()
    if pid == 0:
        try:
            target(*args)
            code = 0
        except BaseException as err:  # report, then leave without running the parent's cleanup
            print(f"child failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            code = 1
        os._exit(code)
    return pid


def wait_for_line(log_path: Path, needle: str, pid: int, timeout: float) -> bool:
    """Whether `needle` appears in the log before `timeout` s, while process `pid` is still alive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_path.exists() and needle in log_path.read_text():
            return True
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return False  # the saver died on its own (and is reaped)
        time.sleep(0.01)
    return False


def restorer(directory: Path, out: Path) -> None:
    out.write_text(json.dumps(restore(directory)))


def trial(directory: Path, log_path: Path, delay: float) -> dict:
    """One kill: start a saver, let it reach its loop, SIGKILL it `delay` s later, then restore afresh."""
    log_path.unlink(missing_ok=True)
    pid = in_child(saver, directory, log_path)
    if not wait_for_line(log_path, "saved ", pid, timeout=120):
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        raise RuntimeError(f"the saver never completed a save; log: {log_path.read_text() if log_path.exists() else ''}")
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    lines = log_path.read_text().split()
    saved = [int(n) for word, n in zip(lines[::2], lines[1::2]) if word == "saved"]
    saving = [int(n) for word, n in zip(lines[::2], lines[1::2]) if word == "saving"]
    in_progress = saving[-1] if saving and saving[-1] != saved[-1] else None
    out = directory.parent / "restored.json"
    out.unlink(missing_ok=True)
    rpid = in_child(restorer, directory, out)
    _, rstatus = os.waitpid(rpid, 0)
    result = json.loads(out.read_text()) if out.exists() else {"step": None, "skipped": [], "wrong": ["(failed)"]}
    ok = rstatus == 0 and not result["wrong"] and result["step"] in (saved[-1], in_progress)
    return {"delay": round(delay, 3), "last_saved": saved[-1], "in_progress": in_progress,
            "restored": result["step"], "skipped": result["skipped"], "wrong": result["wrong"], "ok": ok}


def kill_many(directory: Path, kills: int, seed: int, max_delay: float) -> dict:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory.parent / "saver.log"
    trials = []
    for i in range(kills):
        t = trial(directory, log_path, rng.uniform(0.0, max_delay))
        trials.append(t)
        print(f"kill {i + 1}: after {t['delay']} s, last saved {t['last_saved']}, in progress {t['in_progress']}, "
              f"restored {t['restored']}{' OK' if t['ok'] else ' FAILED'}", flush=True)
    return {
        "kills": kills, "seed": seed, "delays": [t["delay"] for t in trials],
        "restores": len(trials), "failed_restores": sum(not t["ok"] for t in trials),
        "killed_mid_save": sum(t["in_progress"] is not None for t in trials),
        "restored_in_progress_step": sum(t["in_progress"] is not None and t["restored"] == t["in_progress"]
                                         for t in trials),
        "fallbacks": sum(len(t["skipped"]) for t in trials),
        "last_saved": trials[-1]["last_saved"], "last_in_progress": trials[-1]["in_progress"],
        "last_restored": trials[-1]["restored"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["kill", "restore"])
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=6)
    p.add_argument("--max-delay", type=float, default=0.4, help="seconds; kills land uniformly in [0, this)")
    args = p.parse_args()
    if args.mode == "kill":
        summary = kill_many(args.dir, args.kills, args.seed, args.max_delay)
    else:
        summary = restore(args.dir)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
