"""What the training loop shares with its hooks: the loop's state and the hook interface.

Kept free of TensorFlow so that hooks which must exist before TensorFlow loads (preemption signal
handlers, heartbeats installed at start-up) do not slow down the early, data-file checks.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoopState:
    """What hooks may read (and `stop_requested`, which they may set)."""

    step: int  # optimizer steps done so far
    total_steps: int
    train_logs: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    stop_requested: bool = False
    # 0: the last step updated the weights; else it was skipped on every rank for a non-finite value, and
    # this is 1 + the index of the first one (1: the loss, 2: the first gradient...; trainer/nonfinite.py).
    nonfinite: int = 0
    stop_reason: str = ""
    # Stop requests (trainer/preemption.py): the last step's votes summed over every rank (one per signal),
    # and the signal a stop is for (0: none). A signal stop skips everything not needed to stop.
    stop_votes: list[float] = field(default_factory=list)
    stop_signal: int = 0
    steps_in_call: int = 1  # optimizer steps the last compiled call ran (train.steps_per_call)
    # Training time in timed log windows, and MFU x that time summed over them (the run's MFU: their ratio).
    timed_s: float = 0.0
    mfu_s: float = 0.0

    @property
    def mfu(self) -> float | None:
        """The run's model FLOPs utilisation over every timed window so far (None before the first log)."""
        return self.mfu_s / self.timed_s if self.timed_s > 0 else None


class Hook:
    def on_train_begin(self, state: LoopState) -> None: ...

    def next_stop(self, step: int) -> int | None:
        """With train.steps_per_call: the first step after `step` at whose start or end this hook acts (a call
        of several steps ends there); None when it acts only at log, evaluation or the last step."""
        return None

    def on_step_begin(self, state: LoopState) -> None: ...
    def on_log(self, state: LoopState) -> None: ...  # every train.log_every steps, with fresh train_logs
    def on_step_end(self, state: LoopState) -> None: ...
    def on_eval(self, state: LoopState) -> None: ...
    def on_train_end(self, state: LoopState) -> None: ...
