"""TensorFlow's own log lines in a launcher's output (pure).

horovodrun imports TensorFlow in the launcher process itself, so its own stderr carries the lines a worker's
filter removes (trainer/output.py): absl lines of level I and W, and known-benign E lines. The launcher
cannot import the trainer; this module holds the rule, for text lines; trainer/output.py applies it to bytes.
STRATA_TF_LOGS=1 shows them (`shown()`).
"""
from __future__ import annotations

import os
import re

from launch.contract import ENV_TF_LOGS

ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_ABSL_LINE = re.compile(r"([IWEF])\d{4} \d+:\d+:\d+(?:\.\d+)?\s+\d+\s+[^\s\]]+:\d+\] ?(.*)", re.DOTALL)
BENIGN_ERRORS = (
    "oneDNN supports ",
    "Unable to register cuDNN factory",
    "Unable to register cuFFT factory",
    "Unable to register cuBLAS factory",
    "computation placer already registered",
)
CONTINUATIONS = ("To enable the following instructions:",)  # the second line of cpu_feature_guard.cc's


def shown(environ=os.environ) -> bool:
    """Whether the user asked to see TensorFlow's log lines (STRATA_TF_LOGS=1)."""
    return environ.get(ENV_TF_LOGS, "") not in ("", "0")


def is_tf_noise(line: str) -> bool:
    """Whether one line is TensorFlow log noise: an absl I/W line, the absl preamble, a benign E line."""
    text = line.rstrip("\r\n")
    if text == ABSL_PREAMBLE:
        return True
    m = _ABSL_LINE.fullmatch(text)
    if m is None:
        return False
    level, message = m.group(1), m.group(2)
    return level in ("I", "W") or (level == "E" and any(b in message for b in BENIGN_ERRORS))


class NoiseLines:
    """Decides line after line, so that a dropped message's second line goes with it."""

    def __init__(self) -> None:
        self.after_noise = False

    def drop(self, line: str) -> bool:
        noise = is_tf_noise(line) or (self.after_noise and line.startswith(CONTINUATIONS))
        self.after_noise = noise
        return noise
