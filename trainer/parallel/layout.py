"""The parallel layout of a run: how one optimizer step's global batch and the model are split (pure).

    layout = layout_for(cfg, replicas=4)      # every rule below, each checked here and nowhere else
    layout.per_replica_batch, layout.micro_batch_size, layout.devices, layout.data_shard(rank, world_size)

Axes, outermost first:
  * data_parallel    replicas that each compute the gradients of their share of the global batch; the
                     gradients are summed over them (where: trainer/strategy/, `Strategy.reduce_gradients`).
  * pipeline_stages  devices per replica, each holding a contiguous slice of the model's levels; the
                     replica's batch flows through them as `micro_batches` (trainer/strategy/pipeline/).
  * grad_accum       micro-steps one replica accumulates before the update (without a pipeline; with one,
                     micro-batches already accumulate and grad_accum stays 1).
  * zero             sharding of optimizer state (1) and gradients (2) over the data-parallel replicas
                     (Horovod ranks), and parameters too (3, level by level); 0 = replicated. With a
                     pipeline (1 and 2 only), each stage's state is sharded over the data-parallel group
                     of that stage, the ranks, and stays on the stage's device.
  * tensor_parallel  devices that split each layer; reserved: only 1 exists today.

Every process reads the rows of the global batch that belong to its data-parallel index (`data_shard`),
not to its rank: ranks that share a replica (tensor parallelism) read the same rows.

Everything that can be checked without a device is checked by `layout_for`, which config validation
(replicas unknown: 1, or distribution.devices), `python -m trainer validate --replicas` (what `strata launch`
and `strata slurm submit` run before any rank starts), `strata plan` and the start of training call. Each
rule raises one `LayoutError` with one message, naming the fields, the numbers and a fix. Standard library
only: no TensorFlow, no pydantic (the config is read through its attributes).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Sequence

from trainer.parallel.partition import explicit_partition

if TYPE_CHECKING:
    from trainer.config import ExperimentConfig


class LayoutError(ValueError):
    """A layout that cannot run; the message is one line naming the fields and the fix."""


@dataclass(frozen=True)
class Layout:
    """How one optimizer step's global batch splits over replicas, stages and micro-steps (see the module)."""

    global_batch: int
    data_parallel: int = 1
    pipeline_stages: int = 1
    micro_batches: int = 1  # per replica batch, through the pipeline (1 without a pipeline)
    grad_accum: int = 1  # micro-steps per replica batch (1 with a pipeline)
    schedule: str | None = None  # the pipeline's schedule (gpipe | 1f1b); None: no pipeline
    zero: int = 0
    tensor_parallel: int = 1

    @property
    def pipelined(self) -> bool:
        """Each replica's step runs as a pipeline (even of one stage: distribution.pipeline is set)."""
        return self.schedule is not None

    @property
    def per_replica_batch(self) -> int:
        return self.global_batch // self.data_parallel

    @property
    def micro_batch_size(self) -> int:
        """Examples per forward/backward: a pipeline micro-batch, or one accumulation micro-step."""
        return self.per_replica_batch // (self.micro_batches * self.grad_accum)

    @property
    def devices(self) -> int:
        return self.data_parallel * self.pipeline_stages * self.tensor_parallel

    def data_shard(self, rank: int, world_size: int) -> tuple[int, int]:
        """(index, count): which shard of every global batch process `rank` of `world_size` reads. The shard
        follows the data-parallel index; each process is one data-parallel group of replicas today (pipeline
        stages live inside a process), so the index is rank // tensor_parallel."""
        return rank // self.tensor_parallel, max(world_size // self.tensor_parallel, 1)

    def to_json(self) -> dict:
        return {**asdict(self), "per_replica_batch": self.per_replica_batch,
                "micro_batch_size": self.micro_batch_size, "devices": self.devices}


