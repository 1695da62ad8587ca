"""SLURM, the pure part: host lists, rank -> host mapping for 2-16 nodes (multi-node cannot run for real on
one machine), per-rank environments, resource checks, and the batch script's quoting.

The quoting tests run the rendered script with the real bash (srun replaced by a shell function that
records its arguments), and read the #SBATCH lines with sbatch's documented rules; the same hostile paths
also go through real sbatch in tests/cluster/."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launch import slurm
from launch.errors import LaunchError
from launch.hostlist import expand_counts, expand_hostlist
from tests.conftest import CONFIGS, REPO, STRATA

RESOLVED = {"name": "classifier", "run_dir": None, "data": {"batch_size": 64}, "train": {"grad_accum": 1},
            "distribution": {"backend": "horovod", "pipeline": None}}
PIPELINED = {**RESOLVED, "distribution": {"backend": "horovod", "pipeline": {"stages": 2, "micro_batches": 4}}}
HOSTILE = "/tmp/we ird/a'b\"c$(touch PWNED);d`id`#e%j\\f"


# ------------------------------------------------------------------------------------------- hostlist
@pytest.mark.parametrize("expr, hosts", [
    ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
    ("node[1-3],login2", ["node1", "node2", "node3", "login2"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("vm", ["vm"]),
    ("a1,b[2],c[3-4]", ["a1", "b2", "c3", "c4"]),
    ("gpu[001-016]", [f"gpu{i:03d}" for i in range(1, 17)]),
])
def test_expand_hostlist(expr, hosts):
    assert expand_hostlist(expr) == hosts


@pytest.mark.parametrize("expr", ["", "gpu[01-", "gpu01]", "gpu[4-1]", "gpu[a-b]", "a,,b", "g[[1]]", "g[1-]"])
def test_bad_hostlists_are_one_line_errors(expr):
    with pytest.raises(LaunchError) as err:
        expand_hostlist(expr)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spec, counts", [("2(x3),1", [2, 2, 2, 1]), ("4", [4]), ("1(x16)", [1] * 16),
                                          ("3,2(x2),1(x1)", [3, 2, 2, 1])])
def test_expand_counts(spec, counts):
    assert expand_counts(spec) == counts


@pytest.mark.parametrize("spec", ["", "2(x)", "x", "2,,1", "-1"])
def test_bad_counts(spec):
    with pytest.raises(LaunchError):
        expand_counts(spec)


# ------------------------------------------------------------------------------ ranks on 2..16 nodes
def _compress(nodes: list[str]) -> str:
    """`gpu[01-04,07]`-style expression for nodes named gpuNN (what SLURM would put in SLURM_JOB_NODELIST)."""
    numbers = [n.removeprefix("gpu") for n in nodes]
    return "gpu[" + ",".join(numbers) + "]"


def _counts_spec(counts: list[int]) -> str:
    out, i = [], 0
    while i < len(counts):
        j = i
        while j < len(counts) and counts[j] == counts[i]:
            j += 1
        out.append(f"{counts[i]}(x{j - i})" if j - i > 1 else str(counts[i]))
        i = j
    return ",".join(out)


def _job_env(nodes: list[str], counts: list[int]) -> list[dict[str, str]]:
    """What SLURM gives each task of a block-distributed step: one environment per rank."""
    envs, rank = [], 0
    for node_id, (node, count) in enumerate(zip(nodes, counts)):
        for local in range(count):
            envs.append({"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(local), "SLURMD_NODENAME": node,
                         "SLURM_NODEID": str(node_id), "SLURM_STEP_NUM_TASKS": str(sum(counts)),
                         "SLURM_STEP_NODELIST": _compress(nodes), "SLURM_STEP_TASKS_PER_NODE": _counts_spec(counts),
                         "SLURM_JOB_ID": "4242", "PMI_SIZE": str(sum(counts))})
            rank += 1
    return envs


LAYOUTS = [(n, [4] * n) for n in (2, 3, 4, 8, 16)] + [
    (2, [2, 1]), (4, [2, 2, 2, 1]), (5, [3, 1, 1, 2, 2]), (16, [1] * 15 + [8]), (7, [8, 8, 8, 8, 8, 8, 1])]


@pytest.mark.parametrize("num_nodes, counts", LAYOUTS, ids=[f"{n}nodes-{'-'.join(map(str, c))}" for n, c in LAYOUTS])
def test_every_rank_derives_the_same_cluster(num_nodes, counts):
    nodes = [f"gpu{i:02d}" for i in (list(range(1, 5)) + list(range(7, 30)))[:num_nodes]]  # gpu[01-04,07-...]
    envs = _job_env(nodes, counts)
    expanded = expand_hostlist(envs[0]["SLURM_STEP_NODELIST"])
    assert expanded == nodes
    clusters = set()
    for env in envs:
        rank = slurm.read_rank(env, expanded)
        me = rank.placement
        assert (me.rank, me.host, me.local_rank) == (int(env["SLURM_PROCID"]), env["SLURMD_NODENAME"],
                                                     int(env["SLURM_LOCALID"]))
        assert me.local_size == counts[int(env["SLURM_NODEID"])]
        out = slurm.rank_environment(env, rank, backend="multi_worker", gpus_per_node=0)
        spec = json.loads(out["TF_CONFIG"])
        assert spec["task"] == {"type": "worker", "index": me.rank}
        clusters.add(tuple(spec["cluster"]["worker"]))
        assert out["STRATA_RANK"] == env["SLURM_PROCID"] and out["STRATA_WORLD_SIZE"] == str(sum(counts))
        assert out["STRATA_PREEMPTION"] == "1" and "PMI_SIZE" not in out  # not mistaken for an MPI launch
    (workers,) = clusters  # every rank computed the same worker list
    assert len(set(workers)) == len(workers) == sum(counts)
    assert [w.rsplit(":", 1)[0] for w in workers] == [n for n, c in zip(nodes, counts) for _ in range(c)]


def test_cyclic_distribution_is_refused_not_miswired():
    env = _job_env(["gpu01", "gpu02"], [2, 2])[1]
    env["SLURMD_NODENAME"], env["SLURM_LOCALID"] = "gpu02", "0"  # what --distribution=cyclic does to rank 1
    with pytest.raises(LaunchError, match="block order"):
        slurm.read_rank(env, ["gpu01", "gpu02"])


def test_counts_must_match_the_node_list():
    env = _job_env(["gpu01", "gpu02"], [2, 2])[0]
    with pytest.raises(LaunchError, match="pair up"):
        slurm.read_rank(env, ["gpu01"])


def test_outside_slurm_the_message_says_where_to_run():
    with pytest.raises(LaunchError, match="srun"):
        slurm.read_rank({}, ["vm"])


def test_ports_agree_differ_per_start_and_stay_below_the_ephemeral_range():
    first, again = slurm.worker_ports(123, 0, 8), slurm.worker_ports(123, 1, 8)
    assert first == slurm.worker_ports(123, 0, 8) and len(set(first)) == 8
    assert not set(first) & set(again)  # a requeued start never reuses the previous start's ports
    for job in range(0, 5000, 37):
        assert all(1024 < p < 32768 for p in slurm.worker_ports(job, job % 3, 64))


@pytest.mark.parametrize("visible, per_node, tasks, want", [
    ("", 4, 4, ["0", "1", "2", "3"]),
    ("4,5,6,7", 4, 4, ["4", "5", "6", "7"]),  # SLURM gave this node's job GPUs 4-7
    ("", 4, 2, ["0,1", "2,3"]),  # pipeline with 2 stages: two GPUs per rank
])
def test_local_rank_selects_the_gpus(visible, per_node, tasks, want):
    got = []
    for env in _job_env(["gpu01"], [tasks]):
        if visible:
            env["CUDA_VISIBLE_DEVICES"] = visible
        env["PMIX_RANK"] = env["SLURM_PROCID"]
        rank = slurm.read_rank(env, ["gpu01"])
        got.append(slurm.rank_environment(env, rank, backend="horovod", gpus_per_node=per_node)["CUDA_VISIBLE_DEVICES"])
    assert got == want


def test_horovod_rank_uses_mpi_over_pmix_and_demands_it():
    env = _job_env(["gpu01", "gpu02"], [1, 1])[1]
    rank = slurm.read_rank(env, ["gpu01", "gpu02"])
    with pytest.raises(LaunchError, match="--mpi=pmix"):
        slurm.rank_environment(env, rank, backend="horovod", gpus_per_node=0)
    out = slurm.rank_environment({**env, "PMIX_RANK": "1", "TF_CONFIG": "stale"}, rank, backend="horovod",
                                 gpus_per_node=0)
    assert out["HOROVOD_CONTROLLER"] == "mpi" and "TF_CONFIG" not in out and out["STRATA_BACKEND"] == "horovod"


def test_each_rank_prefixes_its_own_lines_like_every_launcher():
    # SLURM has no Strata launcher reading the ranks' output: run-rank tells the trainer the prefix to use
    # (trainer/output.py), the one `strata launch` puts before every rank's line.
    from launch.contract import rank_prefix

    for rank, env in enumerate(_job_env(["gpu01", "gpu02"], [2, 1])):
        out = slurm.rank_environment({**env, "PMIX_RANK": str(rank)}, slurm.read_rank(env, ["gpu01", "gpu02"]),
                                     backend="horovod", gpus_per_node=0)
        assert out["STRATA_OUTPUT_PREFIX"] == rank_prefix(rank) == f"[rank {rank}] "


# -------------------------------------------------------------------------------------- resources
@pytest.mark.parametrize("text, seconds", [("30", 1800), ("5:30", 330), ("2:00:00", 7200), ("1-0", 86400),
                                           ("1-02:03", 93780), ("1-02:03:04", 93784), ("UNLIMITED", None),
                                           ("0", None)])
def test_parse_time(text, seconds):
    assert slurm.parse_time(text) == seconds


def test_bad_time():
    with pytest.raises(LaunchError, match="HH:MM:SS"):
        slurm.parse_time("2h")


def _check(resolved=RESOLVED, **kw):
    args = dict(backend="horovod", nodes=1, ntasks_per_node=None, gpus_per_node=0, time=None)
    return slurm.check_resources(resolved, **{**args, **kw})


def test_default_tasks_per_node_follow_gpus_and_stages():
    assert _check(gpus_per_node=8).tasks_per_node == 8
    assert _check(PIPELINED, gpus_per_node=8).tasks_per_node == 4
    assert _check().tasks_per_node == 1
    assert _check(nodes=16, ntasks_per_node=4).tasks == 64


@pytest.mark.parametrize("kw, needle", [
    (dict(gpus_per_node=4, ntasks_per_node=2), "--gpus-per-node 4 does not match --ntasks-per-node 2 x 1"),
    (dict(resolved=PIPELINED, gpus_per_node=4, ntasks_per_node=4), "x 2 device(s) per rank (distribution.pipeline.stages)"),
    (dict(time="1"), "leaves no time before the preemption warning"),
    (dict(backend="single"), "use horovod or multi_worker"),
    (dict(nodes=0), "--nodes 0"),
])
def test_requests_that_cannot_work_are_refused(kw, needle):
    resolved = kw.pop("resolved", RESOLVED)
    with pytest.raises(LaunchError) as err:
        _check(resolved, **kw)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kw, needle", [
    (dict(ntasks_per_node=3), "data.batch_size (64) must be divisible by the job's 3 replicas (--nodes 1 x "
                              "--ntasks-per-node 3)"),
    (dict(nodes=16, ntasks_per_node=8), "at most 64 replica(s)"),
    (dict(resolved=PIPELINED, nodes=8, ntasks_per_node=4), "distribution.pipeline.micro_batches (4)"),
    (dict(backend="multi_worker", gpus_per_node=4, ntasks_per_node=1, nodes=3), "x 4 GPUs per worker"),
])
def test_the_batch_must_split_over_the_jobs_replicas(kw, needle):
    """The worker's layout check (what `slurm submit` runs through `python -m trainer validate --replicas`),
    told the job's replicas and how the request made them."""
    from trainer.config import config_from_dict
    from trainer.parallel.layout import LayoutError, layout_for

    resolved = kw.pop("resolved", RESOLVED)
    resources = _check(resolved, **kw)
    cfg = config_from_dict({**resolved, "model": {"kind": "classifier"}})
    with pytest.raises(LayoutError) as err:
        layout_for(cfg, resources.replicas, resources.replicas_as)
    assert needle in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------- script quoting
