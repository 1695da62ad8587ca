"""Strata models: each is a `LevelModel`, an ordered list of `Level`s run on a carry dict.

    model = build_model(cfg.model, vocab_size=..., max_len=..., summary_len=...)   # trainer/tasks/: by kind
    model.build_from_inputs()
    out = model(inputs)                      # == model.run_levels(model.run_levels(inputs, 0, k), k)

No distribution code lives here; the pipeline layer places contiguous level slices on devices.
"""
from __future__ import annotations

from trainer.models.classifier import build_classifier
from trainer.models.decoding import greedy_decode, greedy_decoder, mask_after_eos
from trainer.models.levels import BOS_ID, EOS_ID, PAD_ID, Carry, Level, LevelModel
from trainer.models.summarizer import build_summarizer
from trainer.models.transformer import build_transformer

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "Carry",
    "Level",
    "LevelModel",
    "build_classifier",
    "build_summarizer",
    "build_transformer",
    "greedy_decode",
    "greedy_decoder",
    "mask_after_eos",
]
