"""Hosts and rank placement for multi-process launches (pure: no processes, no network).

`-H host1:2,host2:2` and hostfiles use the same rules as horovodrun and Open MPI so the same spec can be
handed to either: a host name is letters, digits, '.', '-', '_' or an IPv4 address, slots default to 1.
Ranks fill hosts in the order given (all of host1's slots before host2), which is what horovodrun does and
what `mpirun --map-by slot` does, so `assign_ranks` predicts the placement every backend will use.
"""
from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

from launch.errors import LaunchError

_NAME = re.compile(r"[A-Za-z0-9._-]+")
_DOTTED = re.compile(r"[0-9.]+")  # all digits and dots: must then be a valid IPv4 address
_FIX = "write -H host1:slots,host2:slots (e.g. -H localhost:2)"


@dataclass(frozen=True)
class Host:
    """One machine and how many ranks (slots) it may run."""

    name: str
    slots: int = 1

    def __str__(self) -> str:  # the `host:slots` form horovodrun and mpirun accept
        return f"{self.name}:{self.slots}"


@dataclass(frozen=True)
class RankPlacement:
    """Where one rank runs. cross_rank/cross_size follow Horovod: the rank's index among the ranks with the
    same local_rank on other hosts, and how many such ranks there are (used by hierarchical allreduce)."""

    rank: int
    host: str
    local_rank: int
    local_size: int
    cross_rank: int
    cross_size: int


def hosts_spec(hosts: list[Host]) -> str:
    """`host1:2,host2:2`: the -H value horovodrun and mpirun both accept."""
    return ",".join(str(h) for h in hosts)


def _check_name(name: str, where: str) -> None:
    if not name:
        raise LaunchError(f"{where} has no host name; write host:slots, e.g. localhost:2")
    # A leading '-' would be read as an option by mpirun/ssh; a leading '.' is never a valid name.
    if not _NAME.fullmatch(name) or name[0] in "-.":
        raise LaunchError(f"{where}: host name {name!r} may only contain letters, digits, '.', '-', '_' "
                          "and must not start with '-' or '.' (or be an IPv4 address)")
    if _DOTTED.fullmatch(name):
        parts = name.split(".")
        if len(parts) != 4 or any(not p or int(p) > 255 for p in parts):
            raise LaunchError(f"{where}: {name!r} is not a valid IPv4 address "
                              "(expected four numbers 0-255, e.g. 10.0.0.2)")


def _parse_slots(text: str, where: str, name: str) -> int:
    if not text.isdigit():  # rejects '', '-1', '2.5', ' 2'
        raise LaunchError(f"{where}: slots {text!r} is not a whole number; write {name}:N with N >= 1")
    slots = int(text)
    if slots < 1:
        raise LaunchError(f"{where}: slots must be at least 1; write {name}:N with N >= 1 or leave the host out")
    return slots


def _add(hosts: list[Host], seen: dict[str, str], host: Host, where: str, first_where_fmt: str) -> None:
    # Duplicates are refused rather than summed: `a:2,a:2` is more often a typo than a wish for 4 slots.
    key = host.name.lower()  # host names are case-insensitive
    if key in seen:
        raise LaunchError(f"{where}: host {host.name!r} is listed twice (first {seen[key]}); "
                          f"give each host once with its total slots")
    seen[key] = first_where_fmt
    hosts.append(host)


def parse_hosts(spec: str) -> list[Host]:
    """Parse `-H host1:slots,host2:slots` (slots default to 1). Raises LaunchError with a one-line message."""
    if not spec or not spec.strip():
        raise LaunchError(f"-H is empty; {_FIX}")
    hosts: list[Host] = []
    seen: dict[str, str] = {}
    for raw in spec.split(","):
        token = raw.strip()
        if not token:
            raise LaunchError(f"-H {spec!r} has an empty entry (stray comma?); {_FIX}")
        where = f"-H entry {token!r}"
        name, sep, slots_text = token.partition(":")
        if ":" in slots_text:
            raise LaunchError(f"{where} has more than one ':' (IPv6 addresses are not supported); write host:slots")
        _check_name(name, where)
        slots = _parse_slots(slots_text, where, name) if sep else 1
        _add(hosts, seen, Host(name, slots), where, repr(token))
    return hosts


def parse_hostfile(path: str | Path) -> list[Host]:
    """Parse a hostfile: one host a line as `host slots=N`, `host:N` or `host`; `#` starts a comment.

    Errors name the file and line: `hosts.txt:3: ...`.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise LaunchError(f"hostfile {str(path)!r} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise LaunchError(f"hostfile {str(path)!r} cannot be read: {err}") from None
    hosts: list[Host] = []
    seen: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        where = f"{path}:{number}"
        fields = content.split()
        name, sep, slots_text = fields[0].partition(":")
        if ":" in slots_text:
            raise LaunchError(f"{where}: {fields[0]!r} has more than one ':'; write `host slots=N` or `host:N`")
        _check_name(name, where)
        slots = _parse_slots(slots_text, where, name) if sep else 1
        rest = fields[1:]
        if rest:
            if sep or len(rest) > 1 or not rest[0].startswith("slots="):
                raise LaunchError(f"{where}: cannot read {content!r}; write `host slots=N`, `host:N` or `host`")
            slots = _parse_slots(rest[0][len("slots="):], where, name)
        _add(hosts, seen, Host(name, slots), where, f"line {number}")
    if not hosts:
        raise LaunchError(f"hostfile {str(path)!r} lists no hosts; add lines like `localhost slots=2`")
    return hosts


def assign_ranks(hosts: list[Host], np: int) -> list[RankPlacement]:
    """Place `np` ranks on `hosts`, filling each host's slots in order (as horovodrun and `--map-by slot` do).

    Hosts left without a rank are simply unused. local_size counts the ranks really placed on a host, not
    its slots.
    """
    if np < 1:
        raise LaunchError("-np must be at least 1")
    if not hosts:
        raise LaunchError(f"no hosts to run on; {_FIX}")
    total = sum(h.slots for h in hosts)
    if np > total:
        raise LaunchError(f"-np {np} exceeds the {total} slots of {hosts_spec(hosts)}; add hosts or lower -np")
    per_host: list[tuple[Host, list[int]]] = []
    rank = 0
    for host in hosts:
        ranks = list(range(rank, min(rank + host.slots, np)))
        rank += len(ranks)
        if ranks:
            per_host.append((host, ranks))
    # Hosts that have a rank with local_rank l, in host order: the cross communicator of that local rank.
    cross: dict[int, list[str]] = {}
    for host, ranks in per_host:
        for local_rank in range(len(ranks)):
            cross.setdefault(local_rank, []).append(host.name)
    out: list[RankPlacement] = []
    for host, ranks in per_host:
        for local_rank, r in enumerate(ranks):
            peers = cross[local_rank]
            out.append(RankPlacement(rank=r, host=host.name, local_rank=local_rank, local_size=len(ranks),
                                     cross_rank=peers.index(host.name), cross_size=len(peers)))
    return out


def is_local(host: str | Host, *, hostname: str | None = None) -> bool:
    """Whether `host` names this machine: localhost, a 127.x.y.z loopback address, or this host's name
    (full or short form, case-insensitive). `hostname` overrides socket.gethostname() (for tests).

    No DNS lookup: this must be instant and must not hang on a broken resolver.
    """
    name = (host.name if isinstance(host, Host) else host).lower()
    if name == "localhost" or name.startswith("127."):
        return True
    me = (hostname if hostname is not None else socket.gethostname()).lower()
    return bool(me) and name in (me, me.split(".", 1)[0])
