"""Sharded data parallel (ZeRO), the plan (pure: standard library only).

The trainable variables, in a fixed order (the model's), are laid end to end in a few flat buckets; each
bucket is padded with zeros to a multiple of the ranks N, and rank r owns the contiguous slice
[r*S/N, (r+1)*S/N) of every bucket (S: the padded size). A bucket closes before a variable that would take it
past `cap` elements, so the collectives are few and large; a variable larger than `cap` has a bucket of its
own (variables are never split over buckets, only over ranks).

Padding never changes a result: its gradient is zero, so Adam's and SGD's updates of it stay zero, the
global norm does not see it, and it is dropped when the buckets are cut back into variables.
(trainer/strategy/zero.py carries this out; `shard_bytes` is what `strata plan` reports.)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from trainer.parallel.units import count, nbytes

# 8 Mi float32 elements = 32 MiB per bucket: large enough for full-bandwidth collectives, small enough that
# the flattened gradient of one bucket is a small transient.
BUCKET_ELEMENTS = 8 << 20


@dataclass(frozen=True)
class Piece:
    """Variable `index` occupies [offset, offset + size) of its bucket."""

    index: int
    offset: int
    size: int


@dataclass(frozen=True)
class Bucket:
    """Variables laid end to end, padded to a multiple of `ranks` elements; all of pipeline stage `stage`
    (0 without a pipeline), so its collectives run on that stage's device."""

    pieces: tuple[Piece, ...]
    ranks: int
    stage: int = 0

    @property
    def size(self) -> int:
        """Elements of the variables (without padding)."""
        return sum(p.size for p in self.pieces)

    @property
    def padded(self) -> int:
        return -(-self.size // self.ranks) * self.ranks

    @property
    def shard(self) -> int:
        """Elements each rank owns."""
        return self.padded // self.ranks

    def owned(self, rank: int) -> tuple[int, int]:
        """[start, stop) of the bucket that `rank` owns."""
        return rank * self.shard, (rank + 1) * self.shard


def plan_buckets(sizes: list[int], ranks: int, cap: int = BUCKET_ELEMENTS) -> tuple[Bucket, ...]:
    """Buckets for variables of `sizes` elements (in order) over `ranks` ranks, each at most `cap` elements
    unless one variable alone is larger."""
    if ranks < 1 or cap < 1:
        raise ValueError(f"ranks ({ranks}) and cap ({cap}) must be positive")
    buckets: list[tuple[Piece, ...]] = []
    current: list[Piece] = []
    used = 0
    for index, size in enumerate(sizes):
        if current and used + size > cap:
            buckets.append(tuple(current))
            current, used = [], 0
        current.append(Piece(index, used, size))
        used += size
    if current:
        buckets.append(tuple(current))
    return tuple(Bucket(pieces, ranks) for pieces in buckets)


def plan_stage_buckets(sizes: list[int], stages: list[int], ranks: int,
                       cap: int = BUCKET_ELEMENTS) -> tuple[Bucket, ...]:
    """Buckets for a pipelined replica: variable i (`sizes[i]` elements) lives on pipeline stage `stages[i]`.
    Each stage's variables, in their order in `sizes`, are planned as `plan_buckets` does, so no bucket mixes
    stages (a bucket's state and collectives stay on its stage's device); stages in ascending order. Pieces
    keep the variables' indices in `sizes`."""
    if len(stages) != len(sizes):
        raise ValueError(f"{len(sizes)} variables but {len(stages)} stage indices; give one stage per variable")
    out: list[Bucket] = []
    for stage in sorted(set(stages)):
        indices = [i for i, s in enumerate(stages) if s == stage]
        for bucket in plan_buckets([sizes[i] for i in indices], ranks, cap):
            pieces = tuple(Piece(indices[p.index], p.offset, p.size) for p in bucket.pieces)
            out.append(Bucket(pieces, ranks, stage))
    return tuple(out)


@dataclass(frozen=True)
class ShardBytes:
    """Bytes one rank holds for the model's training state (activations apart)."""

    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def shard_bytes(params: int, ranks: int, zero: int, *, slots: int = 2, param_bytes: int = 4) -> ShardBytes:
    """Per-rank bytes of `params` parameters for ZeRO stage `zero` over `ranks` ranks (the textbook figures,
    as in the ZeRO paper): fp32 weights and gradients, `slots` fp32 optimizer slots per parameter (Adam: 2,
    plain SGD: 0, SGD with momentum: 1). Stage 1 shards the optimizer slots (plus the fp32 master slice the
    sharded optimizer updates), 2 the gradients too, 3 the parameters too."""
    n = max(ranks, 1)
    whole = params * param_bytes
    optimizer = params * 4 * slots
    if zero == 0:
        return ShardBytes(whole, whole, optimizer)
    master = 0 if zero == 3 else whole / n  # zero 3: the shard is the parameter itself
    return ShardBytes(whole if zero < 3 else whole / n, whole if zero < 2 else whole / n,
                      optimizer / n + master)


_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


def parse_memory(text: str) -> float:
    """`80GB`, `24GiB`, `512MB`, `1e9` -> bytes; ValueError naming the accepted forms."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([KMGT]i?B|B)?\s*", text or "", re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"--device-memory {text!r}: expected a positive size such as 80GB, 24GiB or 512MB")
    return float(match.group(1)) * _UNITS[(match.group(2) or "").upper()]


@dataclass(frozen=True)
class ModelShape:
    """What the memory plan needs of a model: parameters and activation bytes (one replica's micro-batch) of
    its fixed levels (embeddings, output) and of its repeated blocks (scaled by depth), and what zero 3 holds
    beyond its shards: each level's input carry (kept for the backward, per micro-batch) and the largest
    single level (its parameters are whole while it runs; its activations exist only during its recompute)."""

    fixed_params: int
    block_params: int
    fixed_activations: float
    block_activations: float
    fixed_inputs: float = 0.0
    block_inputs: float = 0.0
    largest_level: str = ""
    largest_level_params: int = 0
    largest_level_activations: float = 0.0

    def level_bytes(self) -> float:
        """What zero 3 holds whole for its largest level, however many ranks: its parameters twice (running,
        and the prefetch of the next level, at most as large), its gradient, and its activations."""
        return 3 * 4 * self.largest_level_params + self.largest_level_activations

    def scaled(self, depth: float) -> tuple[int, float]:
        """(parameters, activation bytes) with the repeated blocks multiplied by `depth`."""
        return (int(self.fixed_params + depth * self.block_params),
                self.fixed_activations + depth * self.block_activations)


def rank_bytes(shape: ModelShape, ranks: int, zero: int, *, slots: int, depth: float = 1.0) -> tuple[ShardBytes, float]:
    """(training state, activations) one rank holds at `depth` x the configured blocks.

    Zero 3 runs level by level (trainer/strategy/zero3.py): besides its shards a rank holds two levels'
    parameters whole (the one running and the next one's prefetched all-gather) and one level's whole
    gradient before its reduce-scatter; the backward recomputes each level, so only the levels' input carries
    and one level's activations are alive, not every level's."""
    params, activations = shape.scaled(depth)
    state = shard_bytes(params, ranks, zero, slots=slots)
    if zero < 3:
        return state, activations
    level = shape.largest_level_params * 4
    transient = ShardBytes(state.params + 2 * level, state.grads + level, state.optimizer)
    return transient, shape.fixed_inputs + depth * shape.block_inputs + shape.largest_level_activations


def largest_depth(shape: ModelShape, ranks: int, zero: int, *, slots: int, memory: float, limit: int = 1 << 20) -> int:
    """The largest whole multiple of the configured depth whose rank bytes fit in `memory` (0: none)."""
    def fits(depth: int) -> bool:
        state, activations = rank_bytes(shape, ranks, zero, slots=slots, depth=depth)
        return state.total + activations <= memory

    if not fits(1):
        return 0
    low, high = 1, 2
    while high < limit and fits(high):
        low, high = high, high * 2
    while high - low > 1:  # fits(low), not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def format_zero_report(shape: ModelShape, ranks: int, chosen: int, *, slots: int, memory: float | None,
                       depth_of: str) -> str:
    """`strata plan`'s memory table: per-rank bytes of parameters, gradients, optimizer state and activations
    for zero 0..3 (the chosen stage marked), and with `memory` the largest depth that fits for each."""
    params, _ = shape.scaled(1)
    lines = [f"memory per rank ({count(params)} parameters, {ranks} data-parallel rank(s), {slots} optimizer "
             f"slot(s) per parameter; activations: an upper bound for one micro-batch, all levels kept for the "
             "backward; zero 3: level by level, see below):",
             "  zero  params      grads       optimizer   activations  total" + ("       largest that fits"
                                                                               if memory and shape.block_params
                                                                               else "")]
    for zero in range(4):
        state, activations = rank_bytes(shape, ranks, zero, slots=slots)
        row = (f"  {zero}{'*' if zero == chosen else ' '}   {nbytes(state.params):<11} {nbytes(state.grads):<11} "
               f"{nbytes(state.optimizer):<11} {nbytes(activations):<12} {nbytes(state.total + activations):<11}")
        if memory and shape.block_params:
            depth = largest_depth(shape, ranks, zero, slots=slots, memory=memory)
            biggest, _ = shape.scaled(depth)
            row += f" {depth} x depth ({depth_of}): {count(biggest)} parameters" if depth else " does not fit"
        lines.append(row.rstrip())
    lines.append("  (* distribution.zero; zero 3 includes two levels' parameters and one level's gradient whole, "
                 "and keeps only the levels' inputs for its recomputing backward"
                 + ("; largest: the configured depth times k, width unchanged)" if memory and shape.block_params
                    else ")"))
    return "\n".join(lines)


__all__ = ["BUCKET_ELEMENTS", "Bucket", "ModelShape", "Piece", "ShardBytes", "largest_depth", "parse_memory",
           "format_zero_report", "plan_buckets", "plan_stage_buckets", "rank_bytes", "shard_bytes"]
