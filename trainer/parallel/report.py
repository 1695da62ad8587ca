"""The pipeline part of `strata plan` (also printed when a pipelined run starts): stages, levels, memory,
schedule, bubble, batch sizes and warnings (pure: standard library only)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from trainer.parallel.schedule import SCHEDULES, _check_schedule_args, gpipe_speedup_bound, \
    peak_live_micro_batches, theoretical_bubble
from trainer.parallel.units import count, ms, nbytes, plural

# A pipeline with M micro-batches on K stages idles (K-1)/(M+K-1) of the time; M >= 4K keeps that
# below ~20%, the rule of thumb from the GPipe paper.
MICRO_BATCHES_PER_STAGE = 4
# Above this slowest-stage/mean-stage cost ratio, the slowest stage wastes >20% of the other stages' time.
IMBALANCE_LIMIT = 1.25


@dataclass
class PipelineReport:
    """What `strata plan` prints about the stages of one pipeline-parallel job.

    Memory estimates are optional; when given they are in bytes. `stage_activation_bytes` is the
    activation memory of ONE micro-batch on a stage: the plan multiplies it by how many micro-batches the
    schedule keeps alive on that stage (GPipe: M on every stage, 1F1B: min(K - s, M)).
    """

    stages: int
    micro_batches: int
    schedule: str  # "gpipe" or "1f1b"
    stage_levels: list[list[str]]
    global_batch: int
    replicas: int = 1
    stage_params: list[int] | None = None  # parameter count per stage
    stage_activation_bytes: list[float] | None = None  # per stage, per micro-batch
    stage_costs: list[float] | None = None  # seconds per micro-batch per stage (for the imbalance warning)
    devices: list[str] | None = None  # device of each stage (first replica); default "GPU:s"
    device_memory_bytes: float | list[float] | None = None  # one number for all devices or one per stage
    # fp32 weights + fp32 gradients + Adam's two fp32 moments = 16 bytes per parameter (replicated; with ZeRO
    # 1/2 the per-rank figure of trainer/parallel/zero.py `shard_bytes`).
    bytes_per_param: float = 16.0
    zero: int = 0  # distribution.zero: each stage's state sharded over the `replicas` ranks
    # Recomputation: each live micro-batch keeps only the stage's input (boundary) activations, plus one
    # micro-batch's full activations while its backward re-runs the forward.
    recompute: bool = False
    stage_boundary_bytes: list[float] | None = None  # per stage, per micro-batch
    balanced: bool = False  # the split is already the best contiguous one for `stage_costs`
    # Simulated once per (schedule, stages, micro_batches): format_report asks for it on every row.
    _peak_live: dict[tuple[str, int, int], list[int]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; use one of: {', '.join(SCHEDULES)}")
        _check_schedule_args(self.stages, self.micro_batches)
        for what in ("stage_levels", "stage_params", "stage_activation_bytes", "stage_costs", "devices",
                     "stage_boundary_bytes"):
            values = getattr(self, what)
            if values is not None and len(values) != self.stages:
                raise ValueError(f"{what} has {len(values)} entries but there are {self.stages} stages")
        if isinstance(self.device_memory_bytes, list) and len(self.device_memory_bytes) != self.stages:
            raise ValueError(
                f"device_memory_bytes has {len(self.device_memory_bytes)} entries but there are {self.stages} stages"
            )

    # ------------------------------------------------------------------------ derived numbers
    @property
    def per_replica_batch(self) -> int:
        return self.global_batch // self.replicas

    @property
    def micro_batch_size(self) -> int:
        return self.per_replica_batch // self.micro_batches

    @property
    def bubble(self) -> float:
        """Idle fraction for equal stages, (K-1)/(M+K-1)."""
        return theoretical_bubble(self.stages, self.micro_batches)

    @property
    def peak_live(self) -> list[int]:
        """Per stage, micro-batches whose activations are alive at once under this schedule."""
        key = (self.schedule, self.stages, self.micro_batches)
        if key not in self._peak_live:
            self._peak_live[key] = peak_live_micro_batches(*key)
        return self._peak_live[key]

    def device(self, stage: int) -> str:
        return self.devices[stage] if self.devices is not None else f"GPU:{stage}"

    def param_bytes(self, stage: int) -> float | None:
        if self.stage_params is None:
            return None
        return self.stage_params[stage] * self.bytes_per_param

    def activation_bytes(self, stage: int) -> float | None:
        """Peak activation memory of a stage: per-micro-batch bytes x micro-batches alive at once."""
        if self.stage_activation_bytes is None:
            return None
        if self.recompute and self.stage_boundary_bytes is not None:
            return self.stage_boundary_bytes[stage] * self.peak_live[stage] + self.stage_activation_bytes[stage]
        return self.stage_activation_bytes[stage] * self.peak_live[stage]

    def memory_bytes(self, stage: int) -> float | None:
        """Estimated peak memory of a stage (parameters + activations), None with no estimate at all."""
        parts = [p for p in (self.param_bytes(stage), self.activation_bytes(stage)) if p is not None]
        return sum(parts) if parts else None

    def device_memory(self, stage: int) -> float | None:
        cap = self.device_memory_bytes
        return cap[stage] if isinstance(cap, list) else cap

    # ------------------------------------------------------------------------ warnings
    def warnings(self) -> list[str]:
        """One line per problem worth fixing before a long run (empty when the plan looks fine)."""
        out: list[str] = []
        k, m = self.stages, self.micro_batches
        if k > 1 and m < MICRO_BATCHES_PER_STAGE * k:
            out.append(
                f"micro_batches ({m}) < {MICRO_BATCHES_PER_STAGE} x stages ({k}): bubble {self.bubble:.0%}; "
                f"use >= {MICRO_BATCHES_PER_STAGE * k}"
            )
        if self.stage_costs is not None and k > 1:
            mean = math.fsum(self.stage_costs) / k
            ratio = max(self.stage_costs) / mean if mean > 0 else 1.0
            if ratio > IMBALANCE_LIMIT:
                slowest = max(range(k), key=lambda s: (self.stage_costs[s], -s))  # type: ignore[index]
                fix = (f"no contiguous split does better: make the heaviest level of stage {slowest} "
                       "smaller (e.g. more, thinner layers) or use fewer stages" if self.balanced else
                       f"move levels off stage {slowest} or use partition: auto")
                out.append(  # in ms, like the measured level table printed next to it
                    f"stages are unbalanced: {', '.join(ms(c) for c in self.stage_costs)} per micro-batch "
                    f"(slowest/mean {ratio:.2f} > {IMBALANCE_LIMIT}); {fix}"
                )
        for s in range(k):
            need, cap = self.memory_bytes(s), self.device_memory(s)
            if need is None or cap is None or need <= cap:
                continue
            # GPipe keeps all M micro-batches alive; 1F1B caps that at K - s, often the cheapest fix.
            acts = self.activation_bytes(s)
            fix = "use the 1f1b schedule (fewer live micro-batches), " if self.schedule == "gpipe" and acts else ""
            out.append(
                f"stage {s} needs ~{nbytes(need)} ({self._memory_parts(s)}) but {self.device(s)} has "
                f"{nbytes(cap)}; {fix}move levels off stage {s} or use more stages"
            )
        return out

    def _memory_parts(self, stage: int) -> str:
        parts = []
        params = self.param_bytes(stage)
        if params is not None:
            parts.append(f"params {nbytes(params)}")
        if self.stage_activation_bytes is not None:
            parts.append(f"activations {self._activation_formula(stage)}")
        return " + ".join(parts)

    def _activation_formula(self, stage: int) -> str:
        """How a stage's activation memory adds up, e.g. `4 x 1.0 MiB` or `4 x 64 KiB inputs + 1.0 MiB`."""
        assert self.stage_activation_bytes is not None
        live, full = self.peak_live[stage], nbytes(self.stage_activation_bytes[stage])
        if self.recompute and self.stage_boundary_bytes is not None:
            return f"{live} x {nbytes(self.stage_boundary_bytes[stage])} inputs + {full} recomputed"
        return f"{live} x {full}"


