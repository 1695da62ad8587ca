"""What the user reads: TensorFlow's log lines filtered off a worker's stderr (trainer/output.py), rank lines
reassembled from horovodrun/mpirun output (launch/horovod_job.py), and the console's ETA (trainer/hooks.py).
The filter is also run for real: a process installs it, writes, and dies."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout

import pytest

from launch.horovod_job import rank_lines
from launch.tf_noise import NoiseLines, is_tf_noise as launcher_is_tf_noise
from tests.conftest import child_env
from trainer.output import LineFilter, could_be_tf_noise, is_tf_noise

# Lines TensorFlow 2.21 printed on an Intel AMX and an AMD EPYC machine (issue 10), and GPU-wheel noise.
NOISE = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    b"I0000 00:00:1796038999.654535    7292 port.cc:153] oneDNN custom operations are on. You may see slightly "
    b"different numerical results due to floating-point round-off errors from different computation orders. "
    b"To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.\n",
    b"E0000 00:00:1796039002.084757    7301 util.cc:131] oneDNN supports DT_BOOL only on platforms with AVX-512. "
    b"Falling back to the default Eigen-based implementation if present.\n",
    b"W1203 11:43:23.123456  140735 cuda_executor.cc:1040] could not open file to read NUMA node\n",
    b"E1203 11:43:23.000001    17 cuda_dnn.cc:8310] Unable to register cuDNN factory: Attempting to register "
    b"factory for plugin cuDNN when one has already been registered\n",
    b"E0000 00:00:1.5   9 computation_placer.cc:177] computation placer already registered. Please check linkage\n",
]
KEPT = [
    b"strata: error: /x: not a Strata run directory (no config.yaml); pass the directory `strata train` created\n",
    b"Traceback (most recent call last):\n",
    b'  File "/x/trainer/loop.py", line 3, in train\n',
    b"E0000 00:00:1796039002.084757    7301 gpu_device.cc:2] Out of memory while trying to allocate 2 GiB\n",
    b"F0000 00:00:1796039002.084757    7301 check.cc:9] Check failed: rank < size\n",
    b"step 20/100 loss 0.6324 lr 4.14e-03 30681 ex/s eta 3s\n",
    b"I am a line a user printed\n",
    b"E1 oops\n",
    b"\n",
]


@pytest.mark.parametrize("line", NOISE)
def test_tensorflow_info_warning_and_benign_error_lines_are_noise(line):
    assert is_tf_noise(line) and is_tf_noise(line.rstrip(b"\n"))


@pytest.mark.parametrize("line", KEPT)
def test_everything_else_is_kept(line):
    assert not is_tf_noise(line)


def _through(chunks: list[bytes], **kw) -> bytes:
    f = LineFilter(**kw)
    return b"".join(f.feed(c) for c in chunks) + f.close()


def test_the_filter_keeps_order_and_whole_lines_however_the_bytes_arrive():
    stream = b"".join(x for pair in zip(NOISE, KEPT) for x in pair) + b"".join(KEPT[len(NOISE):])
    want = b"".join(KEPT)
    assert _through([stream]) == want
    assert _through([stream[i:i + 1] for i in range(len(stream))]) == want  # one byte at a time
    assert _through([stream[i:i + 7] for i in range(0, len(stream), 7)]) == want


def test_an_unfinished_line_is_passed_on_at_once_unless_it_may_be_noise():
    f = LineFilter()
    assert f.feed(b"\r 12%|###") == b"\r 12%|###"  # a progress bar is not held back
    assert f.feed(b"#| 13%\n") == b"#| 13%\n"
    assert f.feed(b"I0000 00:00") == b""  # may be TensorFlow's: held until its newline
    assert f.feed(b":1.5 1 port.cc:1] hi\n") == b""
    assert f.feed(b"E12") == b"" and f.close() == b"E12"  # at the end, what was held and is not noise
    assert could_be_tf_noise(b"W") and could_be_tf_noise(b"WARNING: All") and not could_be_tf_noise(b"Wx")
    assert not could_be_tf_noise(b"E1234x") and not could_be_tf_noise(b"strata")


def test_a_dropped_message_takes_its_second_line_with_it():
    guard = (b"I0000 00:00:1796039135.227287    9025 cpu_feature_guard.cc:227] This TensorFlow binary is optimized "
             b"to use available CPU instructions in performance-critical operations.\n")
    second = b"To enable the following instructions: AVX2 AVX512F, in other operations, rebuild TensorFlow.\n"
    assert _through([guard + second + b"ok\n"]) == b"ok\n"
    assert _through([b"ok\n" + second]) == b"ok\n" + second  # only right after a dropped line


def test_prefix_starts_every_line_and_strata_tf_logs_keeps_everything():
    assert _through([b"a\nb", b"c\n", NOISE[1]], prefix=b"[rank 1] ") == b"[rank 1] a\n[rank 1] bc\n"
    assert _through([NOISE[1], b"x\n"], drop_noise=False, prefix=b"[rank 0] ") == b"[rank 0] " + NOISE[1] + b"[rank 0] x\n"


# A worker in miniature: installs the filter as `python -m trainer` does, then writes like TensorFlow (C++
# straight to fd 2, also from a child process), like Strata (print) and like Python (a traceback).
_WORKER = r"""
import os, subprocess, sys, time
from trainer import output
assert output.install() == ({expect_filter})
noise = {noise!r}
os.write(2, noise[0] + noise[1])
print("strata: to stdout", flush=True)
os.write(2, b"strata: error: first\n" + noise[2])
subprocess.run([sys.executable, "-c", "import os; os.write(2, %r + b'child line\\n')" % noise[3]])
os.write(2, b"partial ")
os.write(2, b"line\n")
{ending}
"""


def _worker(ending: str, *, expect_filter: bool = True, stderr=subprocess.PIPE, **env: str) -> subprocess.Popen:
    code = _WORKER.format(noise=NOISE, ending=ending, expect_filter=expect_filter)
    environ = child_env(**env)
    environ.pop("TF_CPP_MIN_LOG_LEVEL")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=stderr,
                            env=environ, start_new_session=True)


EXPECTED_ERR = b"strata: error: first\nchild line\npartial line\n"


def test_a_worker_killed_by_sigkill_still_has_every_line_printed_and_no_noise():
    proc = _worker("os.write(2, b'last words\\n'); os.kill(os.getpid(), 9)")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert err == EXPECTED_ERR + b"last words\n" and out == b"strata: to stdout\n"


def test_the_filter_outlives_sigterm_to_the_whole_group(tmp_path):
    # What `strata launch` does when stopping a rank: SIGTERM to its process group (the filter is in it).
    # stderr is a file, read the moment the worker has exited (the worker waits for the filter at exit; the
    # filter is fast enough that this check alone would rarely catch a missing wait).
    with open(tmp_path / "err", "wb") as err_file:
        proc = _worker("import signal; signal.signal(signal.SIGTERM, lambda *a: (print('saving', file=sys.stderr), "
                       "sys.exit(0))); print('ready', flush=True); time.sleep(30)", stderr=err_file)
    assert proc.stdout.readline() == b"strata: to stdout\n" and proc.stdout.readline() == b"ready\n"
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert (tmp_path / "err").read_bytes() == EXPECTED_ERR + b"saving\n"
    proc.stdout.close()


def test_strata_tf_logs_shows_everything_and_the_prefix_labels_both_streams():
    proc = _worker("", expect_filter=False, STRATA_TF_LOGS="1")
    out, err = proc.communicate(timeout=60)
    assert NOISE[1] in err and NOISE[3] in err and b"strata: error: first\n" in err
    proc = _worker("", STRATA_OUTPUT_PREFIX="[rank 1] ")
    out, err = proc.communicate(timeout=60)
    assert out == b"[rank 1] strata: to stdout\n"
    assert err == b"".join(b"[rank 1] " + line + b"\n" for line in EXPECTED_ERR.splitlines())


# ------------------------------------------------------------------ horovodrun / mpirun output -> rank lines
def test_rank_lines_reassembles_mpirun_pieces_into_whole_prefixed_lines():
    # What `mpirun --tag-output` really printed for two ranks writing "partial r0" then " end\n" (pieces of
    # different ranks share a line), a stderr line, Horovod's own line, a Gloo line and an unfinished last line.
    raw = ["[1,0]<stdout>:line1 r0\n", "[1,0]<stdout>:partial r0[1,1]<stdout>:line1 r1\n",
           "[1,1]<stdout>:partial r1[1,0]<stdout>: end\n", "[1,1]<stdout>: end\n", "[1,0]<stderr>:err\n",
           "Process 1 exit with status code 3.\n", "[0]<stdout>:gloo\n", "[1,0]<stdout>:eta 10s[1,0]<stdout>:\n",
           "[1,1]<stdout>:tail"]
    assert list(rank_lines(raw)) == [
        (0, "line1 r0\n"), (1, "line1 r1\n"), (0, "partial r0 end\n"), (1, "partial r1 end\n"), (0, "err\n"),
        (None, "Process 1 exit with status code 3.\n"), (0, "gloo\n"), (0, "eta 10s\n"), (1, "tail\n")]


# ------------------------------------------------------------------------------------------- the ETA
def test_eta_is_the_pace_after_the_first_step_times_the_steps_left():
    from trainer.hooks import eta_seconds

    assert eta_seconds(step=10, total_steps=100, clock_step=1, elapsed_s=0.9) == pytest.approx(9.0)
    assert eta_seconds(step=100, total_steps=100, clock_step=1, elapsed_s=5.0) == 0.0
    assert eta_seconds(step=1, total_steps=100, clock_step=1, elapsed_s=0.0) is None  # nothing timed yet
    assert eta_seconds(step=260, total_steps=300, clock_step=250, elapsed_s=2.0) == pytest.approx(8.0)  # resumed


def test_the_console_leaves_the_first_step_out_of_the_eta():
    from trainer.hooks import Console, LoopState

    console, state = Console(enabled=True, progress_bar=False), LoopState(step=0, total_steps=100)
    console.on_train_begin(state)
    time.sleep(1.0)  # the first step: graph building
    state.step = 1
    console.on_step_end(state)
    for _ in range(9):  # 9 steps of ~10 ms
        time.sleep(0.01)
        state.step += 1
        console.on_step_end(state)
    state.train_logs = {"loss": 0.5, "learning_rate": 1e-3, "examples_per_sec": 6400.0}
    printed = io.StringIO()
    with redirect_stdout(printed):
        console.on_log(state)
    eta = float(printed.getvalue().split("eta ")[1].rstrip("s\n"))
    assert 0.5 <= eta <= 4.0, printed.getvalue()  # 90 steps at ~10-40 ms; with the first step in: ~10 s



def test_the_launcher_drops_the_same_lines_as_the_worker():
    # horovodrun imports TensorFlow itself: its own lines are filtered by launch/tf_noise.py (the launcher
    # cannot import the trainer); both rules must agree.
    second = b"To enable the following instructions: AVX2\n"
    for line in NOISE + KEPT + [second]:
        assert launcher_is_tf_noise(line.decode()) == is_tf_noise(line), line
    after = NoiseLines()
    assert after.drop(NOISE[1].decode()) and after.drop(second.decode())
    assert not after.drop("ok\n") and not after.drop(second.decode())
