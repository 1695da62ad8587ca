"""ZeRO's pure plan (trainer/parallel/zero.py) and its layout rules (trainer/parallel/layout.py)."""
from __future__ import annotations

import pytest

from tests.conftest import CONFIGS
from trainer.config import load_config
from trainer.errors import ConfigError
from trainer.parallel.layout import layout_for
from trainer.parallel.zero import plan_buckets, shard_bytes


def test_buckets_cover_every_element_once_and_split_evenly_over_ranks():
    sizes = [5, 3, 10, 2, 7]
    for ranks in (1, 2, 3, 4):
        buckets = plan_buckets(sizes, ranks, cap=9)
        pieces = [p for b in buckets for p in b.pieces]
        assert [p.index for p in pieces] == list(range(len(sizes)))  # in order, each variable once, never split
        assert [p.size for p in pieces] == sizes
        for b in buckets:
            assert b.padded % ranks == 0 and 0 <= b.padded - b.size < ranks
            assert [b.owned(r) for r in range(ranks)] == [(r * b.shard, (r + 1) * b.shard) for r in range(ranks)]
            offsets = [p.offset for p in b.pieces]
            assert offsets == [sum(p.size for p in b.pieces[:i]) for i in range(len(b.pieces))]
            assert b.size <= 9 or len(b.pieces) == 1  # a bucket exceeds the cap only for one large variable
    assert [len(b.pieces) for b in plan_buckets(sizes, 2, cap=9)] == [2, 1, 2]  # 5+3 | 10 | 2+7


def test_shard_bytes_are_the_textbook_fractions():
    p, n = 1_000_000, 4
    zero0, zero1, zero2, zero3 = (shard_bytes(p, n, z) for z in range(4))
    assert (zero0.params, zero0.grads, zero0.optimizer) == (4 * p, 4 * p, 8 * p)  # Adam fp32: 16 bytes/param
    assert zero1.optimizer == 8 * p / n + 4 * p / n and zero1.grads == 4 * p  # moments + master slice
    assert zero2.grads == 4 * p / n and zero2.params == 4 * p
    assert zero3.params == 4 * p / n and zero3.optimizer == 8 * p / n
    assert shard_bytes(p, n, 1, slots=0).optimizer == 4 * p / n  # plain SGD keeps no slots, only the master


@pytest.mark.parametrize("overrides,fragment", [
    (["distribution.zero=1"], "backend is single"),
    (["distribution.zero=2", "distribution.backend=mirrored"], "backend is mirrored"),
    (["distribution.zero=2", "distribution.backend=multi_worker"], "backend horovod only"),
    (["distribution.zero=3", "distribution.backend=horovod", "train.jit_compile=true"],
     "train.jit_compile does not combine with distribution.zero 3"),
    (["distribution.zero=3", "distribution.backend=horovod", "model.dropout=0.1"], "set model.dropout=0.0"),
    (["distribution.zero=1", "distribution.backend=horovod", "train.mixed_precision=float16"], "use bfloat16"),
    (["distribution.zero=1", "distribution.backend=horovod", "distribution.pipeline={stages: 2}"],
     "does not combine with distribution.pipeline"),
])
def test_zero_refused_where_it_cannot_run(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(CONFIGS / "summarizer.yaml", overrides)


def test_zero3_refuses_tied_embeddings_and_lays_out_untied():
    tied = ["distribution.zero=3", "distribution.backend=horovod"]
    with pytest.raises(ConfigError, match="model.tie_embeddings shares one matrix between levels embed and head"):
        load_config(CONFIGS / "lm_small.yaml", tied)
    cfg = load_config(CONFIGS / "lm_small.yaml", [*tied, "model.tie_embeddings=false", "data.batch_size=8"])
    assert layout_for(cfg, 2).zero == 3 and layout_for(cfg, 2, pipeline=False).zero == 0


def test_zero_on_horovod_lays_out_and_evaluation_runs_unsharded():
    cfg = load_config(CONFIGS / "transformer_small.yaml", ["distribution.zero=2", "distribution.backend=horovod",
                                                            "train.mixed_precision=bfloat16"])
    assert layout_for(cfg, 2).zero == 2
    assert layout_for(cfg, 2, pipeline=False).zero == 0  # evaluate / export: the whole model, one device
