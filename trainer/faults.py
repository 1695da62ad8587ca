"""Fault injection for tests and drills: make one rank fail on purpose at a chosen step.

Set STRATA_FAULT="RANK:STEP:KIND" in the environment of a run, e.g. `1:5:kill` (several, comma-separated:
`1:5:inf,1:7:nan_loss`). KIND is one of
  exit   the rank exits with code 3 after step STEP,
  kill   the rank sends itself SIGKILL after step STEP (as the OOM killer would),
  hang   the rank stops making progress (sleeps) before step STEP+1,
  usr1   the rank sends itself SIGUSR1 after step STEP and goes on (a preemption warning that reached
         only this rank; see trainer/preemption.py),
  inf    the rank adds +Inf to its gradient of the model's last trainable variable in step STEP, inside the
         compiled step and before the all-reduce (drills the NaN/Inf guard, trainer/nonfinite.py). STEP may
         be a range FIRST-LAST (`1:5-9:inf`: steps 5 to 9) to drill the stop after train.max_bad_steps.
  nan_loss  the rank adds NaN to its loss in step STEP (inside the compiled step, after the gradients: they stay
         finite, so only the guard's loss flag and, under float16, its poisoning make the step skip). Ranges too.
Steps count from 1 (step STEP is the STEP-th optimizer step). Unset (the default), nothing happens: the
hook is not even installed, and the compiled step has no injection op.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from launch.contract import ENV_FAULT
from trainer.hooks import Hook, LoopState

IN_STEP = ("inf", "nan_loss")  # act inside the compiled step (StepFault)
KINDS = ("exit", "kill", "hang", "usr1", *IN_STEP)


def parse_fault(spec: str) -> tuple[int, int, int, str]:
    """(rank, first step, last step, kind) of a STRATA_FAULT value; ValueError naming the problem."""
    try:
        rank, steps, kind = spec.split(":")
        first, _, last = steps.partition("-")
        parsed = int(rank), int(first), int(last or first), kind
    except ValueError:
        raise ValueError(f"STRATA_FAULT={spec!r}: expected RANK:STEP:KIND, e.g. 1:5:kill") from None
    if kind not in KINDS:
        raise ValueError(f"STRATA_FAULT={spec!r}: KIND must be one of {', '.join(KINDS)}")
    if parsed[2] != parsed[1] and kind not in IN_STEP or parsed[2] < parsed[1]:
        raise ValueError(f"STRATA_FAULT={spec!r}: a step range FIRST-LAST (FIRST <= LAST) needs KIND inf or nan_loss")
    return parsed


def parse_faults(specs: str) -> list[tuple[int, int, int, str]]:
    """Every fault of a comma-separated STRATA_FAULT value (`1:5:inf,1:7:nan_loss`)."""
    return [parse_fault(spec.strip()) for spec in specs.split(",") if spec.strip()]


class FaultInjection(Hook):
    def __init__(self, fault: tuple[int, int, int, str], rank: int):
        self.rank, self.step, _, self.kind = fault
        self.active = rank == self.rank

    def next_stop(self, step: int) -> int | None:
        return self.step if self.step > step else None  # on every rank: all must cut their calls alike

    def on_step_end(self, state: LoopState) -> None:
        if not self.active or state.step != self.step:
            return
        print(f"strata: injected fault: rank {self.rank} {self.kind} at step {self.step}", file=sys.stderr, flush=True)
        if self.kind == "exit":
            os._exit(3)
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "usr1":
            os.kill(os.getpid(), signal.SIGUSR1)
            return
        while True:  # hang
            time.sleep(60)


class StepFault(Hook):
    """`inf` and `nan_loss`: two variables the compiled step adds to one gradient and to the loss; 0 except in
    the chosen steps on the chosen rank.

    Adding 0.0 leaves every finite value unchanged, and the ops exist only when such a fault is set.
    """

    def __init__(self, faults: list[tuple[int, int, int, str]], rank: int):
        import tensorflow as tf  # only runs that inject a non-finite value pay for it here

        self.faults = [f for f in faults if f[0] == rank and f[3] in IN_STEP]
        self.every_rank = [f for f in faults if f[3] in IN_STEP]  # where every rank cuts its calls (next_stop)
        self.rank = rank
        self.grad_addend = tf.Variable(0.0, trainable=False, name="strata_fault_addend")
        self.loss_addend = tf.Variable(0.0, trainable=False, name="strata_fault_loss_addend")

    def __call__(self, grads: list) -> list:
        """`grads` with the gradient addend added to the last gradient (inside the compiled step)."""
        import tensorflow as tf

        g = grads[-1]
        if isinstance(g, tf.IndexedSlices):
            g = tf.IndexedSlices(g.values + tf.cast(self.grad_addend, g.values.dtype), g.indices, g.dense_shape)
        else:
            g = g + tf.cast(self.grad_addend, g.dtype)
        return [*grads[:-1], g]

    def loss(self, loss):
        """`loss` plus the loss addend (inside the compiled step)."""
        import tensorflow as tf

        return loss + tf.cast(self.loss_addend, loss.dtype)

    def next_stop(self, step: int) -> int | None:
        """The step before a faulted range and each step in it: the addends are set per call."""
        stops = [s for _, first, last, _ in self.every_rank for s in range(first - 1, last + 1) if s > step]
        return min(stops, default=None)

    def on_step_begin(self, state: LoopState) -> None:
        step = state.step + 1  # the step about to run
        for kind, addend, value, what in (("inf", self.grad_addend, float("inf"), "inf in a gradient"),
                                          ("nan_loss", self.loss_addend, float("nan"), "nan in the loss")):
            inject = any(k == kind and first <= step <= last for _, first, last, k in self.faults)
            if inject:
                print(f"strata: injected fault: rank {self.rank} {what} at step {step}", file=sys.stderr,
                      flush=True)
            addend.assign(value if inject else 0.0)


_step_fault: dict[int, StepFault] = {}


def step_fault(rank: int) -> StepFault | None:
    """The process's in-step fault (one object, shared by the compiled step and the hooks), or None."""
    faults = parse_faults(os.environ.get(ENV_FAULT, ""))
    if not any(kind in IN_STEP for *_, kind in faults):
        return None
    if rank not in _step_fault:
        _step_fault[rank] = StepFault(faults, rank)
    return _step_fault[rank]


def fault_hooks(rank: int) -> list[Hook]:
    faults = parse_faults(os.environ.get(ENV_FAULT, ""))
    hooks: list[Hook] = [FaultInjection(f, rank) for f in faults if f[3] not in IN_STEP]
    in_step = step_fault(rank)
    return hooks + ([in_step] if in_step is not None else [])