def _sbatch_words(value: str) -> list[str]:
    """An #SBATCH line's words, read the way sbatch documents: double quotes group, a backslash takes the
    next character literally, an unquoted '#' starts a comment."""
    words, cur, quoted, escaped, has = [], [], False, False, False
    for ch in value:
        if escaped:
            cur.append(ch); escaped = False; has = True
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted; has = True
        elif ch == "#" and not quoted:
            break
        elif ch.isspace() and not quoted:
            if has:
                words.append("".join(cur)); cur, has = [], False
        else:
            cur.append(ch); has = True
    if has:
        words.append("".join(cur))
    return words


def _job(log_dir=HOSTILE.replace("\\", ""), config=None, **kw) -> slurm.JobScript:
    res = slurm.Resources(nodes=2, tasks_per_node=4, gpus_per_node=4, time_seconds=7200, warning_seconds=90)
    fields = dict(job_name='my "job"; rm -rf / #', resources=res, backend="horovod", python="/opt/my env/bin/python",
                  config=config or f"{log_dir}/config.yaml", workdir="/home/u/it's here", log_dir=log_dir,
                  partition="gpu a", account="acct$x")
    fields.update(kw)
    return slurm.JobScript(**fields)


def _directives(script: str) -> dict[str, str]:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            (word,) = _sbatch_words(line[len("#SBATCH "):])
            key, _, value = word.partition("=")
            out[key] = value
    return out


