"""launch.local with real processes (tiny `python -c` ranks, no TensorFlow): output, fail-fast, signals.

Also runs the argv that launch.horovod builds under the real horovodrun, Gloo and MPI (those two tests pay
for horovodrun importing TensorFlow, ~6 s each; the ranks themselves are still tiny scripts).
"""
from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.horovod import horovodrun_argv
from launch.hosts import parse_hosts
from launch.local import run_local
from tests.conftest import REPO, child_env

pytestmark = pytest.mark.multi_process
PY = sys.executable
HOROVODRUN = str(Path(PY).parent / "horovodrun")


def _py(code: str) -> list[str]:
    return [PY, "-c", code]


def _run(codes: list[str], **kwargs) -> tuple[int, str, float]:
    out = io.StringIO()
    start = time.monotonic()
    rc = run_local([_py(c) for c in codes], [child_env() for _ in codes], stdout=out, **kwargs)
    return rc, out.getvalue(), time.monotonic() - start


def _alive(pid: int) -> bool:
    """Running (a zombie, which only waits for a reaper, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pids: list[int], timeout: float = 3.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


SLEEP_FOREVER = "import time; time.sleep(60)"
IGNORE_TERM_AND_SLEEP = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                         "print('ready', flush=True); time.sleep(60)")


def test_output_is_prefixed_by_rank_and_all_succeed_returns_0(capsys):
    code = ("import os, sys; r = os.environ['R']; print(f'out {r}'); print(f'err {r}', file=sys.stderr); "
            "sys.stdout.write('no newline at end')")
    out = io.StringIO()
    rc = run_local([_py(code)] * 3, [child_env(R=str(r)) for r in range(3)], stdout=out)
    assert rc == 0
    lines = out.getvalue().splitlines()
    for r in range(3):
        assert f"[rank {r}] out {r}" in lines and f"[rank {r}] err {r}" in lines
    assert lines.count("[rank 0] no newline at end") == 1 and len(lines) == 9
    assert capsys.readouterr().err == ""  # nothing to report on success


def test_lines_are_never_interleaved():
    code = "import os; r = os.environ['R']; [print(f'{r}' * 500) for _ in range(300)]"
    out = io.StringIO()
    assert run_local([_py(code)] * 3, [child_env(R=str(r)) for r in range(3)], stdout=out) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 900
    for line in lines:
        m = re.fullmatch(r"\[rank (\d)\] (\d+)", line)
        assert m and m.group(2) == m.group(1) * 500


def test_failing_rank_stops_a_sleeping_rank_fast(capsys):
    fail = "import sys, time; print('dying at', time.time(), flush=True); sys.exit(3)"
    rc, out, elapsed = _run([SLEEP_FOREVER, fail], grace_seconds=5.0)
    returned_at = time.time()
    assert rc == 3
    died_at = float(re.search(r"\[rank 1\] dying at ([0-9.]+)", out).group(1))
    latency = returned_at - died_at
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"\ndetection latency (rank exits -> run_local returns): {latency * 1000:.0f} ms, "
              f"run_local total {elapsed:.2f} s")
    assert latency < 1.0 and elapsed < 3.0
    assert re.fullmatch(r"strata: rank 1 on localhost \(pid \d+\) exited with code 3; "
                        r"stopped the other 1 rank\(s\) \d+\.\d s after its exit\n", err)


def test_rank_killed_by_sigkill_is_named(capsys):
    kill = "import os, signal, time; time.sleep(0.2); os.kill(os.getpid(), signal.SIGKILL)"
    rc, _, elapsed = _run([kill, SLEEP_FOREVER, SLEEP_FOREVER])
    assert rc == 137 and elapsed < 5.0
    err = capsys.readouterr().err
    assert re.fullmatch(r"strata: rank 0 on localhost \(pid \d+\) was killed by SIGKILL \(signal 9\); "
                        r"stopped the other 2 rank\(s\) \d+\.\d s after its exit\n", err)


def test_rank_ignoring_sigterm_is_killed_after_grace(capsys):
    # The failing rank waits until the stubborn one has installed its handler, so SIGTERM is really ignored.
    fail = "import sys, time; time.sleep(1.0); sys.exit(1)"
    start = time.monotonic()
    rc, out, _ = _run([IGNORE_TERM_AND_SLEEP, fail], grace_seconds=1.0)
    elapsed = time.monotonic() - start
    assert rc == 1 and "[rank 0] ready" in out
    assert 1.9 < elapsed < 1.0 + 1.0 + 1.5  # 1 s before failing + 1 s grace + slack
    assert "rank 1 " in capsys.readouterr().err


def test_failing_rank_children_are_stopped_too(tmp_path):
    # Rank 1 starts a grandchild, records its pid and fails: the grandchild is in rank 1's process group.
    pidfile = tmp_path / "grandchild"
    fail = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', {SLEEP_FOREVER!r}]); "
            f"open({str(pidfile)!r}, 'w').write(str(c.pid)); sys.exit(2)")
    rc, _, elapsed = _run([SLEEP_FOREVER, fail])
    assert rc == 2 and elapsed < 5.0
    assert _wait_gone([int(pidfile.read_text())]) == []


def test_command_that_cannot_start(capsys):
    out = io.StringIO()
    rc = run_local([_py(SLEEP_FOREVER), ["/nonexistent/strata-worker"]], [child_env(), child_env()], stdout=out)
    assert rc == 127
    assert capsys.readouterr().err.startswith("strata: cannot start rank 1 (/nonexistent/strata-worker): ")


LAUNCHER = """
import sys
from launch.local import run_local
from tests.conftest import child_env
rank = ("import os, subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print('pids', os.getpid(), c.pid, flush=True); time.sleep(60)")
sys.exit(run_local([[sys.executable, '-c', rank]] * 2, [child_env(), child_env()], grace_seconds=2.0))
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_launcher_signal_stops_every_rank_and_their_children(sig, code):
    launcher = subprocess.Popen([PY, "-c", LAUNCHER], cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        while len(pids) < 4:
            line = launcher.stdout.readline()
            assert line, launcher.stderr.read()
            m = re.fullmatch(r"\[rank \d\] pids (\d+) (\d+)\n", line)
            if m:
                pids += [int(m.group(1)), int(m.group(2))]
        assert all(_alive(p) for p in pids)
        start = time.monotonic()
        launcher.send_signal(sig)
        rc = launcher.wait(timeout=10)
        elapsed = time.monotonic() - start
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert rc == code and elapsed < 2.0 + 1.0
    assert f"strata: received {signal.Signals(sig).name}; stopped 2 running rank(s)" in launcher.stderr.read()
    assert _wait_gone(pids) == [], "orphans left behind"


# ------------------------------------------------------- argv from launch.horovod under the real launchers
RANK_SCRIPT = ("import os; e = os.environ; "
               "print('rank', e.get('OMPI_COMM_WORLD_RANK', e.get('HOROVOD_RANK')), e.get('STRATA_BACKEND'))")


def _launcher_env() -> dict[str, str]:
    # Without PYTHONUNBUFFERED: under mpirun a rank's stdout is a pty, so Python already writes whole lines;
    # unbuffered, print() writes each piece separately and --tag-output tags every piece (mangled lines).
    env = child_env(STRATA_BACKEND="horovod")
    env.pop("PYTHONUNBUFFERED", None)
    env["PATH"] = f"{Path(PY).parent}{os.pathsep}{env['PATH']}"  # horovodrun --mpi looks up mpirun on PATH
    return env


def _launch(argv: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO, env=_launcher_env())
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.skipif(not Path(HOROVODRUN).exists(), reason="horovodrun not installed")
@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_horovodrun_argv_runs(controller):
    argv = horovodrun_argv(np=2, hosts=parse_hosts("localhost:2"), controller=controller, command=_py(RANK_SCRIPT),
                           as_root=os.geteuid() == 0, program=HOROVODRUN)
    out = _launch(argv).stdout
    assert set(re.findall(r"^\[[0-9,]+\]<stdout>:rank (\d) horovod$", out, re.M)) == {"0", "1"}, out


def test_a_preempted_rank_waits_for_the_others_instead_of_stopping_them(capsys):
    # Exit 75 = "stopped at the agreed step, checkpoint saved": the other rank, still saving, must not be killed.
    slow = "import time; time.sleep(1.5); raise SystemExit(75)"
    rc, _, elapsed = _run([slow, "raise SystemExit(75)"], grace_seconds=0.2)
    assert rc == 75 and elapsed >= 1.5
    assert "strata: preempted: every rank stopped at the step they agreed on" in capsys.readouterr().err


# Both ranks stamp their one heartbeat with the same time (argv[3]), so they pass the limit together however
# far apart a loaded machine starts them.
BEAT = ("import json, os, socket, sys, time; d, r, t = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]); "
        "b = dict(rank=r, host=socket.gethostname(), pid=os.getpid(), step=4 + r, phase='step', since=t, "
        "written=t, allowed_s=1.0); "
        "open(f'{d}/.t{r}', 'w').write(json.dumps(b)); os.replace(f'{d}/.t{r}', f'{d}/rank-{r}.json'); time.sleep(60)")


def test_watchdog_reports_every_rank_and_stops_a_hung_job(tmp_path, capsys):
    # Real ranks writing heartbeats in the documented format (trainer/heartbeat.py), then never progressing.
    out = io.StringIO()
    start = time.monotonic()
    stamp = str(time.time())
    rc = run_local([[PY, "-c", BEAT, str(tmp_path), str(r), stamp] for r in range(2)], [child_env(), child_env()],
                   stdout=out, grace_seconds=0.5, heartbeat_dir=tmp_path)
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert rc == 124 and elapsed < 1.0 + 1.0 + 0.5 + 2.0, err  # limit + check interval + grace + start-up
    assert "made no progress" in err and "furthest behind: rank 0 (step 4, step)" in err
    assert re.search(r"^\s+1\s+\S+\s+\d+\s+5\s+step\s+\d+\.\d\s+<- hung$", err, re.M), err


# ------------------------------------------------ Ctrl-C / SIGTERM to the launcher: passed on to the ranks
# A rank that stops like trainer/preemption.py does on a signal: rank 0 says it saved the step, both exit 130
# (SIGINT) or 75 (SIGTERM). `STUBBORN` ignores SIGINT (a rank stuck where it cannot act on the stop).
STOPPING_RANK = """
import os, signal, sys, time
def stop(signum, frame):
    if os.environ["R"] == "0":
        print("strata: stopped at step 7 by " + ("Ctrl-C" if signum == signal.SIGINT else "SIGTERM")
              + " (checkpoint saved); run the same command to resume", flush=True)
    sys.exit(130 if signum == signal.SIGINT else 75)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(60)
"""
STUBBORN = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
STOP_LAUNCHER = """
import sys
from pathlib import Path
from launch.local import run_local
from tests.conftest import child_env
ranks, grace = sys.argv[1].split("|"), float(sys.argv[2])
sys.exit(run_local([[sys.executable, '-c', code] for code in ranks], [child_env(R=str(r)) for r in range(len(ranks))],
                   grace_seconds=grace, run_dir=Path(sys.argv[3])))
"""


def _launcher_stop(ranks: list[str], signals: list[int], tmp_path: Path, grace: float = 30.0):
    """Start run_local over `ranks` in a launcher process; once every rank is ready, send it `signals` (each
    after the launcher's notice of the first). Returns (exit code, stderr lines, seconds from first signal)."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ckpt-5.manifest.json").write_text("{}")  # what a committed save leaves
    launcher = subprocess.Popen([PY, "-c", STOP_LAUNCHER, "|".join(ranks), str(grace), str(tmp_path)], cwd=REPO,
                                env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = 0
        while ready < len(ranks):
            line = launcher.stdout.readline()
            assert line, launcher.stderr.read()
            ready += line.endswith("ready\n")
        start = time.monotonic()
        launcher.send_signal(signals[0])
        err = [launcher.stderr.readline()]
        for sig in signals[1:]:
            launcher.send_signal(sig)
        rc = launcher.wait(timeout=60)
        elapsed = time.monotonic() - start
        err += launcher.stderr.read().splitlines()
    finally:
        if launcher.poll() is None:
            launcher.kill()
    return rc, [e.rstrip("\n") for e in err], elapsed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig, code, what", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 75, "SIGTERM")])
def test_a_stop_the_ranks_saved_is_reported_as_a_stop(tmp_path, sig, code, what):
    rc, err, _ = _launcher_stop([STOPPING_RANK, STOPPING_RANK], [sig], tmp_path)
    assert rc == code, err
    assert err[0].startswith(f"strata: {what}: every rank stops after the same step and saves it (waiting up to 30 s")
    assert err[-1] == f"strata: stopped at step 7 by {what} (checkpoint saved); run the same command to resume"


@pytest.mark.timeout(60)
def test_a_second_ctrl_c_kills_the_ranks_at_once_and_says_what_is_lost(tmp_path):
    rc, err, elapsed = _launcher_stop([STUBBORN, STUBBORN], [signal.SIGINT, signal.SIGINT], tmp_path)
    assert rc == 130 and elapsed < 5.0, err  # not the 30 s grace
    assert err[-1] == ("strata: second Ctrl-C: stopping now without a checkpoint; steps after 5 (the last "
                       "checkpoint) will be redone")


@pytest.mark.timeout(60)
def test_ranks_that_do_not_stop_within_the_grace_are_killed(tmp_path):
    rc, err, elapsed = _launcher_stop([STUBBORN, STOPPING_RANK], [signal.SIGINT], tmp_path, grace=1.0)
    assert rc == 130 and 1.0 <= elapsed < 5.0, err
    assert err[-1] == ("strata: the ranks did not stop within --grace 1 s: stopping them now without a checkpoint; "
                       "steps after 5 (the last checkpoint) will be redone")
