"""Fault tolerance with real ranks (horovodrun and TF_CONFIG workers under `strata launch`): a rank killed
with SIGKILL stops the job within 10 s and the relaunch finishes exactly; a hung rank is found by the
watchdog and the job aborts within its timeout plus a few seconds; SIGTERM to one rank (rank 1 under Horovod,
rank 0 under MultiWorkerMirrored) stops every rank at the same checkpointed step (agreed in the step after the signal) and the relaunch redoes
nothing and ends with the weights of an uninterrupted run. Each test prints what it measured."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator

from tests.conftest import CONFIGS, STRATA, TINY_CLASSIFIER, child_env, run_cmd

pytestmark = pytest.mark.multi_process
CONFIG = str(CONFIGS / "classifier.yaml")
BACKENDS = ["horovod", "multi_worker"]
COMMON = [*TINY_CLASSIFIER, "--set", "train.log_every=1", "--set", "eval.every=1000", "--set", "checkpoint.every=5",
          "--set", "optimizer.warmup_steps=0"]
DETECT_LIMIT_S = 10.0  # the bound: a dead rank stops the whole job within this


def launch_argv(backend: str, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [STRATA, "launch", "-np", "2", "--backend", backend, "--grace", "3", CONFIG, *COMMON,
            "--set", f"run_dir={run_dir}", "--set", f"train.steps={steps}", *extra]


def stream(argv: list[str], *, timeout: float, on_line=None, **env: str) -> tuple[int, str, dict[str, float]]:
    """Run `argv`, reading its merged output as it comes; `on_line(line, proc)` sees each line. Returns (exit
    code, output, times): times["<text>"] = monotonic time a line containing a watched text appeared,
    times["end"] = when the process ended."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(**env))
    lines, times = [], {}
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if "injected fault" in line and "fault" not in times:
                times["fault"] = time.monotonic()
            if on_line:
                on_line(line, proc, times)
            if time.monotonic() > deadline:
                raise TimeoutError("".join(lines[-50:]))
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        times["end"] = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(lines), times


def step_lines(out: str, total: int) -> list[int]:
    return [int(s) for s in re.findall(rf"step (\d+)/{total} loss", out)]


def saved_step(run_dir: Path) -> int:
    return int(tf.train.load_checkpoint(str(run_dir / "checkpoints")).get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))


def tb_steps(run_dir: Path, *, purge: bool) -> list[int]:
    """train/loss steps as TensorBoard's UI shows them (purge=True: its plugin reader, which drops the steps
    a crashed session logged after its last checkpoint), or every step written (purge=False)."""
    module = plugin_event_accumulator if purge else event_accumulator
    acc = module.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0},
                                  purge_orphaned_data=purge)
    acc.Reload()
    return [e.step for e in acc.Tensors("train/loss")]


