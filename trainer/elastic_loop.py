"""Elastic training: the ordinary loop (`loop.train`), restarted by Horovod from the last commit whenever
workers leave or join (the Horovod side is trainer/strategy/horovod_elastic.py).

Choices, and why:
  * The GLOBAL batch stays `data.batch_size` whatever the number of workers: each of N workers takes
    batch_size / N rows of every global batch (data/batches.py), and gradients are summed over workers as
    always. So the data order, the loss of a step and the learning rate are those of the uninterrupted run;
    losing a worker makes steps slower, not different. (`optimizer.scale_lr_with_replicas: true` asks for a
    learning rate proportional to the workers: it is then re-scaled to the new count at every restart.)
    The launcher checks that batch_size divides over every count from --min-np to --max-np.
  * State is committed every `train.elastic_commit_every` steps (weights, optimizer, dropout RNG, step:
    a copy to host memory, no disk). A lost worker costs the survivors at most that many steps, redone from
    the commit; host changes are noticed at the next commit.
  * After every restart, rank 0 (which may be a different process than before) writes checkpoints and
    TensorBoard, and the batches are re-sharded by the new rank and size.
"""
from __future__ import annotations

import sys
import time

from trainer.experiment import Experiment
from trainer.hooks import Hook, LoopState
from trainer.loop import last_step, train
from trainer.optim import rescale_lr_for_replicas


class CommitHook(Hook):
    """Commits the elastic state every `every` steps (and checks for added or removed hosts there)."""

    def __init__(self, elastic_state, every: int):
        self.elastic_state, self.every = elastic_state, every

    def next_stop(self, step: int) -> int | None:
        return (step // self.every + 1) * self.every

    def on_step_end(self, state: LoopState) -> None:
        if state.step % self.every == 0 or state.step == state.total_steps:
            self.elastic_state.step = state.step
            self.elastic_state.commit()  # raises HostsUpdatedInterrupt on every rank when hosts changed


def train_elastic(exp: Experiment, strategy, *, stop_after: int | None = None) -> LoopState:
    """Train to `train.steps` with a changing set of workers; return the final loop state."""
    cfg = exp.cfg
    start = exp.checkpointer.restore_latest()  # a fresh job resumes from disk; rank 0's copy wins at sync
    # `--stop-after N` means N steps from the job's first start, not from every restart's commit: the target
    # is fixed here once and kept in the elastic state, so rank 0's value reaches workers that join later.
    stop_at = last_step(start, cfg.train.steps, stop_after)
    # ZeRO: the optimizer is rebuilt over new slices at every re-shard; its state is committed by the strategy
    optimizer_variables = exp.optimizer.variables if strategy.zero_state is None else []
    variables = [*exp.model.variables, *optimizer_variables, *exp.checkpointer.trackables["rng"].states]
    began = time.monotonic()

    def body(elastic_state) -> LoopState:
        # Runs at the start and after every restart; the ranks now agree on the weights and the step.
        exp.checkpointer.write = strategy.is_chief
        if strategy.zero_state is not None:  # re-sharded for this world size by the sync before this call
            exp.optimizer = exp.checkpointer.trackables["optimizer"] = strategy.zero_state.optimizer
        rescale_lr_for_replicas(exp.optimizer, cfg.optimizer, strategy.num_replicas)
        zero = "" if strategy.zero_state is None else \
            f", ZeRO {exp.layout.zero} state in slices for {strategy.zero_state.ranks} rank(s)"
        print(f"strata: elastic: rank {strategy.rank} of {strategy.world_size} worker(s) on {strategy.host}, "
              f"continuing from committed step {elastic_state.step} at {time.monotonic() - began:.1f}s{zero}",
              file=sys.stderr, flush=True)
        return train(exp, strategy, start=elastic_state.step, stop_at=elastic_state.stop_at,
                     extra_hooks=[CommitHook(elastic_state, cfg.train.elastic_commit_every)])

    return strategy.run_elastic(body, variables=variables, step=start, stop_at=stop_at)
