"""TensorBoard output read back with TensorBoard's own reader: the attention heat map carries the tokens it
is about (summary tokens down the side, document tokens along the top), as image labels and as text."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from trainer.summaries import CELL, TensorBoard

ROWS = ["acme", "bought", "farms", "<eos>"]
COLUMNS = ["according", "to", "reports", "acme", "bought", "3", "farms"]


def _read(logdir: Path) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def test_attention_image_has_token_labels_and_a_token_text(tmp_path: Path):
    weights = np.random.default_rng(0).random((len(ROWS), len(COLUMNS)))
    tb = TensorBoard(tmp_path, enabled=True)
    tb.attention_image(7, weights, rows=ROWS, columns=COLUMNS)
    tb.attention_image(8, weights)  # no tokens: the bare heat map, as before
    tb.flush()
    acc = _read(tmp_path)
    labelled, bare = (acc.Tensors("val/attention")[i].tensor_proto.string_val for i in (0, 1))
    image = np.asarray(Image.open(io.BytesIO(labelled[2])).convert("RGB"))
    assert (int(bare[0]), int(bare[1])) == (CELL * len(COLUMNS), CELL * len(ROWS))  # [width, height, png]
    height, width, _ = image.shape
    assert (int(labelled[0]), int(labelled[1])) == (width, height)
    left, top = width - CELL * len(COLUMNS), height - CELL * len(ROWS)
    assert left > 20 and top > 20, (left, top)  # room for the longest label on each axis
    # The margins hold text (dark pixels on white), one label per row and per column.
    for i in range(len(ROWS)):
        assert image[top + i * CELL: top + (i + 1) * CELL, :left].min() < 100, f"row {i} has no label"
    for j in range(len(COLUMNS)):
        assert image[:top, left + j * CELL: left + (j + 1) * CELL].min() < 100, f"column {j} has no label"
    text = acc.Tensors("val/attention_tokens")[0]
    assert text.step == 7
    assert tf.make_ndarray(text.tensor_proto).item().decode() == (
        "rows (summary): acme bought farms <eos>\n\ncolumns (document): according to reports acme bought 3 farms")
