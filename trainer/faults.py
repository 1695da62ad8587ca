"""Fault injection for tests and drills: make one rank fail on purpose at a chosen step.

Set STRATA_FAULT="RANK:STEP:KIND" in the environment of a run, e.g. `1:5:kill`. KIND is one of
  exit   the rank exits with code 3 after step STEP,
  kill   the rank sends itself SIGKILL after step STEP (as the OOM killer would),
  hang   the rank stops making progress (sleeps) before step STEP+1,
  usr1   the rank sends itself SIGUSR1 after step STEP and goes on (a preemption warning that reached
         only this rank; see trainer/preemption.py),
  inf    the rank adds +Inf to its gradient of the model's last trainable variable in step STEP, inside the
         compiled step and before the all-reduce (drills the NaN/Inf guard, trainer/nonfinite.py). STEP may
         be a range FIRST-LAST (`1:5-9:inf`: steps 5 to 9) to drill the stop after train.max_bad_steps.
Steps count from 1 (step STEP is the STEP-th optimizer step). Unset (the default), nothing happens: the
hook is not even installed, and the compiled step has no injection op.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from trainer.hooks import Hook, LoopState

KINDS = ("exit", "kill", "hang", "usr1", "inf")


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
    if parsed[2] != parsed[1] and kind != "inf" or parsed[2] < parsed[1]:
        raise ValueError(f"STRATA_FAULT={spec!r}: a step range FIRST-LAST (FIRST <= LAST) needs KIND inf")
    return parsed


class FaultInjection(Hook):
    def __init__(self, spec: str, rank: int):
        self.rank, self.step, _, self.kind = parse_fault(spec)
        self.active = rank == self.rank and self.kind != "inf"  # inf acts inside the step: GradientFault

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


class GradientFault(Hook):
    """`inf`: a variable the compiled step adds to one gradient; 0 except in the chosen steps on the chosen rank.

    Adding 0.0 leaves every finite gradient unchanged, and the op exists only when this fault is set.
    """

    def __init__(self, spec: str, rank: int):
        import tensorflow as tf  # only runs that inject an Inf pay for it here

        self.rank, self.first, self.last, _ = parse_fault(spec)
        self.active = rank == self.rank
        self.addend = tf.Variable(0.0, trainable=False, name="strata_fault_addend")

    def __call__(self, grads: list) -> list:
        """`grads` with the addend added to the last gradient (inside the compiled step)."""
        import tensorflow as tf

        g = grads[-1]
        if isinstance(g, tf.IndexedSlices):
            g = tf.IndexedSlices(g.values + tf.cast(self.addend, g.values.dtype), g.indices, g.dense_shape)
        else:
            g = g + tf.cast(self.addend, g.dtype)
        return [*grads[:-1], g]

    def on_step_begin(self, state: LoopState) -> None:
        step = state.step + 1  # the step about to run
        inject = self.active and self.first <= step <= self.last
        if inject:
            print(f"strata: injected fault: rank {self.rank} inf in a gradient at step {step}", file=sys.stderr,
                  flush=True)
        self.addend.assign(float("inf") if inject else 0.0)


_gradient_fault: dict[int, GradientFault] = {}


def gradient_fault(rank: int) -> GradientFault | None:
    """The process's `inf` fault (one object, shared by the compiled step and the hooks), or None."""
    spec = os.environ.get("STRATA_FAULT")
    if not spec or parse_fault(spec)[3] != "inf":
        return None
    if rank not in _gradient_fault:
        _gradient_fault[rank] = GradientFault(spec, rank)
    return _gradient_fault[rank]


def fault_hooks(rank: int) -> list[Hook]:
    spec = os.environ.get("STRATA_FAULT")
    if not spec:
        return []
    injection = gradient_fault(rank)
    return [injection] if injection is not None else [FaultInjection(spec, rank)]