def layout_for(cfg: "ExperimentConfig", replicas: int = 1, replicas_as: str | None = None, *,
               pipeline: bool = True) -> Layout:
    """The layout of `cfg` over `replicas` data-parallel replicas, every rule checked (LayoutError).

    `replicas_as` says how the user asked for that many replicas, for the messages: a template where `{n}`
    is the count, e.g. `-np ({n})`; default `replicas ({n})`. `pipeline=False` lays the run out without its
    pipeline and without ZeRO (evaluation and serving run the whole model on one device).
    """
    pipe = cfg.distribution.pipeline if pipeline else None
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise LayoutError(f"replicas must be a positive integer, got {replicas!r}")
    if pipe is not None:
        _check_stages(cfg)
        _check_combinations(cfg)
    zero = cfg.distribution.zero if pipeline else 0  # evaluation and serving: the whole model, unsharded
    if zero:
        _check_zero(cfg, zero)
    layout = Layout(global_batch=cfg.data.batch_size, data_parallel=replicas,
                    pipeline_stages=pipe.stages if pipe else 1, micro_batches=pipe.micro_batches if pipe else 1,
                    grad_accum=cfg.train.grad_accum, schedule=pipe.schedule if pipe else None, zero=zero)
    field = "distribution.pipeline.micro_batches" if pipe else "train.grad_accum"
    _check_batch_split(layout, field, (replicas_as or "replicas ({n})").replace("{n}", str(replicas)))
    return layout


def config_layout(cfg: "ExperimentConfig") -> Layout:
    """What can be checked from the config alone: one replica, or distribution.devices of a mirrored run."""
    devices = cfg.distribution.devices
    if cfg.distribution.backend == "mirrored" and devices:
        return layout_for(cfg, devices, "distribution.devices ({n})")
    return layout_for(cfg)


# ------------------------------------------------------------------------------------------ the rules
def _check_stages(cfg: "ExperimentConfig") -> None:
    """Stages against the model's levels; the explicit partition and devices, one entry per stage."""
    pipe = cfg.distribution.pipeline
    levels = cfg.model.level_names()
    if pipe.stages > len(levels):
        raise LayoutError(
            f"distribution.pipeline.stages ({pipe.stages}) exceeds the {len(levels)} levels of the "
            f"{cfg.model.kind} ({', '.join(levels)}); use at most {len(levels)} stages")
    if pipe.partition != "auto":
        if len(pipe.partition) != pipe.stages:
            raise LayoutError(
                f"distribution.pipeline.partition lists {len(pipe.partition)} stages but stages is "
                f"{pipe.stages}; give one level list per stage")
        try:
            explicit_partition(levels, pipe.partition)
        except ValueError as err:
            raise LayoutError(f"distribution.pipeline.partition: {err}") from None
    if pipe.devices is not None and len(pipe.devices) != pipe.stages:
        raise LayoutError(
            f"distribution.pipeline.devices lists {len(pipe.devices)} devices for {pipe.stages} stages; "
            "give one device per stage")


def _check_combinations(cfg: "ExperimentConfig") -> None:
    """What a pipeline does not combine with."""
    pipe = cfg.distribution.pipeline
    if cfg.distribution.backend == "mirrored":
        raise LayoutError(
            "distribution.pipeline does not combine with backend mirrored (both want this process's devices); "
            "use backend single, horovod or multi_worker")
    if cfg.train.grad_accum > 1:
        raise LayoutError(
            "train.grad_accum must be 1 with distribution.pipeline: micro-batches already accumulate "
            "gradients; raise distribution.pipeline.micro_batches instead")
    if pipe.recompute and getattr(cfg.model, "dropout", 0.0) > 0:
        raise LayoutError(
            f"distribution.pipeline.recompute needs a deterministic forward but model.dropout is "
            f"{cfg.model.dropout}; set model.dropout=0.0 or recompute=false")
    if cfg.train.mixed_precision == "float16":
        raise LayoutError(
            "train.mixed_precision float16 (loss scaling) is not supported with distribution.pipeline; "
            "use bfloat16")


