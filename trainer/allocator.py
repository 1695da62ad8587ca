"""The CPU memory allocator of a training process, chosen before TensorFlow allocates anything.

TensorFlow's oneDNN build (on by default on x86) serves every CPU tensor of 256 KiB or more from a BFC pool
(MklCPUAllocator) that keeps the memory it ever held: freed tensors go back to the pool, never to the
system, and the pool fragments as tensors of many sizes come and go. ZeRO 3 is the setting where that costs
most: every step all-gathers and frees each level's weights and gradients, and the pool stayed a level's
worth of bytes per level above the live tensors (bench/zero.py --demo: at width 2048 the resident set after
a step grew by 12 bytes per held parameter over its size after initialisation with the pool, 4-5 without).
With `TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1` those tensors come from glibc malloc, which maps each one of 32 MiB
or more on its own and unmaps it when it is freed.
"""
from __future__ import annotations

import os
from typing import Any, MutableMapping

ENV_SYSTEM_ALLOCATOR = "TF_ONEDNN_USE_SYSTEM_ALLOCATOR"


def choose_allocator(cfg: Any, environ: MutableMapping[str, str] = os.environ) -> bool:
    """Under `distribution.zero: 3`, have TensorFlow's oneDNN CPU allocator use the system allocator (a value
    the user set wins). TensorFlow reads the variable once, when its CPU allocator is first made: call this
    before TensorFlow runs anything. Returns whether the system allocator is asked for."""
    if cfg.distribution.zero == 3:
        environ.setdefault(ENV_SYSTEM_ALLOCATOR, "1")
    return environ.get(ENV_SYSTEM_ALLOCATOR, "0").lower() in ("1", "true")
