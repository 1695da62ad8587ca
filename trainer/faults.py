"""Fault injection for tests and drills: make one rank fail on purpose at a chosen step.

Set STRATA_FAULT="RANK:STEP:KIND" in the environment of a run, e.g. `1:5:kill`. KIND is one of
  exit   the rank exits with code 3 after step STEP,
  kill   the rank sends itself SIGKILL after step STEP (as the OOM killer would),
  hang   the rank stops making progress (sleeps) before step STEP+1,
  usr1   the rank sends itself SIGUSR1 after step STEP and goes on (a preemption warning that reached
         only this rank; see trainer/preemption.py).
Unset (the default), nothing happens: the hook is not even installed.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from trainer.hooks import Hook, LoopState

KINDS = ("exit", "kill", "hang", "usr1")


def parse_fault(spec: str) -> tuple[int, int, str]:
    try:
        rank, step, kind = spec.split(":")
        parsed = int(rank), int(step), kind
    except ValueError:
        raise ValueError(f"STRATA_FAULT={spec!r}: expected RANK:STEP:KIND, e.g. 1:5:kill") from None
    if kind not in KINDS:
        raise ValueError(f"STRATA_FAULT={spec!r}: KIND must be one of {', '.join(KINDS)}")
    return parsed


class FaultInjection(Hook):
    def __init__(self, spec: str, rank: int):
        self.rank, self.step, self.kind = parse_fault(spec)
        self.active = rank == self.rank

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


def fault_hooks(rank: int) -> list[Hook]:
    spec = os.environ.get("STRATA_FAULT")
    return [FaultInjection(spec, rank)] if spec else []
