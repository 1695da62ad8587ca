"""Each rank's environment: the only channel (besides argv and the config file) from launcher to worker.

Pure functions, except `free_ports`, which asks the kernel for unused ports.
"""
from __future__ import annotations

import json
import socket
from collections.abc import Mapping

from launch import contract
from launch.contract import MANAGED_KEYS
from launch.errors import LaunchError
from launch.hosts import RankPlacement


def tf_config(worker_addresses: list[str], index: int) -> str:
    """The TF_CONFIG JSON MultiWorkerMirroredStrategy reads: every worker's `host:port`, and which one this is."""
    if not worker_addresses:
        raise LaunchError("TF_CONFIG needs at least one worker address")
    for address in worker_addresses:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise LaunchError(f"worker address {address!r} is not host:port (e.g. localhost:12345)")
    if len(set(worker_addresses)) != len(worker_addresses):
        raise LaunchError(f"worker addresses repeat: {worker_addresses}; each worker needs its own port")
    if not 0 <= index < len(worker_addresses):
        raise LaunchError(f"worker index {index} is outside 0..{len(worker_addresses) - 1}")
    return json.dumps({"cluster": {"worker": list(worker_addresses)}, "task": {"type": "worker", "index": index}})


def _gpus_for(placement: RankPlacement, visible_gpus: list[int]) -> str:
    """This rank's share of the host's GPUs: an equal, contiguous slice chosen by local rank.

    With more GPUs than ranks the remainder stays unused (uneven shares would give ranks different speeds);
    with fewer we refuse, because two TensorFlow processes on one GPU each try to take all of its memory.
    An empty list hides every GPU (CPU-only run).
    """
    if not visible_gpus:
        return ""
    if any(g < 0 for g in visible_gpus) or len(set(visible_gpus)) != len(visible_gpus):
        raise LaunchError(f"visible GPUs {visible_gpus} must be distinct GPU indices >= 0")
    per_rank = len(visible_gpus) // placement.local_size
    if per_rank == 0:
        raise LaunchError(f"{placement.local_size} ranks on {placement.host} but only {len(visible_gpus)} GPU(s) "
                          f"{visible_gpus}; lower -np or the slots of {placement.host}, or give more GPUs")
    start = placement.local_rank * per_rank
    return ",".join(str(g) for g in visible_gpus[start:start + per_rank])


def rank_env(placement: RankPlacement, *, world_size: int, backend: str, tf_config_json: str | None,
             visible_gpus: list[int] | None = None) -> dict[str, str]:
    """The variables one rank needs (to be laid over the inherited environment, see `child_environ`).

    TF_CONFIG is set exactly for the multi_worker backend (it is required there and harmful elsewhere).
    CUDA_VISIBLE_DEVICES is set only when `visible_gpus` is given (the GPU indices of this rank's host);
    otherwise the inherited value, if any, is left alone.
    """
    if not 0 <= placement.rank < world_size:
        raise LaunchError(f"rank {placement.rank} is outside a world of {world_size}")
    if not backend:
        raise LaunchError("backend is empty")
    if backend == "multi_worker" and tf_config_json is None:
        raise LaunchError("the multi_worker backend needs TF_CONFIG (worker addresses); got none")
    if backend != "multi_worker" and tf_config_json is not None:
        raise LaunchError(f"TF_CONFIG is only for the multi_worker backend, not {backend!r}")
    env = {
        contract.ENV_RANK: str(placement.rank),
        contract.ENV_WORLD_SIZE: str(world_size),
        contract.ENV_LOCAL_RANK: str(placement.local_rank),
        contract.ENV_LOCAL_SIZE: str(placement.local_size),
        contract.ENV_BACKEND: backend,
    }
    if tf_config_json is not None:
        env[contract.ENV_TF_CONFIG] = tf_config_json
    if visible_gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = _gpus_for(placement, visible_gpus)
    return env


def child_environ(base: Mapping[str, str], overrides: Mapping[str, str]) -> dict[str, str]:
    """A complete child environment: `base` (usually os.environ) without launcher-owned keys, then `overrides`."""
    env = {k: v for k, v in base.items() if k not in MANAGED_KEYS}
    env.update(overrides)
    return env


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports that were free a moment ago on `host`.

    All sockets stay bound until every port is chosen, so the kernel cannot hand out the same port twice.
    Another process may still take a port between now and the worker's bind; callers starting a cluster
    should treat a bind failure as retryable.
    """
    if n < 0:
        raise LaunchError(f"cannot reserve {n} ports")
    sockets: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
