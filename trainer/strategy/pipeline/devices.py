"""One device per pipeline stage for this process, and how much memory each has."""
from __future__ import annotations

import tensorflow as tf

from trainer.config import PipelineConfig
from trainer.errors import ConfigError
from trainer.parallel.layout import stage_device_names


def stage_devices(pipe: PipelineConfig, local_rank: int = 0) -> list[str]:
    """One device per stage for this process: explicit `devices`, else the local rank's block of K GPUs,
    else K logical CPU devices (created here: call before TensorFlow's runtime starts)."""
    k = pipe.stages
    if pipe.devices is not None:
        _check_devices_exist(pipe.devices)
        return list(pipe.devices)
    gpus = len(tf.config.list_physical_devices("GPU"))
    if gpus:
        names = stage_device_names(k, local_rank, gpus)
        if (local_rank + 1) * k > gpus:
            raise ConfigError(
                f"local rank {local_rank} needs GPUs {names[0]}..{names[-1]} for {k} pipeline stages but "
                f"{gpus} are visible; start fewer ranks per node or use fewer stages"
            )
        return names
    from trainer.strategy.tf_distribute import use_logical_cpus

    try:
        return use_logical_cpus(k)
    except RuntimeError as err:  # the runtime started before the devices were split
        raise RuntimeError(f"pipeline stages need {k} logical CPU devices: {err}") from None


def _check_devices_exist(devices: list[str]) -> None:
    """Explicit stage devices must be devices of this process (TensorFlow would silently place elsewhere)."""
    specs = (tf.DeviceSpec.from_string(d.name) for d in tf.config.list_logical_devices())
    have_short = {(d.device_type, d.device_index) for d in specs}
    for name in devices:
        spec = tf.DeviceSpec.from_string(name)
        if ((spec.device_type or "").upper(), spec.device_index or 0) not in have_short:
            shown = ", ".join(sorted(f"/{t.lower()}:{i}" for t, i in have_short))
            raise ConfigError(f"distribution.pipeline.devices: {name} is not a device of this process (it has "
                              f"{shown}); name existing devices, or leave devices unset to use the GPUs or "
                              "logical CPU devices")


def gpu_indices(devices: list[str]) -> list[int]:
    """Physical GPU indices named by stage devices (`/gpu:3` -> 3); empty for CPU stages."""
    out = []
    for d in devices:
        spec = tf.DeviceSpec.from_string(d)
        if (spec.device_type or "").upper() == "GPU":
            out.append(spec.device_index or 0)
    return out


def device_memory_bytes(pipe: PipelineConfig, devices: list[str]) -> float | None:
    """Per-device memory: the config's `device_memory_gb`, else what the first GPU reports, else None."""
    if pipe.device_memory_gb is not None:
        return pipe.device_memory_gb * 2.0**30
    gpus = gpu_indices(devices)
    if gpus:
        try:
            details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[gpus[0]])
            limit = details.get("memory_limit") or details.get("device_memory_size")
            return float(limit) if limit else None
        except (IndexError, ValueError):
            return None
    return None


def split_cpu_for_stages(stages: int) -> None:
    """Without GPUs, pipeline stages run on logical CPU devices, which must exist before the runtime starts."""
    if not tf.config.list_physical_devices("GPU"):
        from trainer.strategy.tf_distribute import use_logical_cpus

        use_logical_cpus(stages)
        # Stages overlap only if the executor has a thread for each stage that can run at once.
        if tf.config.threading.get_inter_op_parallelism_threads() == 0:
            tf.config.threading.set_inter_op_parallelism_threads(max(2 * stages, 4))