def _check_zero(cfg: "ExperimentConfig", zero: int) -> None:
    """What sharded data parallel (ZeRO) runs on and combines with."""
    dist = cfg.distribution
    if dist.backend in ("single", "mirrored"):
        raise LayoutError(
            f"distribution.zero ({zero}) shards state over Horovod ranks but distribution.backend is {dist.backend}; "
            "use backend horovod (strata launch -np N --backend horovod) or distribution.zero=0")
    if dist.backend == "multi_worker":
        raise LayoutError(
            f"distribution.zero ({zero}) is implemented for backend horovod only (it needs a reduce-scatter and "
            "an all-gather of flat buckets); use strata launch --backend horovod, or distribution.zero=0")
    if dist.pipeline is not None and zero == 3:
        raise LayoutError(
            "distribution.zero 3 does not combine with distribution.pipeline: zero 3's level-by-level engine is "
            "itself a schedule over the levels; use distribution.zero=2 with a pipeline")
    if cfg.train.mixed_precision == "float16":
        raise LayoutError(
            "train.mixed_precision float16 (loss scaling) is not supported with distribution.zero; use bfloat16")
    if zero == 3:
        _check_zero3(cfg)


def _check_zero3(cfg: "ExperimentConfig") -> None:
    """What sharded parameters (trainer/strategy/zero3.py) do not combine with yet."""
    if getattr(cfg.model, "tie_embeddings", False):
        raise LayoutError(
            "distribution.zero 3 shards each level's parameters apart, but model.tie_embeddings shares one matrix "
            "between levels embed and head; set model.tie_embeddings=false or distribution.zero=2")
    if getattr(cfg.model, "dropout", 0.0) > 0:
        raise LayoutError(
            f"distribution.zero 3 recomputes each level's forward in the backward, which needs a deterministic "
            f"forward, but model.dropout is {cfg.model.dropout}; set model.dropout=0.0 or distribution.zero=2")
    if cfg.train.jit_compile:
        raise LayoutError(
            "train.jit_compile does not combine with distribution.zero 3 (its forward and backward all-gather "
            "and reduce-scatter inside, and Horovod's ops have no XLA kernels); set train.jit_compile=false")


def _check_batch_split(layout: Layout, field: str, replicas: str) -> None:
    """The global batch divides into whole replica batches, and each of those into whole micro-batches.
    `field` names the per-replica split, `replicas` how the user asked for the replicas."""
    b, n = layout.global_batch, layout.data_parallel
    split = layout.micro_batches * layout.grad_accum
    if b % n:
        fit = max(k for k in range(1, n + 1) if b % (k * split) == 0)
        raise LayoutError(
            f"data.batch_size ({b}) must be divisible by {replicas}: at most {fit} replica(s) of this config fit; "
            f"use fewer or set data.batch_size={_multiple(b, n * split)}")
    per_replica = b // n
    if per_replica % split:
        short = field.rsplit(".", 1)[1]
        batch = f"data.batch_size ({b})" if n == 1 else f"the per-replica batch ({per_replica}) of data.batch_size " \
                                                           f"{b} over {replicas}"
        raise LayoutError(
            f"{field} ({split}) must divide {batch}; try {short}={_nearest_divisor(per_replica, split)}"
            + (f" or data.batch_size={_multiple(b, n * split)}" if n > 1 else ""))


def stage_device_names(stages: int, local_rank: int, gpus: int, explicit: Sequence[str] | None = None) -> list[str]:
    """One device per stage for a rank: the explicit list, else the local rank's block of `stages` GPUs
    (`/gpu:local_rank*K .. +K-1`), else `stages` logical CPU devices (`/cpu:0 ..`)."""
    if explicit is not None:
        return list(explicit)
    if gpus:
        return [f"/gpu:{local_rank * stages + s}" for s in range(stages)]
    return [f"/cpu:{s}" for s in range(stages)]


def _multiple(value: int, of: int) -> int:
    """The largest multiple of `of` up to `value` (at least `of`): a batch size that would divide."""
    return of * max(1, value // of)


def _nearest_divisor(n: int, target: int) -> int:
    """The divisor of n closest to target (the smaller one on a tie: fewer micro-batches, bigger ones)."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - target), d))


__all__ = ["Layout", "LayoutError", "config_layout", "layout_for", "stage_device_names"]
