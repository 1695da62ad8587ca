"""The peak FLOP/s MFU is measured against: a matmul probe at the run's dtype, cached per host and device.

Machines of the same kind differ (an Intel CPU with AMX runs bf16 matmuls several times faster than fp32; an
AMD EPYC with AVX-512 BF16 does not), so the peak is never a table entry: it is measured here, on this
process's device, at the dtype the model computes in, by timing chained square matmuls in one compiled
function. It is cached (STRATA_CACHE_DIR, else $XDG_CACHE_HOME/strata, else ~/.cache/strata: peak.json)
under a key naming the host, the device, the TensorFlow version, the dtype, the threads the process may use
and how many training processes share the host. An entry is used only when every one of these matches and
it is younger than MAX_AGE_S: a stale entry is measured again, one from another host, device or TensorFlow
version is never used. `train.peak_tflops` in the config skips the probe (a figure from a datasheet).

Everything but `measure` is pure or file I/O; TensorFlow is imported inside `measure` only.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from launch.contract import LAUNCHER_LOCAL_SIZE_VARS, env_int

CACHE_FILE = "peak.json"
MAX_AGE_S = 7 * 24 * 3600.0  # a week: drivers, microcode and clocks change under a host's name
KEY_FIELDS = ("host", "device", "tensorflow", "dtype", "threads", "processes")


def cache_path(environ: Mapping[str, str] = os.environ) -> Path:
    """Where measured peaks are kept (pure)."""
    if environ.get("STRATA_CACHE_DIR"):
        return Path(environ["STRATA_CACHE_DIR"]) / CACHE_FILE
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME", "~")).expanduser() / ".cache")
    return Path(base) / "strata" / CACHE_FILE


def local_processes(environ: Mapping[str, str] = os.environ) -> int:
    """Training processes on this host, from the launcher's variables (1 when started alone) (pure). They
    probe at the same time, so each measures its share of the host: the key keeps shares and wholes apart."""
    return max(env_int(environ, LAUNCHER_LOCAL_SIZE_VARS, 1), 1)


def cpu_model(cpuinfo: str) -> str:
    """The CPU's model name from /proc/cpuinfo text ("cpu" when it names none) (pure)."""
    for line in cpuinfo.splitlines():
        if line.lower().startswith(("model name", "hardware", "cpu model")) and ":" in line:
            return line.split(":", 1)[1].strip()
    return "cpu"


def cache_key(*, host: str, device: str, tensorflow: str, dtype: str, threads: int, processes: int) -> dict:
    """Everything a measured peak depends on: a cached entry is used only if all of it matches (pure)."""
    return {"host": host, "device": device, "tensorflow": tensorflow, "dtype": dtype, "threads": threads,
            "processes": processes}


def _key_text(key: Mapping) -> str:
    return "|".join(str(key[f]) for f in KEY_FIELDS)


def lookup(cache: Mapping, key: Mapping, *, now: float, max_age_s: float = MAX_AGE_S) -> float | None:
    """The cached peak (FLOP/s) for `key`, or None when absent, foreign (any field differs), stale, from the
    future or not a positive number (pure)."""
    entry = cache.get(_key_text(key)) if isinstance(cache, Mapping) else None
    if not isinstance(entry, Mapping) or any(entry.get(f) != key[f] for f in KEY_FIELDS):
        return None
    flops, measured = entry.get("flops"), entry.get("measured_at")
    if not isinstance(flops, (int, float)) or flops <= 0 or not isinstance(measured, (int, float)):
        return None
    return float(flops) if 0 <= now - measured <= max_age_s else None


def with_entry(cache: Mapping, key: Mapping, flops: float, *, now: float) -> dict:
    """A copy of `cache` holding `flops` for `key`, measured at `now` (pure)."""
    return {**cache, _key_text(key): {**key, "flops": float(flops), "measured_at": now}}


def read_cache(path: Path) -> dict:
    """The cache file's entries; {} when missing or unreadable (a bad cache costs a probe, never the run)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(path: Path, cache: Mapping) -> None:
    """Replace the cache file atomically; a cache that cannot be written is skipped silently."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass


def device_key(dtype: str, environ: Mapping[str, str] = os.environ) -> dict:
    """The cache key of this process's first device (GPU if any, else the CPU) at `dtype`."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        device = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "gpu")
        threads = 0
    else:
        try:
            device = cpu_model(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
        except OSError:
            device = "cpu"
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        intra = tf.config.threading.get_intra_op_parallelism_threads()
        threads = min(cores, intra) if intra > 0 else cores
    return cache_key(host=socket.gethostname(), device=device, tensorflow=tf.__version__, dtype=dtype,
                     threads=threads, processes=local_processes(environ))


def measure(dtype: str, *, size: int | None = None, seconds: float = 1.0, chain: int = 4) -> float:
    """FLOP/s of `chain` chained [size, size] matmuls in one compiled function on the default device at
    `dtype`: the best of repeats over about `seconds` (the first call, which compiles, is not timed)."""
    import tensorflow as tf

    gpu = bool(tf.config.list_physical_devices("GPU"))
    size = size or (8192 if gpu else 2048)
    a = tf.cast(tf.random.stateless_normal([size, size], seed=[1, 2]), dtype)
    # Scaled so the chain's values stay O(1): no inf/denormals slowing (or flattering) the product.
    b = tf.cast(tf.random.stateless_normal([size, size], seed=[3, 4]) / size ** 0.5, dtype)

    @tf.function
    def products(x):
        for _ in range(chain):
            x = tf.matmul(x, b)
        return tf.reduce_sum(tf.cast(x[:1], tf.float32))

    float(products(a))
    return chain * 2.0 * size ** 3 / best_time(lambda: float(products(a)), seconds)


def best_time(run: Callable[[], Any], seconds: float) -> float:
    """The shortest wall time of `run()` (which must wait for its own result) over repeats filling about
    `seconds`, at least one."""
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def peak_flops(dtype: str, *, cache_file: Path | None = None, now: float | None = None) -> tuple[float, str]:
    """(FLOP/s of this process's device at `dtype`, where it came from: "cached" or "measured")."""
    path = cache_file or cache_path()
    key, now = device_key(dtype), time.time() if now is None else now
    cache = read_cache(path)
    cached = lookup(cache, key, now=now)
    if cached is not None:
        return cached, "cached"
    flops = measure(dtype)
    write_cache(path, with_entry(read_cache(path), key, flops, now=now))  # re-read: another rank may have written
    return flops, "measured"