def format_report(plan: PipelineReport) -> str:
    """A readable multi-line summary: one table row per stage, then schedule, bubble and batch sizes."""
    header = ["stage", "device", "levels", "params", "activation memory"]
    rows = []
    for s in range(plan.stages):
        params = "-" if plan.stage_params is None else count(plan.stage_params[s])
        if plan.stage_activation_bytes is None:
            act = "-"
        else:
            act = f"{nbytes(plan.activation_bytes(s) or 0.0)} ({plan._activation_formula(s)})"
        rows.append([str(s), plan.device(s), ", ".join(plan.stage_levels[s]), params, act])
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        return " | ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip()

    k, m = plan.stages, plan.micro_batches
    lines = [
        f"pipeline: {plural(k, 'stage')} x {plural(plan.replicas, 'replica')}, "
        f"{plural(k * plan.replicas, 'device')}",
        line(header),
        "-+-".join("-" * w for w in widths),
        *(line(r) for r in rows),
        f"schedule: {plan.schedule}, {plural(m, 'micro-batch', 'micro-batches')} per step"
        + (", recomputation on" if plan.recompute else ""),
        f"bubble: {plan.bubble:.1%} idle = (K-1)/(M+K-1) = {k - 1}/{m + k - 1}; "
        f"speed-up bound {gpipe_speedup_bound(k, m):.2f}x over one device",
        f"batch: global {plan.global_batch} = {plural(plan.replicas, 'replica')} "
        f"x {plan.per_replica_batch}; micro-batch size {plan.micro_batch_size} "
        f"({plan.per_replica_batch} / {m})",
    ]
    if plan.zero:
        sharded = "optimizer state" + (" and gradients" if plan.zero >= 2 else "")
        lines.append(f"zero {plan.zero}: each stage's {sharded} sharded over its data-parallel group "
                     f"({plural(plan.replicas, 'rank')}): {plan.bytes_per_param:.3g} bytes per parameter per rank "
                     "in the stages' memory estimates (fp32 Adam; 16 replicated)")
    warnings = plan.warnings()
    if warnings:
        lines.append("warnings:")
        lines.extend(f"  - {w}" for w in warnings)
    return "\n".join(lines)

