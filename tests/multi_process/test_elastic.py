"""Elastic Horovod (issue 6): 2 workers on two "hosts" (`localhost` and `127.0.0.1`, both this machine, which
Horovod starts without ssh), one killed mid-epoch: the survivor goes on from the last commit, alone, redoing
at most the commit interval; when the host is listed again, a new worker joins and the job finishes with 2
workers holding identical weights, at the step `--stop-after` fixed at the first start (issue 10: every restart
used to count it again from its commit). Real `strata launch --elastic` -> horovodrun -> training processes."""
from __future__ import annotations

import os
import re
import stat
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import CONFIGS, STRATA, TINY_CLASSIFIER, child_env, strata

pytestmark = pytest.mark.multi_process
CONFIG = str(CONFIGS / "classifier.yaml")
COMMIT_EVERY = 10
KILL_AT = 25  # rank 1 SIGKILLs itself after this step; the test then removes its host from the list
STEP_LINE = re.compile(r"^\[rank 0\] step (\d+)/")
TOTAL, STOP_AFTER = 1600, 1500  # the job must stop at step 1500, whatever its restarts
ELASTIC_LINE = re.compile(r"elastic: rank (\d+) of (\d+) worker\(s\) on (\S+), continuing from committed step (\d+)")
HOSTS = ("localhost", "127.0.0.1")


def _list_hosts(hosts: Path, text: str) -> None:
    """Replace the host list atomically: horovodrun runs the discovery script every second and must never read
    a half-written file (an empty read is "every host gone")."""
    tmp = hosts.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, hosts)


def _kill_leftovers(tmp_path: Path) -> None:
    """SIGKILL every process whose command line names this test's directory (horovodrun, workers)."""
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            if str(tmp_path) in (pid_dir / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(pid_dir.name), 9)
        except (OSError, ValueError):
            pass


