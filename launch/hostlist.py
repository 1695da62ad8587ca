"""SLURM's compact host and task-count notations, expanded (pure: the same answers as `scontrol show hostnames`,
without needing SLURM; the tests compare both on the local cluster).

    expand_hostlist("gpu[01-04,07],login2")  -> ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "login2"]
    expand_hostlist("rack[1-2]-n[1-2]")      -> ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]
    expand_counts("2(x3),1")                 -> [2, 2, 2, 1]     (SLURM_TASKS_PER_NODE)

Ranges keep the zero padding of their lower bound (`[08-11]` -> 08 09 10 11), as SLURM does.
"""
from __future__ import annotations

import itertools
import re

from launch.errors import LaunchError

_COUNT = re.compile(r"(\d+)(?:\(x(\d+)\))?")


def _split_top_level(expr: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise LaunchError(f"host list {expr!r}: nested brackets are not allowed")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"host list {expr!r}: ']' without '['")
        elif ch == "," and depth == 0:
            items.append(expr[start:i])
            start = i + 1
    if depth:
        raise LaunchError(f"host list {expr!r}: '[' without ']'")
    items.append(expr[start:])
    return items


def _expand_range_set(body: str, expr: str) -> list[str]:
    """`01-04,07` -> ['01', '02', '03', '04', '07']."""
    out: list[str] = []
    for part in body.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise LaunchError(f"host list {expr!r}: [{body}] must hold numbers or ranges like 01-04")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise LaunchError(f"host list {expr!r}: range {part} runs backwards; write {hi}-{lo}")
        width = len(lo)
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def expand_hostlist(expr: str) -> list[str]:
    """Every host name of a SLURM host list expression, in order."""
    if not expr or not expr.strip():
        raise LaunchError("host list is empty")
    hosts: list[str] = []
    for item in _split_top_level(expr.strip()):
        if not item:
            raise LaunchError(f"host list {expr!r} has an empty entry (stray comma?)")
        # Alternate literal text and bracket groups; the names are their cartesian product.
        pieces = re.split(r"\[([^\]]*)\]", item)
        choices = [[p] if i % 2 == 0 else _expand_range_set(p, expr) for i, p in enumerate(pieces)]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def expand_counts(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE / SLURM_JOB_CPUS_PER_NODE notation: `2(x3),1` -> [2, 2, 2, 1]."""
    if not spec or not spec.strip():
        raise LaunchError("task count list is empty")
    counts: list[int] = []
    for part in spec.strip().split(","):
        m = _COUNT.fullmatch(part.strip())
        if not m:
            raise LaunchError(f"task counts {spec!r}: cannot read {part!r}; expected N or N(xR), e.g. 2(x3),1")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts
