"""How `strata plan` and the pipeline's messages write numbers: short, with units people read."""
from __future__ import annotations


def num(x: float) -> str:
    """A short number: 3, 2.5, 0.125 (no trailing zeros, no float noise)."""
    return f"{x:.4g}"


def ms(seconds: float) -> str:
    """Seconds shown in milliseconds with the unit, as the level-cost table shows them: 1.25 ms."""
    return f"{num(seconds * 1e3)} ms"


def plural(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"


def count(n: float) -> str:
    """Parameter counts as people say them: 950, 12.3K, 1.2M, 7.0B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def nbytes(n: float) -> str:
    """Bytes in binary units: 512 B, 12.0 MiB, 1.5 GiB."""
    for unit, size in (("TiB", 2.0**40), ("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"

