"""TensorBoard output: scalars, hyperparameters, attention images, profiler traces.

Everything goes under RUN_DIR/tensorboard. Tags are grouped by prefix: train/, val/, perf/.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf


class TensorBoard:
    """A summary writer for the chief; every method is a no-op elsewhere."""

    def __init__(self, logdir: Path, *, enabled: bool, resumed_from: int = 0):
        self.logdir = Path(logdir)
        self.enabled = enabled
        if enabled:
            mark_session_start(self.logdir, resumed_from + 1)  # before the writer: its file sorts after this one
        self.writer = tf.summary.create_file_writer(str(self.logdir)) if enabled else None

    def scalars(self, step: int, values: dict[str, float], *, prefix: str) -> None:
        if not self.enabled:
            return
        with self.writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(f"{prefix}/{name}", float(value))

    def hparams(self, flat_config: dict[str, object], metric_tags: list[str]) -> None:
        """Record the run's hyperparameters for TensorBoard's HParams dashboard."""
        if not self.enabled:
            return
        from tensorboard.plugins.hparams import api as hp

        values = {k: v for k, v in flat_config.items() if isinstance(v, (bool, int, float, str))}
        with self.writer.as_default():
            hp.hparams_config(hparams=[hp.HParam(k) for k in values], metrics=[hp.Metric(t) for t in metric_tags])
            hp.hparams(values)

    def attention_image(self, step: int, weights: np.ndarray, *, name: str = "val/attention") -> None:
        """A heat map of one example's attention (summary position x document position)."""
        if not self.enabled:
            return
        w = np.asarray(weights, dtype=np.float32)
        w = (w - w.min()) / max(float(w.max() - w.min()), 1e-9)
        # A simple dark-blue -> yellow colour map, and upscaling so small maps are visible.
        rgb = np.stack([w, w, 0.4 * (1.0 - w)], axis=-1)
        scale = max(1, 256 // max(w.shape))
        rgb = np.kron(rgb, np.ones((scale, scale, 1), dtype=np.float32))
        with self.writer.as_default(step=step):
            tf.summary.image(name, rgb[None], step=step, description="rows: summary tokens, columns: document tokens")

    def flush(self) -> None:
        if self.enabled:
            self.writer.flush()


def mark_session_start(logdir: Path, first_step: int) -> None:
    """Tell TensorBoard a session starts at `first_step`. From the second start of a run on, it then drops
    the steps >= first_step that a crashed session had already logged instead of showing them twice: its
    reader purges such "orphaned" steps of version-2 event files only on a SessionLog START event after the
    first, and TF2's summary writers never write one. (A stop at a checkpoint has no orphans to drop.)"""
    import time

    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(logdir), filename_suffix=".start")
    writer.add_event(event_pb2.Event(step=first_step, wall_time=time.time(),
                                     session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    writer.close()


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1}"""
    out: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value if not isinstance(value, (list, tuple)) else str(value)
    return out