def relaunch_finishes_exactly(backend: str, run_dir: Path, steps: int, resume_from: int, *, purge: bool) -> None:
    done = run_cmd(launch_argv(backend, run_dir, steps), timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert step_lines(done.stdout, steps)[0] == resume_from + 1, done.stdout[-2000:]
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == steps
    assert tb_steps(run_dir, purge=purge) == list(range(1, steps + 1))
    assert "weights identical on all 2 ranks" in done.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_of_one_rank_stops_the_job_and_the_relaunch_finishes_exactly(tmp_path: Path, backend: str):
    run_dir, steps, kill_at = tmp_path / "run", 12, 7
    code, out, t = stream(launch_argv(backend, run_dir, steps), timeout=400, STRATA_FAULT=f"1:{kill_at}:kill")
    detection = t["end"] - t["fault"]
    assert code != 0, out[-3000:]
    assert re.search(r"strata: .*rank 1 on localhost (\(pid \d+\) )?was killed by SIGKILL \(signal 9\)", out), out[-3000:]
    assert detection <= DETECT_LIMIT_S, out[-3000:]
    assert saved_step(run_dir) == 5  # checkpoint.every=5: the last save before the kill
    redone = kill_at - saved_step(run_dir)
    relaunch_finishes_exactly(backend, run_dir, steps, resume_from=5, purge=True)
    print(f"\n{backend}: rank 1 SIGKILLed after step {kill_at} -> job ended {detection:.1f} s later "
          f"(limit {DETECT_LIMIT_S:.0f} s); relaunch resumed at step 6, {redone} step(s) redone, "
          f"final step {steps}/{steps}")


def test_sigkill_under_mpirun_names_the_rank(tmp_path: Path):
    """Horovod's MPI controller (`--mpi`): mpirun, not horovodrun, aborts the job and reports the rank."""
    run_dir, kill_at = tmp_path / "run", 7
    code, out, t = stream(launch_argv("horovod", run_dir, 12, "--mpi"), timeout=400, STRATA_FAULT=f"1:{kill_at}:kill")
    detection = t["end"] - t["fault"]
    assert code != 0, out[-3000:]
    assert re.search(r"strata: job failed: rank 1 on localhost was killed by SIGKILL \(signal 9\)", out), out[-3000:]
    assert detection <= DETECT_LIMIT_S, out[-3000:]
    print(f"\nhorovod --mpi: rank 1 SIGKILLed after step {kill_at} -> job ended {detection:.1f} s later")


@pytest.mark.parametrize("backend", BACKENDS)
def test_hung_rank_is_reported_with_its_phase_and_the_job_aborts(tmp_path: Path, backend: str):
    timeout_s = 10
    code, out, t = stream(launch_argv(backend, tmp_path / "run", 400, "--set", f"train.watchdog_timeout_s={timeout_s}"),
                          timeout=400, STRATA_FAULT="1:5:hang")
    after_hang = t["end"] - t["fault"]
    assert code == 124, out[-3000:]
    table = out[out.index("strata: watchdog:"):]
    assert re.search(r"^\s+1\s+\S+\s+\d+\s+5\s+between steps\s", table, re.M), table  # the stuck rank, where it is
    assert re.search(r"^\s+0\s+\S+\s+\d+\s+5\s+step\s", table, re.M), table  # its peer, waiting in step 6's all-reduce
    assert "furthest behind: rank 1 (step 5, between steps)" in table
    # Detection: the limit, plus up to 1 s between checks; then SIGTERM, SIGKILL after --grace (3 s), and a
    # few seconds for horovodrun or the launcher to see the ranks gone on a loaded 2-core machine.
    assert timeout_s <= after_hang <= timeout_s + 1 + 3 + 4, out[-3000:]
    print(f"\n{backend}: rank 1 hung after step 5; watchdog (timeout {timeout_s} s) reported it and the job "
          f"exited 124 {after_hang:.1f} s after the hang began")


def weights(run_dir: Path) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints"))
    return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map() if "_trainable_variables/" in n}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """60 steps in one process, never stopped (1 x 64 trains like 2 x 32: tests/multi_process/test_data_parallel.py)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = run_cmd([STRATA, "train", CONFIG, *COMMON, "--set", f"run_dir={run_dir}", "--set", "train.steps=60"],
                   timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


# The rank that gets SIGTERM: a non-chief rank under Horovod, the chief under MultiWorkerMirrored.
VICTIM = {"horovod": 1, "multi_worker": 0}


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_to_one_rank_stops_all_at_one_checkpointed_step(tmp_path: Path, backend: str, uninterrupted: Path):
    run_dir, steps = tmp_path / "run", 60
    victim = VICTIM[backend]
    sent: dict[str, int] = {}

    def signal_victim(line: str, proc: subprocess.Popen, times: dict[str, float]) -> None:
        if sent or not re.search(r"step 3/60 loss", line):
            return
        # The launcher's heartbeat directory (under TMPDIR) names every rank's pid.
        (beat_file,) = tmp_path.glob(f"strata-heartbeat-*/rank-{victim}.json")
        beat = json.loads(beat_file.read_text())
        os.kill(beat["pid"], signal.SIGTERM)
        sent.update(pid=beat["pid"], step=beat["step"])
        times["signal"] = time.monotonic()

    code, out, t = stream(launch_argv(backend, run_dir, steps), timeout=400, on_line=signal_victim,
                          TMPDIR=str(tmp_path))
    assert sent, out[-3000:]
    assert code == 75, out[-3000:]
    # The chief's line, then the launcher's own: the same step.
    stops = [int(s) for s in re.findall(r"strata: stopped at step (\d+) by SIGTERM \(checkpoint saved\)", out)]
    assert len(stops) == 2 and stops[0] == stops[1] and 3 <= stops[0] < steps, out[-3000:]
    stop = stops[0]
    assert "weights identical on all 2 ranks" in out  # both ranks stopped after the same step
    assert out.rstrip().splitlines()[-1].startswith(f"strata: stopped at step {stop} by SIGTERM")
    assert "job failed" not in out and "Process 1 exit" not in out
    assert saved_step(run_dir) == stop
    relaunch_finishes_exactly(backend, run_dir, steps, resume_from=stop, purge=False)  # not one step logged twice
    # Stopped, checkpointed and resumed, the run ends with the weights of one that never stopped.
    final, reference = weights(run_dir), weights(uninterrupted)
    assert final.keys() == reference.keys() and final
    for name in final:
        np.testing.assert_allclose(final[name], reference[name], rtol=1e-4, atol=1e-5, err_msg=name)
    print(f"\n{backend}: SIGTERM to rank {victim} (pid {sent['pid']}) -> all ranks stopped at step {stop}, "
          f"checkpointed, exit 75 {t['end'] - t['signal']:.1f} s after the signal; relaunch resumed at "
          f"step {stop + 1}, 0 steps redone, final step {steps}/{steps}")
