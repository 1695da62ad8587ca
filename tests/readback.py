"""Reading a finished run back the way a user would: its TensorBoard loss curve with TensorBoard's own
reader, and its trainable weights from its newest checkpoint (for equivalence tests)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator


def loss_curve(run_dir: Path, steps: int) -> np.ndarray:
    """`train/loss` at steps 1..steps (asserted: every step logged once, in order)."""
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    events = acc.Tensors("train/loss")
    assert [e.step for e in events] == list(range(1, steps + 1))
    return np.array([tf.make_ndarray(e.tensor_proto) for e in events], dtype=np.float64)


def trainable_weights(run_dir: Path) -> dict[str, np.ndarray]:
    """The model's trainable variables in the run's newest checkpoint, by checkpoint key."""
    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints"))
    return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map() if "_trainable_variables/" in n}
