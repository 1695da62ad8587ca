"""The hang watchdog's and the job reports' pure parts: who is hung, the table, how an exit is described."""
from __future__ import annotations

from launch.horovod_job import describe_status, failure_message, mpirun_failure
from launch.local import describe_exit
from launch.watchdog import format_table, heartbeat_settings, hung_ranks, supervision_env


def beat(rank: int, step: int, phase: str, since: float, allowed: float = 10.0) -> dict:
    return {"rank": rank, "host": "node1", "pid": 100 + rank, "step": step, "phase": phase, "since": since,
            "written": since, "allowed_s": allowed}


def test_a_rank_is_hung_only_past_its_own_phase_allowance():
    beats = {0: beat(0, 5, "step", since=100.0), 1: beat(1, 5, "between steps", since=95.0)}
    assert hung_ranks(beats, world_size=2, now=104.0, started=0.0, startup_s=900) == []
    assert hung_ranks(beats, world_size=2, now=106.0, started=0.0, startup_s=900) == [1]
    assert hung_ranks(beats, world_size=2, now=111.0, started=0.0, startup_s=900) == [0, 1]
    assert hung_ranks(beats, world_size=2, now=111.0, started=0.0, startup_s=900, finished={0}) == [1]


def test_exited_unlimited_and_silent_ranks():
    beats = {0: beat(0, 9, "exited", since=0.0), 1: beat(1, 9, "step", since=0.0, allowed=0.0)}
    assert hung_ranks(beats, world_size=3, now=1000.0, started=0.0, startup_s=0) == []  # 0: no limit
    assert hung_ranks(beats, world_size=3, now=1000.0, started=0.0, startup_s=900) == [2]  # never wrote a beat
    assert hung_ranks(beats, world_size=3, now=800.0, started=0.0, startup_s=900) == []


def test_table_names_the_rank_the_others_wait_for():
    beats = {0: beat(0, 5, "step", since=90.0), 1: beat(1, 5, "between steps", since=89.0)}
    text = format_table(beats, world_size=3, now=100.0, hosts=["node1", "node1", "node2"], hung=[0, 1])
    lines = text.splitlines()
    assert lines[0].split() == ["rank", "host", "pid", "step", "phase", "seconds"]
    assert lines[1].split() == ["0", "node1", "100", "5", "step", "10.0", "<-", "hung"]
    assert lines[2].split() == ["1", "node1", "101", "5", "between", "steps", "11.0", "<-", "hung"]
    assert "node2" in lines[3] and "(no heartbeat yet)" in lines[3]
    assert len(lines) == 4  # rank 2 unknown: no "furthest behind" guess
    both = format_table(beats, world_size=2, now=100.0, hosts=[], hung=[1])
    assert both.splitlines()[-1] == "  furthest behind: rank 1 (step 5, between steps); the others are waiting for it"


def test_exit_descriptions():
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-9) == "was killed by SIGKILL (signal 9)"
    assert describe_status(137) == describe_status(-9) == "was killed by SIGKILL (signal 9)"
    assert describe_status(143) == "was killed by SIGTERM (signal 15)"
    assert describe_status(75) == "exited with code 75"
    msg = failure_message([(1, 137, 10.0), (0, 143, 12.0)], hosts=["a", "b"], ended=15.5,
                          beats={1: beat(1, 7, "between steps", 9.0)})
    assert msg == ("rank 1 on b was killed by SIGKILL (signal 9) (its last heartbeat: step 7, between steps); "
                   "the other ranks were stopped, job ended 5.5 s after that exit")
    # Elastic jobs: Horovod's driver, not the launcher, places ranks, so no host is named rather than a wrong one.
    assert failure_message([(1, 137, 10.0)], hosts=[], ended=15.5, beats={}).startswith(
        "rank 1 was killed by SIGKILL (signal 9); ")


def test_launched_ranks_get_preemption_on_and_the_launcher_as_watchdog(tmp_path):
    assert supervision_env(tmp_path, {}) == {"STRATA_PREEMPTION": "1", "STRATA_HEARTBEAT_DIR": str(tmp_path),
                                             "STRATA_WATCHDOG": "launcher", "STRATA_SUPERVISED": "1"}
    assert supervision_env(None, {"STRATA_PREEMPTION": "0"}) == {"STRATA_PREEMPTION": "0", "STRATA_SUPERVISED": "1"}
    assert heartbeat_settings({"train": {"watchdog_timeout_s": 30, "watchdog_startup_s": 900}}) == (30.0, 900.0)


def test_mpirun_reports_name_the_first_failed_rank():
    """Texts as Open MPI 4.1's mpirun prints them under `strata launch --mpi` (copied from real runs)."""
    killed = ("--------------------------------------------------------------------------\n"
              "Primary job  terminated normally, but 1 process returned\n"
              "a non-zero exit code. Per user-direction, the job has been aborted.\n"
              "--------------------------------------------------------------------------\n"
              "mpirun noticed that process rank 1 with PID 0 on node vm exited on signal 9 (Killed).\n")
    exited = ("mpirun detected that one or more processes exited with non-zero status, thus causing\n"
              "the job to be terminated. The first process to do so was:\n\n"
              "  Process name: [[11968,1],3]\n"
              "  Exit code:    75\n")
    assert mpirun_failure(killed) == (1, 137)
    assert describe_status(mpirun_failure(killed)[1]) == "was killed by SIGKILL (signal 9)"
    assert mpirun_failure(exited) == (3, 75)
    assert mpirun_failure("Process 1 exit with status code 3.\n") is None
