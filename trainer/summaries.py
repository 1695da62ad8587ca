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

    def attention_image(self, step: int, weights: np.ndarray, *, rows: list[str] | None = None,
                        columns: list[str] | None = None, name: str = "val/attention") -> None:
        """A heat map of one example's attention (summary position x document position), with the summary
        tokens down the left and the document tokens along the top when given; the tokens also go to a text
        summary `<name>_tokens` beside the image."""
        if not self.enabled:
            return
        rgb = attention_heatmap(weights, rows=rows, columns=columns)
        with self.writer.as_default(step=step):
            tf.summary.image(name, rgb[None], step=step, description="rows: summary tokens, columns: document tokens")
            if rows is not None and columns is not None:
                tf.summary.text(f"{name}_tokens", f"rows (summary): {' '.join(rows)}\n\n"
                                                  f"columns (document): {' '.join(columns)}", step=step)

    def flush(self) -> None:
        if self.enabled:
            self.writer.flush()


CELL = 16  # pixels per attention weight


def attention_heatmap(weights: np.ndarray, *, rows: list[str] | None = None,
                      columns: list[str] | None = None) -> np.ndarray:
    """float32 [H, W, 3] in [0, 1] (pure): the weights as dark blue (low) to yellow (high) cells of CELL
    pixels, with `rows` written left of each row and `columns` written upwards above each column."""
    from PIL import Image, ImageDraw, ImageFont

    w = np.asarray(weights, dtype=np.float32)
    w = (w - w.min()) / max(float(w.max() - w.min()), 1e-9)
    cells = np.stack([w, w, 0.4 * (1.0 - w)], axis=-1)
    cells = np.kron(cells, np.ones((CELL, CELL, 1), dtype=np.float32))
    if rows is None or columns is None:
        return cells
    if (len(rows), len(columns)) != w.shape:
        raise ValueError(f"{len(rows)} row and {len(columns)} column labels for attention weights of shape {w.shape}")
    font = ImageFont.load_default(size=CELL - 4)
    width = lambda text: int(font.getlength(text)) + 1  # noqa: E731
    left, top = max(map(width, rows)) + 6, max(map(width, columns)) + 6
    canvas = Image.new("RGB", (left + cells.shape[1], top + cells.shape[0]), "white")
    canvas.paste(Image.fromarray((255 * cells).astype(np.uint8)), (left, top))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(rows):
        draw.text((left - 3, top + i * CELL + CELL // 2), text, fill="black", font=font, anchor="rm")
    for j, text in enumerate(columns):  # drawn flat on a strip, then turned to read upwards
        strip = Image.new("RGB", (top, CELL), "white")
        ImageDraw.Draw(strip).text((3, CELL // 2), text, fill="black", font=font, anchor="lm")
        canvas.paste(strip.rotate(90, expand=True), (left + j * CELL, 0))
    return np.asarray(canvas, dtype=np.float32) / 255.0


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