def test_directives_survive_sbatch_parsing():
    job = _job()
    d = _directives(slurm.render_script(job))
    assert d["--job-name"] == job.job_name
    assert d["--partition"] == "gpu a" and d["--account"] == "acct$x"
    assert d["--chdir"] == job.workdir
    assert d["--output"].replace("%%", "\0").replace("%j", "<id>").replace("\0", "%") == f"{job.log_dir}/slurm-<id>.out"
    assert d["--nodes"] == "2" and d["--ntasks-per-node"] == "4" and d["--gpus-per-node"] == "4"
    assert d["--time"] == "0-02:00:00" and d["--signal"] == "B:USR1@90" and "--requeue" in d


def test_the_script_runs_exactly_the_intended_command(tmp_path: Path):
    job = _job()
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.render_script(job))
    argv_file = tmp_path / "argv"
    done = subprocess.run(["bash", "-c", 'srun() { printf "%s\\0" "$@" > "$ARGV"; }; . "$1"', "bash", str(script)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "ARGV": str(argv_file), "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "vm"})
    assert done.returncode == 0, done.stderr
    argv = argv_file.read_text().split("\0")[:-1]
    assert argv[-10:] == [job.python, "-m", "launch.cli", "slurm", "run-rank", "--backend", "horovod",
                          "--gpus-per-node", "4", job.config]
    assert "--mpi=pmix" in argv and "--ntasks-per-node=4" in argv
    assert not list(tmp_path.glob("PWNED")) and not (REPO / "PWNED").exists()


def test_no_line_breaks_or_backslashes_in_paths():
    with pytest.raises(LaunchError, match="line break"):
        slurm.render_script(_job(log_dir="/tmp/a\nb"))
    with pytest.raises(LaunchError, match="backslash"):
        slurm.render_script(_job(log_dir="/tmp/a\\b"))
    with pytest.raises(LaunchError, match="line break"):
        slurm.directive("a\nb")


def test_example_script_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(REPO / "slurm" / "example.sbatch")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_shlex_and_directive_roundtrip_arbitrary_text():
    for text in [HOSTILE, "", " lead", "trail ", 'q"q', "back\\slash", "semi;colon", "100%"]:
        assert shlex.split(slurm.sh(text)) == [text]
        assert _sbatch_words(slurm.directive(text)) == [text]


# ------------------------------------------------------------------------------------- the command
def test_dry_run_prints_the_script_and_writes_nothing(tmp_path: Path):
    # Without SLURM's commands on PATH: the checks that need SLURM are named as not run (the refusals of a dry
    # run on a real cluster are in tests/cluster/).
    run_dir = tmp_path / "run dir"
    done = subprocess.run([STRATA, "slurm", "submit", str(CONFIGS / "classifier.yaml"), "--ntasks-per-node", "2",
                           "--time", "10:00", "--partition", "gpu", "--set", f"run_dir={run_dir}", "--dry-run"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PATH": str(Path(sys.executable).parent)})
    assert done.returncode == 0, done.stderr
    d = _directives(done.stdout)
    assert d["--ntasks-per-node"] == "2" and d["--time"] == "0-00:10:00" and d["--chdir"] == str(tmp_path)
    assert f"{run_dir}/slurm/slurm-%j.out" == d["--output"]
    assert done.stderr == ("strata: dry run: checked the config, the resources against it; could NOT check the "
                           "partition (sinfo): `sinfo` not found; the request (sbatch --test-only): `sbatch` not "
                           f"found; nothing written or submitted ({run_dir}/slurm/config.yaml would hold the "
                           "resolved config)\n")
    assert not run_dir.exists()


def test_follow_commands_are_one_per_line_and_each_runs_as_printed():
    from launch.slurm_jobs import follow_commands

    tail, queue, cancel = follow_commands("14", f"{HOSTILE}/slurm/slurm-14")
    assert shlex.split(tail) == ["tail", "-f", f"{HOSTILE}/slurm/slurm-14.out", f"{HOSTILE}/slurm/slurm-14.err"]
    assert shlex.split(queue) == ["squeue", "-j", "14"] and shlex.split(cancel) == ["scancel", "14"]


@pytest.mark.parametrize("args, needle", [
    (["--ntasks-per-node", "3"], "data.batch_size (64) must be divisible by the job's 3 replicas"),
    (["--gpus-per-node", "4", "--ntasks-per-node", "2"], "--gpus-per-node 4 does not match"),
    (["--time", "1:00"], "leaves no time before the preemption warning"),
    (["--set", "model.hiden_dim=3"], "model.hiden_dim: unknown key"),
    (["--backend", "single"], "invalid choice"),
])
def test_bad_requests_are_one_line_exit_2_and_nothing_written(tmp_path: Path, args, needle):
    run_dir = tmp_path / "run"
    done = subprocess.run([STRATA, "slurm", "submit", str(CONFIGS / "classifier.yaml"), *args,
                           "--set", f"run_dir={run_dir}"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("strata: error: ") and needle in lines[0], done.stderr
    assert not run_dir.exists() and "Traceback" not in done.stderr
