"""Elastic Horovod: ranks may leave (a host fails or is removed) and join (a host returns) during a run.

Started by `horovodrun --min-np/--max-np --host-discovery-script` (`strata launch --elastic`), which sets
HOROVOD_ELASTIC=1 in every worker. Horovod's contract (horovod/common/elastic.py, docs/elastic.rst):
training runs inside a function wrapped by `run_fn`; the state it needs is kept in a `State` object whose
`commit()` copies it to host memory and checks for host changes. When a peer dies, a collective fails
(HorovodInternalError): every survivor restores the last commit, Horovod re-forms the ring (shutdown,
init) and the function is called again. When hosts are added or removed, `commit()` raises
HostsUpdatedInterrupt on every rank at the same commit; the ring is re-formed the same way, and a new
worker receives the state from rank 0 (`sync`) before its first step.

Why not `hvd.elastic.TensorFlowKerasState`: with Keras 3 it broadcasts Keras variables (horovod issue
#4290) and calls `optimizer.variables()` (a list in Keras 3). `VariablesState` tracks the underlying
tf.Variables instead (`v.value`), as the rest of the Horovod backend does. And `hvd.elastic.run` turns only
`UnknownError`s naming a Horovod op into HorovodInternalError; `_collective_failed` also accepts the other
TensorFlow error classes a dead peer surfaces as.

ZeRO (`distribution.zero` 1-3): every rank holds only its slices of the optimizer state (and under zero 3 of
the parameters), which die with it. So a commit also all-gathers the sharded state into every rank's host
memory (its whole, replicated form: the host cost of a replicated elastic run's commit; device memory keeps
the ZeRO saving), and every sync sends rank 0's copy to all workers, joiners included, each of which re-shards
it for the new number of ranks (`ShardedState`).
"""
from __future__ import annotations

import os
import socket
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from trainer.config import DistributionConfig
from trainer.strategy.horovod import Horovod


def horovod(cfg: Any) -> Horovod:
    """distribution.backend horovod (trainer/strategy/__init__.py BACKENDS): under `horovodrun --min-np/--max-np`
    (HOROVOD_ELASTIC=1) the elastic variant below, whose workers may come and go."""
    if os.environ.get("HOROVOD_ELASTIC") == "1":
        return ElasticHorovod(cfg.distribution)
    return Horovod(cfg.distribution)


class ElasticHorovod(Horovod):
    """The Horovod backend whose world may change size; rank and size are re-read after every reset."""

    name = "horovod (elastic)"
    elastic = True

    def __init__(self, dist: DistributionConfig):
        super().__init__(dist)
        from horovod.common.elastic import ObjectState

        class VariablesState(ObjectState):
            """tf.Variables (copied to host memory at each commit) plus plain Python values (e.g. `step`)."""

            def __init__(self, hvd, variables: list, **values: Any):
                self.hvd, self.variables = hvd, variables
                self._saved = [v.numpy() for v in variables]
                super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank, **values)

            def save(self) -> None:
                self._saved = [v.numpy() for v in self.variables]
                super().save()

            def restore(self) -> None:
                for v, value in zip(self.variables, self._saved):
                    v.assign(value)
                super().restore()

            def sync(self) -> None:
                self.hvd.broadcast_variables(self.variables, root_rank=0)
                self._saved = [v.numpy() for v in self.variables]
                super().sync()

        class ShardedState(VariablesState):
            """ZeRO (`zero`: trainer/strategy/zero.py or zero3.py): the variables every rank holds whole, as
            above, plus the sharded state, whose commit is its whole (replicated) form in every rank's host
            memory: a lost rank takes its slices with it. At every sync (the start, and after each reset) rank 0's
            copy reaches every worker, joiners included, and each re-shards for the new number of ranks."""

            def __init__(self, hvd, variables: list, zero: Any, **values: Any):
                self.zero, self._host = zero, None
                super().__init__(hvd, variables, **values)

            def save(self) -> None:
                self._host = self.zero.host_copy()  # a collective: every rank commits at the same step
                super().save()

            def sync(self) -> None:
                super().sync()
                if self.hvd.broadcast_object(self._host is not None, root_rank=0):
                    self._host = self._broadcast_host()
                    self.zero.reshard(self._host)
                else:  # the job's first start: the ranks' slices already agree with the broadcast weights
                    self.zero.refresh()
                    self._host = self.zero.host_copy()

            def _broadcast_host(self) -> dict:
                """Rank 0's committed copy, one array at a time (a joined worker starts from zeros)."""
                out = {}
                for n, (key, (shape, dtype)) in enumerate(sorted(self.zero.host_shapes().items())):
                    mine = self._host[key] if self._host is not None else np.zeros(shape, dtype)
                    out[key] = self.hvd.broadcast(tf.constant(mine), root_rank=0, name=f"zero_sync_{n}").numpy()
                return out

        self._state_class, self._sharded_state_class = VariablesState, ShardedState

    @property
    def host(self) -> str:
        """The host this worker was started on, as Horovod's driver names it (ranks move between hosts
        at every reset, so the launcher's host list cannot say which rank is where)."""
        return os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()

    def broadcast_initial_state(self, variables: list) -> None:
        """Nothing to do: `VariablesState.sync` broadcast rank 0's state before training (re)started."""

    def run_elastic(self, body: Callable[[Any], Any], *, variables: list, step: int, **values: Any) -> Any:
        """Call `body(state)` until it returns, re-forming the ring whenever ranks leave or join.

        `state.step` is the last committed step and `state.commit()` commits (see trainer/elastic_loop.py);
        `variables` are Keras or tf.Variables: everything a commit must capture; `values` are plain Python
        values kept in the state too (rank 0's are broadcast to every worker at each sync).
        """
        from horovod.common.elastic import run_fn
        from horovod.common.exceptions import HorovodInternalError

        hvd = self.hvd
        if self.zero_state is None:
            state = self._state_class(hvd, [getattr(v, "value", v) for v in variables], step=step, **values)
        else:  # ZeRO: the slices (and, under zero 3, the deferred model variables) are committed as a whole
            own = {id(v) for v in self.zero_state.owned_variables()}
            state = self._sharded_state_class(hvd, [getattr(v, "value", v) for v in variables if id(v) not in own],
                                              self.zero_state, step=step, **values)

        def guarded(state):
            try:
                return body(state)
            except tf.errors.OpError as err:
                if _collective_failed(err):
                    raise HorovodInternalError(err) from err
                raise

        def reset() -> None:
            hvd.shutdown()
            hvd.init()

        return run_fn(guarded, reset)(state)


def _collective_failed(err: tf.errors.OpError) -> bool:
    """A Horovod collective failed (a peer died or the ring is being re-formed), not a bug in the step."""
    text = getattr(err, "message", "") or str(err)
    return "Horovod" in text or "horovod" in text or "Gloo" in text or "gloo" in text
