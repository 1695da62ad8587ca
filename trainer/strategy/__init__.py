"""Distribution backends behind one interface (see base.py). The only package that imports horovod or
calls tf.distribute. Importing this package does not import TensorFlow; each backend is imported when it is
chosen. The plans they carry out (layout, stages, schedules) are pure: trainer/parallel/."""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

from launch.contract import LAUNCHER_SIZE_VARS, env_int
from trainer.config import ExperimentConfig
from trainer.errors import ConfigError
from trainer.parallel.layout import Layout, LayoutError, layout_for

if TYPE_CHECKING:
    from trainer.strategy.base import Strategy


def launched_world_size() -> int:
    """How many ranks an external launcher (horovodrun, mpirun, srun) started, 1 when none did."""
    return env_int(os.environ, LAUNCHER_SIZE_VARS, 1)


# distribution.backend -> "module:function" building it from the config (imported when chosen). A backend
# with variants is built by the module of its variant, which picks: elastic Horovod (when horovodrun is
# elastic), multi_worker with its variables on pipeline stages (when the config has a pipeline).
BACKENDS = {
    "single": "trainer.strategy.single:single_device",
    "mirrored": "trainer.strategy.tf_distribute:mirrored",
    "multi_worker": "trainer.strategy.multi_worker_pipeline:multi_worker",
    "horovod": "trainer.strategy.horovod_elastic:horovod",
}


def make_strategy(cfg: ExperimentConfig) -> "Strategy":
    """Build the backend named by `distribution.backend` and check the layout fits the replicas it formed."""
    dist = cfg.distribution
    ranks = launched_world_size()
    if ranks > 1 and dist.backend not in ("horovod",):
        raise ConfigError(
            f"started as {ranks} ranks (horovodrun/mpirun) but distribution.backend is {dist.backend}; "
            f"add --set distribution.backend=horovod"
        )
    if dist.pipeline is not None and dist.pipeline.devices is None:
        from trainer.strategy.pipeline.devices import split_cpu_for_stages

        split_cpu_for_stages(dist.pipeline.stages)  # before any backend starts TensorFlow's runtime
    module, _, name = BACKENDS[dist.backend].partition(":")
    strategy: "Strategy" = getattr(importlib.import_module(module), name)(cfg)
    replica_layout(cfg, strategy.num_replicas)  # the batch must split over the replicas the backend formed
    return strategy


def replica_layout(cfg: ExperimentConfig, replicas: int, *, training: bool = True) -> Layout:
    """The run's layout over `replicas` data-parallel replicas (trainer/parallel/layout.py); ConfigError (one
    line) when it cannot run. Without `training` there is no pipeline: the whole model on one device."""
    try:
        return layout_for(cfg, replicas, pipeline=training)
    except LayoutError as err:
        raise ConfigError(str(err)) from None


__all__ = ["BACKENDS", "launched_world_size", "make_strategy", "replica_layout"]
