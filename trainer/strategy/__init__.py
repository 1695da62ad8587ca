"""Distribution backends behind one interface (see base.py). The only package that imports horovod or
calls tf.distribute."""
from __future__ import annotations

from trainer.config import DistributionConfig
from trainer.strategy.base import Strategy


def make_strategy(dist: DistributionConfig) -> Strategy:
    """Build the backend named by `distribution.backend`."""
    if dist.backend == "single":
        from trainer.strategy.single import SingleDevice

        return SingleDevice()
    raise NotImplementedError(f"distribution.backend {dist.backend!r} is not available yet")


__all__ = ["Strategy", "make_strategy"]
