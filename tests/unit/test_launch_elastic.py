"""Elastic launch, pure parts: the horovodrun command and the discovery-script checks."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest

from launch.elastic_checks import ElasticSpec, check_sizes, discover_hosts
from launch.errors import LaunchError
from launch.horovod import horovodrun_elastic_argv
from launch.hosts import Host


def test_elastic_argv_all_local():
    argv = horovodrun_elastic_argv(np=2, min_np=1, max_np=2, discovery_script="/d.sh", command=["python", "x"],
                                   local_only=True, cooldown_range=(1, 2))
    assert argv == ["horovodrun", "-np", "2", "--min-np", "1", "--max-np", "2", "--host-discovery-script", "/d.sh",
                    "--gloo", "--network-interfaces", "lo", "--blacklist-cooldown-range", "1", "2", "python", "x"]


def test_elastic_argv_remote_hosts_and_no_cooldown():
    argv = horovodrun_elastic_argv(np=4, min_np=2, max_np=8, discovery_script="d", command=["p"], local_only=False)
    assert "--network-interfaces" not in argv and "--blacklist-cooldown-range" not in argv


@pytest.mark.parametrize("sizes", [(0, 1, 2), (3, 2, 4), (1, 3, 2)])
def test_elastic_sizes_must_be_ordered(sizes):
    min_np, np, max_np = sizes
    with pytest.raises(LaunchError, match="min-np"):
        horovodrun_elastic_argv(np=np, min_np=min_np, max_np=max_np, discovery_script="d", command=["p"],
                                local_only=True)
    with pytest.raises(LaunchError, match="min-np"):
        check_sizes(ElasticSpec(min_np, max_np, "d"), np)


def test_cooldown_bounds():
    with pytest.raises(LaunchError, match="1 <= LO <= HI <= 3600"):
        horovodrun_elastic_argv(np=1, min_np=1, max_np=1, discovery_script="d", command=["p"], local_only=True,
                                cooldown_range=(0, 5))


def _script(tmp_path: Path, body: str, executable: bool = True) -> str:
    path = tmp_path / "discover.sh"
    path.write_text(f"#!/bin/sh\n{body}\n")
    if executable:
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_discovery_script_output_is_parsed(tmp_path: Path):
    assert discover_hosts(_script(tmp_path, "echo localhost:1; echo 127.0.0.1:1")) == [Host("localhost", 1),
                                                                                       Host("127.0.0.1", 1)]


@pytest.mark.parametrize("body, executable, fragment", [
    ("echo localhost:1", False, "is not executable"),
    ("exit 3", True, "exited with code 3"),
    ("true", True, "printed no hosts"),
    ("echo 'bad host:x'", True, "output:"),
])
def test_discovery_script_problems_are_one_line(tmp_path: Path, body, executable, fragment):
    with pytest.raises(LaunchError, match=fragment):
        discover_hosts(_script(tmp_path, body, executable))