def _discovery(tmp_path: Path) -> tuple[Path, Path]:
    hosts = tmp_path / "hosts"
    _list_hosts(hosts, "".join(f"{h}:1\n" for h in HOSTS))
    script = tmp_path / "discover.sh"
    script.write_text(f"#!/bin/sh\ncat {hosts}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return hosts, script


# The run's own settings, shared by the elastic job and the uninterrupted run its weights are compared with.
# Big enough layers that 1 worker takes a few ms a step: the run must outlast a new worker's start-up.
SETTINGS = [*TINY_CLASSIFIER, "--set", f"train.steps={TOTAL}", "--set", "train.log_every=5",
            "--set", "eval.every=100000", "--set", "checkpoint.every=100000", "--set", "optimizer.warmup_steps=0",
            "--set", f"train.elastic_commit_every={COMMIT_EVERY}", "--set", "model.embed_dim=128",
            "--set", "model.hidden_dim=512", "--set", "model.dropout=0.0",
            # a learning rate at which float-order noise stays small (measured 1.1e-4 of weights and slots, 1 vs 2
            # processes, 1500 steps): at 10x it grows chaotic (0.24 on one moment, 2e-3 on weights)
            "--set", "optimizer.lr=0.0001"]


# zero 2 and 3 (issue 13): a lost rank takes its slices of the optimizer state (and, under zero 3, of the
# parameters) with it; the survivor re-shards the committed state for 1 rank, then for 2 when a worker joins.
@pytest.mark.parametrize("zero", [0, 2, 3])
def test_worker_lost_then_rejoins(tmp_path: Path, zero: int):
    hosts, script = _discovery(tmp_path)
    run_dir = tmp_path / "run"
    argv = [STRATA, "launch", "-np", "2", "--elastic", "--min-np", "1", "--max-np", "2",
            "--host-discovery-script", str(script), "--blacklist-cooldown-range", "1", "2", CONFIG,
            "--stop-after", str(STOP_AFTER), *SETTINGS, "--set", f"run_dir={run_dir}",
            "--set", f"distribution.zero={zero}"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=child_env(STRATA_FAULT=f"1:{KILL_AT}:kill"), start_new_session=True)
    # Never hang the suite: SIGTERM makes `strata launch` stop horovodrun (its own session) and the workers;
    # anything of this run still alive afterwards (found by its temporary path) is killed in `finally`.
    timer = threading.Timer(400, proc.terminate)
    timer.start()
    started = time.monotonic()
    lines: list[tuple[float, str]] = []
    events: dict[str, float] = {}
    lost = None
    host_of: dict[int, str] = {}  # Horovod, not the launcher, decides which host gets which rank
    last_step_before_loss = 0
    resumed_at = None
    steps_alone = 0
    last_seen = 0
    try:
        for line in proc.stdout:
            now = time.monotonic()
            lines.append((now, line.rstrip()))
            step = STEP_LINE.match(line)
            if step:
                events["last_step"] = now
                events.setdefault("first_step", now)
            elastic = ELASTIC_LINE.search(line)
            if elastic and elastic.group(2) == "2" and "killed" not in events:
                host_of[int(elastic.group(1))] = elastic.group(3)
            if "injected fault: rank 1 kill" in line and "killed" not in events:
                events["killed"] = now
                lost = host_of[1]
                _list_hosts(hosts, "".join(f"{h}:1\n" for h in HOSTS if h != lost))  # rank 1's host is gone
            elif step and "killed" not in events:
                last_step_before_loss = int(step.group(1))
            elif elastic and elastic.group(2) == "1" and "alone" not in events:
                events["alone"], resumed_at = now, int(elastic.group(4))
                assert elastic.group(3) != lost, line
            elif step and "alone" in events and "rejoined" not in events:
                steps_alone += 1
                if steps_alone == 3:  # the survivor trains on alone; now the host comes back
                    events["host_back"] = now
                    _list_hosts(hosts, "".join(f"{h}:1\n" for h in HOSTS))
            elif elastic and elastic.group(2) == "2" and "host_back" in events and "rejoined" not in events:
                events["rejoined"] = now
                events["steps_at_rejoin"] = last_seen
            if step:
                last_seen = int(step.group(1))
        code = proc.wait(timeout=60)
    finally:
        timer.cancel()
        _kill_leftovers(tmp_path)
    out = "\n".join(line for _, line in lines)
    assert code == 0, out[-4000:]
    assert {"killed", "alone", "host_back", "rejoined"} <= events.keys(), (events, out[-4000:])
    assert resumed_at is not None and resumed_at % COMMIT_EVERY == 0
    redone = KILL_AT - resumed_at
    assert 0 <= redone <= COMMIT_EVERY, (KILL_AT, resumed_at)
    assert last_step_before_loss <= KILL_AT + 1
    assert "strata: weights identical on all 2 ranks" in out
    if zero:  # the sharded state was re-cut for the survivor alone, then for the 2 workers after the rejoin
        restarts = [line for _, line in lines if ELASTIC_LINE.search(line)]
        for workers in (1, 2):
            assert any(f"of {workers} worker(s)" in line and
                       line.endswith(f"ZeRO {zero} state in slices for {workers} rank(s)") for line in restarts), restarts
    # Two restarts (from commit 20, then at the rejoin) and still the target of the first start: the old
    # code stopped at 20 + 1500, then at the rejoin's commit + 1500 (capped at train.steps = 1600).
    logged = [int(m.group(1)) for m in map(STEP_LINE.match, (line for _, line in lines)) if m]
    assert max(logged) == STOP_AFTER, (max(logged), out[-2000:])
    assert f"strata: step {STOP_AFTER}/{TOTAL}" in out, out[-2000:]
    # The global batch never changes and the lost steps are redone from the commit, so the job's weights are
    # those of one uninterrupted process (up to the order of float sums): checked on its final checkpoint.
    worst = _compare_with_uninterrupted(tmp_path, run_dir)
    print(f"elastic: zero {zero}: final weights and slots vs the uninterrupted run: max relative difference {worst:.2e}")
    print(f"elastic: rank 1 (on {lost}) killed after step {KILL_AT}; survivor continued from committed step {resumed_at} "
          f"({redone} steps redone, commit every {COMMIT_EVERY}) {events['alone'] - events['killed']:.1f}s after "
          f"the kill; host listed again -> 2 workers training {events['rejoined'] - events['host_back']:.1f}s later")
    print({k: round(v - started, 1) for k, v in events.items() if k != "steps_at_rejoin"},
          "step at rejoin", events["steps_at_rejoin"])


STATE_RTOL = 1e-3  # measured (zero 0, 2, 3): see the printed figure; a re-shard that loses state is far above


def _compare_with_uninterrupted(tmp_path: Path, run_dir: Path) -> float:
    """Train the same config in one process without interruption to the same step; return the largest
    difference of any weight or optimizer slot (Adam's moments: under ZeRO, what the re-shards carried) in the
    elastic job's final checkpoint, relative to that tensor's largest value."""
    reference = tmp_path / "reference"
    done = strata("train", CONFIG, "--stop-after", str(STOP_AFTER), *SETTINGS, "--set", f"run_dir={reference}",
                  timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got, want = (tf.train.load_checkpoint(tf.train.latest_checkpoint(str(d / "checkpoints"))) for d in (run_dir, reference))
    keys = sorted(want.get_variable_to_shape_map())
    assert sorted(got.get_variable_to_shape_map()) == keys  # the replicated format whatever the layout
    keys = [k for k in keys if k.startswith("optimizer/")]  # weights (`_trainable_variables`), slots, iterations
    assert len(keys) > 10, keys
    worst = 0.0
    for key in keys:
        a, b = got.get_tensor(key), want.get_tensor(key)
        worst = max(worst, float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12)))
    assert worst <= STATE_RTOL, worst
    return worst


def test_elastic_launch_is_checked_before_start(tmp_path: Path):
    _, script = _discovery(tmp_path)
    base = ["launch", "-np", "2", "--elastic", CONFIG, "--set", f"run_dir={tmp_path / 'run'}"]
    cases = [
        (["--host-discovery-script", str(script), "--min-np", "3", "--max-np", "4"], "--min-np (3) <= -np (2)"),
        (["--host-discovery-script", str(tmp_path / "missing.sh")], "not found"),
        (["--host-discovery-script", str(script), "--max-np", "3"], "data.batch_size (64) must be divisible by -np (3)"),
        (["--host-discovery-script", str(script), "--mpi"], "runs Horovod on Gloo"),
    ]
    script_not_exec = tmp_path / "plain.sh"
    script_not_exec.write_text("#!/bin/sh\necho localhost:2\n")
    cases.append((["--host-discovery-script", str(script_not_exec)], "is not executable"))
    for extra, fragment in cases:
        done = strata(*base, *extra, timeout=120)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1 and fragment in lines[0], (extra, done.stderr)
    done = strata("launch", "-np", "2", "--min-np", "1", CONFIG, timeout=60)
    assert done.returncode == 2 and "--min-np needs --elastic" in done.stderr
    assert not (tmp_path / "run").exists()
