"""Strata models: each is a `LevelModel`, an ordered list of `Level`s run on a carry dict.

    model = build_model(cfg.model, vocab_size=..., max_len=..., summary_len=...)
    model.build_from_inputs()
    out = model(inputs)                      # == model.run_levels(model.run_levels(inputs, 0, k), k)

No distribution code lives here; the pipeline layer places contiguous level slices on devices.
"""
from __future__ import annotations

from typing import Any

from trainer.models.classifier import build_classifier
from trainer.models.decoding import greedy_decode, greedy_decoder, mask_after_eos
from trainer.models.levels import BOS_ID, EOS_ID, PAD_ID, Carry, Level, LevelModel
from trainer.models.summarizer import build_summarizer
from trainer.models.transformer import build_transformer
from trainer.tasks import workload

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "Carry",
    "Level",
    "LevelModel",
    "build_classifier",
    "build_model",
    "build_summarizer",
    "build_transformer",
    "greedy_decode",
    "greedy_decoder",
    "mask_after_eos",
]


def build_model(cfg_model: Any, *, vocab_size: int, max_len: int, summary_len: int,
                num_classes: int = 2) -> LevelModel:
    """Build the (unbuilt) model for a `cfg.model` section: the builder its kind registers (trainer/tasks/),
    given the sizes its task says it takes.

    Variables are created under the global Keras dtype policy at the first call: set mixed precision
    before calling this, and call `build_from_inputs()` inside the distribution scope. `num_classes`
    (labelled tasks only) comes from the training labels (trainer/data/splits.py `LabelSet`).
    """
    work = workload(cfg_model.kind)  # ValueError naming the known kinds
    dims = work.task.model_dims(max_len=max_len, summary_len=summary_len, num_classes=num_classes)
    return work.build_fn()(cfg_model, vocab_size=vocab_size, **dims)
