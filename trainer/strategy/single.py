"""One replica on the default device."""
from __future__ import annotations

from typing import Any, Callable

import tensorflow as tf

from trainer.strategy.base import Strategy


class SingleDevice(Strategy):
    name = "single"

    def run(self, replica_fn: Callable[[Any], dict], batch: Any) -> dict[str, tf.Tensor]:
        return replica_fn(batch)


def single_device(cfg: Any) -> SingleDevice:
    """distribution.backend single (trainer/strategy/__init__.py BACKENDS)."""
    return SingleDevice()
