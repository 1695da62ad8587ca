"""Pure launcher helpers: host specs, rank placement, per-rank environment, horovodrun/mpirun command lines."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from launch.env import MANAGED_KEYS, child_environ, free_ports, rank_env, tf_config
from launch.errors import LaunchError
from launch.horovod import horovodrun_argv
from launch.hosts import Host, assign_ranks, hosts_spec, is_local, parse_hostfile, parse_hosts

CMD = ["python", "-m", "trainer", "train", "c.yaml"]


# ---------------------------------------------------------------- parse_hosts
@pytest.mark.parametrize("spec, expected", [
    ("localhost:2", [Host("localhost", 2)]),
    ("host1:2,host2:4,host3", [Host("host1", 2), Host("host2", 4), Host("host3", 1)]),
    (" a:1 , b ", [Host("a", 1), Host("b", 1)]),
    ("10.0.0.2:8,node_1.cluster-x:3", [Host("10.0.0.2", 8), Host("node_1.cluster-x", 3)]),
])
def test_parse_hosts(spec, expected):
    assert parse_hosts(spec) == expected


@pytest.mark.parametrize("spec, fragment", [
    ("", "-H is empty"),
    ("   ", "-H is empty"),
    (":2", "no host name"),
    ("a:2,,b", "empty entry"),
    ("a:2,", "empty entry"),
    ("a:x", "slots 'x' is not a whole number"),
    ("a:2.5", "slots '2.5' is not a whole number"),
    ("a:-1", "slots '-1' is not a whole number"),
    ("a:", "slots '' is not a whole number"),
    ("a:0", "slots must be at least 1"),
    ("a:2,b:1,A:1", "host 'A' is listed twice"),
    ("a b:2", "host name 'a b' may only contain"),
    ("a/b", "may only contain"),
    ("-oProxyCommand=x:1", "may only contain"),
    ("a;rm:1", "may only contain"),
    ("300.1.1.1:2", "not a valid IPv4 address"),
    ("10.0.1:2", "not a valid IPv4 address"),
    ("::1:2", "more than one ':'"),
])
def test_parse_hosts_errors_are_one_line_and_name_the_token(spec, fragment):
    with pytest.raises(LaunchError) as info:
        parse_hosts(spec)
    message = str(info.value)
    assert fragment in message and "\n" not in message
    assert isinstance(info.value, ValueError)


def test_parse_hosts_error_suggests_the_fix():
    with pytest.raises(LaunchError, match=r"write a:N with N >= 1"):
        parse_hosts("a:0")
    with pytest.raises(LaunchError, match=r"-H entry 'a:2,b'|-H entry 'b:zz'"):
        parse_hosts("a:2,b:zz")


# ---------------------------------------------------------------- parse_hostfile
def test_parse_hostfile_all_forms(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("# cluster\n\nnode1 slots=4\nnode2:2   # half a box\n  node3  \n10.0.0.9 slots=1\n")
    assert parse_hostfile(f) == [Host("node1", 4), Host("node2", 2), Host("node3", 1), Host("10.0.0.9", 1)]


@pytest.mark.parametrize("text, fragment", [
    ("a slots=2\nb slots=x\n", ":2: slots 'x' is not a whole number"),
    ("a slots=2\nb max_slots=4\n", ":2: cannot read 'b max_slots=4'"),
    ("a:2 slots=3\n", ":1: cannot read"),
    ("a slots=2\n\n# c\na slots=1\n", ":4: host 'a' is listed twice (first line 1)"),
    ("bad!host\n", ":1: host name 'bad!host' may only contain"),
    ("a slots=0\n", ":1: slots must be at least 1"),
    ("# nothing\n\n", "lists no hosts"),
])
def test_parse_hostfile_errors_name_file_and_line(tmp_path, text, fragment):
    f = tmp_path / "hosts.txt"
    f.write_text(text)
    with pytest.raises(LaunchError) as info:
        parse_hostfile(f)
    assert str(f) in str(info.value) and fragment in str(info.value)


def test_parse_hostfile_missing(tmp_path):
    with pytest.raises(LaunchError, match="not found"):
        parse_hostfile(tmp_path / "nope")


# ---------------------------------------------------------------- assign_ranks
def _table(placements):
    return [(p.rank, p.host, p.local_rank, p.local_size, p.cross_rank, p.cross_size) for p in placements]


def test_assign_ranks_fills_hosts_in_order():
    assert _table(assign_ranks(parse_hosts("localhost:2,node2:2"), 4)) == [
        (0, "localhost", 0, 2, 0, 2), (1, "localhost", 1, 2, 0, 2),
        (2, "node2", 0, 2, 1, 2), (3, "node2", 1, 2, 1, 2)]


def test_assign_ranks_uneven_slots_np4():
    assert _table(assign_ranks(parse_hosts("a:3,b:1"), 4)) == [
        (0, "a", 0, 3, 0, 2), (1, "a", 1, 3, 0, 1), (2, "a", 2, 3, 0, 1), (3, "b", 0, 1, 1, 2)]


def test_assign_ranks_uneven_slots_np3_leaves_b_unused():
    assert _table(assign_ranks(parse_hosts("a:3,b:1"), 3)) == [
        (0, "a", 0, 3, 0, 1), (1, "a", 1, 3, 0, 1), (2, "a", 2, 3, 0, 1)]


def test_assign_ranks_partial_host_local_size_counts_ranks_not_slots():
    placements = assign_ranks(parse_hosts("a:2,b:4"), 4)
    assert [(p.host, p.local_size) for p in placements] == [("a", 2), ("a", 2), ("b", 2), ("b", 2)]


def test_assign_ranks_errors():
    with pytest.raises(LaunchError, match=r"^-np must be at least 1$"):
        assign_ranks(parse_hosts("a:2"), 0)
    with pytest.raises(LaunchError) as info:
        assign_ranks(parse_hosts("localhost:2,node2:2"), 5)
    assert str(info.value) == "-np 5 exceeds the 4 slots of localhost:2,node2:2; add hosts or lower -np"
    with pytest.raises(LaunchError, match="no hosts"):
        assign_ranks([], 1)


def test_hosts_spec_round_trips():
    assert hosts_spec(parse_hosts("a:3,b")) == "a:3,b:1"


def test_is_local():
    assert is_local("localhost") and is_local("127.0.0.1") and is_local("127.0.1.1") and is_local(Host("LocalHost"))
    assert is_local(socket.gethostname())
    me = "node7.cluster.example"
    assert is_local("node7", hostname=me) and is_local("NODE7.cluster.example", hostname=me)
    assert not is_local("node8", hostname="node7") and not is_local("10.0.0.2", hostname="node7")


# ---------------------------------------------------------------- env
def test_tf_config_json():
    doc = json.loads(tf_config(["localhost:1111", "localhost:2222"], 1))
    assert doc == {"cluster": {"worker": ["localhost:1111", "localhost:2222"]},
                   "task": {"type": "worker", "index": 1}}


@pytest.mark.parametrize("addresses, index, fragment", [
    ([], 0, "at least one"), (["localhost"], 0, "not host:port"), (["a:0"], 0, "not host:port"),
    (["a:1", "a:1"], 0, "repeat"), (["a:1", "a:2"], 2, "outside 0..1"), (["a:1"], -1, "outside"),
])
def test_tf_config_errors(addresses, index, fragment):
    with pytest.raises(LaunchError, match=fragment):
        tf_config(addresses, index)


def test_rank_env_horovod():
    p = assign_ranks(parse_hosts("localhost:2"), 2)[1]
    assert rank_env(p, world_size=2, backend="horovod", tf_config_json=None) == {
        "STRATA_RANK": "1", "STRATA_WORLD_SIZE": "2", "STRATA_LOCAL_RANK": "1", "STRATA_LOCAL_SIZE": "2",
        "STRATA_BACKEND": "horovod"}


def test_rank_env_multi_worker_sets_tf_config():
    placements = assign_ranks(parse_hosts("a:1,b:1"), 2)
    cfg = tf_config(["a:5000", "b:5000"], 1)
    env = rank_env(placements[1], world_size=2, backend="multi_worker", tf_config_json=cfg)
    assert env["TF_CONFIG"] == cfg and env["STRATA_RANK"] == "1" and env["STRATA_LOCAL_RANK"] == "0"
    assert "CUDA_VISIBLE_DEVICES" not in env
    with pytest.raises(LaunchError, match="needs TF_CONFIG"):
        rank_env(placements[0], world_size=2, backend="multi_worker", tf_config_json=None)
    with pytest.raises(LaunchError, match="only for the multi_worker"):
        rank_env(placements[0], world_size=2, backend="horovod", tf_config_json=cfg)
    with pytest.raises(LaunchError, match="outside a world of 1"):
        rank_env(placements[1], world_size=1, backend="horovod", tf_config_json=None)


@pytest.mark.parametrize("spec, np, gpus, expected", [
    ("a:2", 2, [0, 1], ["0", "1"]),
    ("a:2", 2, [4, 5, 6, 7], ["4,5", "6,7"]),
    ("a:2", 2, [0, 1, 2], ["0", "1"]),          # remainder unused: equal shares
    ("a:1,b:1", 2, [3], ["3", "3"]),            # chosen by LOCAL rank: each host's first GPU
    ("a:2", 2, [], ["", ""]),                   # empty list hides GPUs
])
def test_rank_env_visible_gpus(spec, np, gpus, expected):
    placements = assign_ranks(parse_hosts(spec), np)
    envs = [rank_env(p, world_size=np, backend="horovod", tf_config_json=None, visible_gpus=gpus) for p in placements]
    got = [env["CUDA_VISIBLE_DEVICES"] for env in envs]
    assert got == expected


def test_rank_env_too_few_gpus():
    p = assign_ranks(parse_hosts("a:2"), 2)[0]
    with pytest.raises(LaunchError, match="2 ranks on a but only 1 GPU"):
        rank_env(p, world_size=2, backend="horovod", tf_config_json=None, visible_gpus=[0])


def test_child_environ_drops_stale_launcher_keys():
    base = {"PATH": "/bin", "TF_CONFIG": "stale", "STRATA_RANK": "9", "CUDA_VISIBLE_DEVICES": "0"}
    env = child_environ(base, {"STRATA_RANK": "0"})
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0", "STRATA_RANK": "0"}
    assert "TF_CONFIG" in MANAGED_KEYS and base["TF_CONFIG"] == "stale"


def test_free_ports_distinct_and_bindable():
    ports = free_ports(8)
    assert len(ports) == len(set(ports)) == 8 and all(1024 <= p < 65536 for p in ports)
    with socket.socket() as s:  # released: a worker can bind it now
        s.bind(("127.0.0.1", ports[0]))
    assert free_ports(0) == []


# ---------------------------------------------------------------- horovodrun
def test_horovodrun_gloo_local():
    argv = horovodrun_argv(np=2, hosts=parse_hosts("localhost:2"), controller="gloo", command=CMD)
    assert argv == ["horovodrun", "-np", "2", "-H", "localhost:2", "--gloo", "--network-interfaces", "lo", *CMD]


def test_horovodrun_gloo_remote():
    argv = horovodrun_argv(np=3, hosts=parse_hosts("node1:2,node2:2"), controller="gloo", command=CMD, as_root=True)
    assert argv == ["horovodrun", "-np", "3", "-H", "node1:2,node2:2", "--gloo", *CMD]


def test_horovodrun_mpi_root():
    argv = horovodrun_argv(np=2, hosts=parse_hosts("localhost:2"), controller="mpi", command=CMD, as_root=True)
    assert argv == ["horovodrun", "-np", "2", "-H", "localhost:2", "--mpi", "--network-interfaces", "lo",
                    "--mpi-args=--allow-run-as-root --oversubscribe", *CMD]


def test_horovodrun_mpi_non_root():
    hosts = parse_hosts("localhost:2")
    assert horovodrun_argv(np=2, hosts=hosts, controller="mpi", command=CMD, as_root=False) == [
        "horovodrun", "-np", "2", "-H", "localhost:2", "--mpi", "--network-interfaces", "lo", *CMD]


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(np=3), "-np 3 exceeds the 2 slots of localhost:2"),
    (dict(np=0), "-np must be at least 1"),
    (dict(controller="jsrun"), "'gloo' or 'mpi'"),
    (dict(command=[]), "no command"),
])
def test_horovodrun_errors(kwargs, fragment):
    args = {**dict(np=2, hosts=parse_hosts("localhost:2"), controller="gloo", command=CMD), **kwargs}
    with pytest.raises(LaunchError, match=fragment):
        horovodrun_argv(**args)


def test_launch_package_never_imports_the_trainer_or_frameworks():
    import ast
    from pathlib import Path

    import launch
    for path in Path(launch.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in ("trainer", "tensorflow", "horovod"), f"{path.name} imports {name}"


def test_tensorboard_serves_the_run_under_its_own_name(tmp_path):
    """TensorBoard names a run after its folder relative to --logdir ("." for the event folder itself): it is
    given a folder holding one link named after the run, one such folder per run directory."""
    from launch.tensorboard import link_run, tensorboard_argv, view_dir

    root = tmp_path / "views"
    view, name = view_dir("runs/my-run/", root)
    assert name == "my-run" and view.parent == root
    assert view_dir(str(Path("runs/my-run").resolve()), root) == (view, name)  # same run, same folder
    assert view_dir("other/my-run", root)[0] != view  # same name elsewhere: another folder
    argv = tensorboard_argv("runs/my-run", host="127.0.0.1", port=6007, root=root)
    assert argv[1:] == ["-m", "tensorboard.main", "--logdir", str(view), "--host", "127.0.0.1", "--port", "6007"]
    run = tmp_path / "my-run"
    (run / "tensorboard").mkdir(parents=True)
    link = link_run(str(run), root)
    assert link.name == "my-run" and link.resolve() == (run / "tensorboard").resolve()
    assert link_run(str(run), root) == link and [p.name for p in link.parent.iterdir()] == ["my-run"]


def test_doctor_lines_are_printable_text():
    from launch.doctor import printable

    assert printable("Open MPI v4.1.4, May 26, 2022\x00") == "Open MPI v4.1.4, May 26, 2022"
    assert printable("a\tb\nc\x1b[0m") == "a\tb\nc[0m"
