"""ZeRO's pure plan (trainer/parallel/zero.py) and its layout rules (trainer/parallel/layout.py)."""
from __future__ import annotations

import pytest

from tests.conftest import CONFIGS
from trainer.config import load_config
from trainer.errors import ConfigError
from trainer.parallel.layout import layout_for
from trainer.parallel.zero import ModelShape, plan_buckets, plan_stage_buckets, rank_bytes, shard_bytes


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


def test_stage_buckets_never_mix_stages_and_keep_each_stages_variable_order():
    """A pipelined replica: variables interleaved over stages (the model's order need not follow the stages);
    each stage's variables form their own buckets, in model order, with their indices in the model's list."""
    sizes, stages = [5, 3, 10, 2, 7, 4], [1, 0, 0, 1, 0, 1]
    buckets = plan_stage_buckets(sizes, stages, 2, cap=9)
    assert [b.stage for b in buckets] == [0, 0, 0, 1, 1]  # stage 0: 3 | 10 | 7 (cap 9), stage 1: 5+2 | 4
    assert [[p.index for p in b.pieces] for b in buckets] == [[1], [2], [4], [0, 3], [5]]
    for b in buckets:
        assert {stages[p.index] for p in b.pieces} == {b.stage}  # one stage per bucket
        assert b.padded % 2 == 0 and [p.offset for p in b.pieces] == [sum(p.size for p in b.pieces[:i])
                                                                       for i in range(len(b.pieces))]
    for stage in (0, 1):
        indices = [p.index for b in buckets if b.stage == stage for p in b.pieces]
        assert indices == [i for i, s in enumerate(stages) if s == stage]  # model order within the stage
        assert [p.size for b in buckets if b.stage == stage for p in b.pieces] == [sizes[i] for i in indices]
    assert plan_stage_buckets(sizes, [0] * len(sizes), 2, cap=9) == plan_buckets(sizes, 2, cap=9)  # no pipeline
    with pytest.raises(ValueError, match="one stage per variable"):
        plan_stage_buckets(sizes, stages[:-1], 2)


def test_zero_1_and_2_lay_out_with_a_pipeline():
    for zero in (1, 2):
        cfg = load_config(CONFIGS / "transformer_small.yaml", [f"distribution.zero={zero}",
                                                                "distribution.backend=horovod",
                                                                "distribution.pipeline={stages: 2}"])
        layout = layout_for(cfg, 2)
        assert layout.zero == zero and layout.pipeline_stages == 2


def test_shard_bytes_are_the_textbook_fractions():
    p, n = 1_000_000, 4
    zero0, zero1, zero2, zero3 = (shard_bytes(p, n, z) for z in range(4))
    assert (zero0.params, zero0.grads, zero0.optimizer) == (4 * p, 4 * p, 8 * p)  # Adam fp32: 16 bytes/param
    assert zero1.optimizer == 8 * p / n + 4 * p / n and zero1.grads == 4 * p  # moments + master slice
    assert zero2.grads == 4 * p / n and zero2.params == 4 * p
    assert zero3.params == 4 * p / n and zero3.optimizer == 8 * p / n
    assert shard_bytes(p, n, 1, slots=0).optimizer == 4 * p / n  # plain SGD keeps no slots, only the master



def test_zero3_rank_bytes_count_the_whole_levels_it_runs_and_only_the_carries():
    """Zero 3 holds 1/N of the state plus two levels' parameters and one level's gradient whole, and keeps
    the levels' inputs (not their activations) for the recomputing backward; stages 0-2 keep every level's
    activations. A model of 4 blocks of 100 params and 20 fixed: the largest level is a block."""
    shape = ModelShape(20, 400, 1000.0, 4000.0, fixed_inputs=10.0, block_inputs=40.0, largest_level="block_0",
                       largest_level_params=100, largest_level_activations=1000.0)
    state, activations = rank_bytes(shape, 4, 3, slots=2)
    assert state.params == 4 * 420 / 4 + 2 * 4 * 100 and state.grads == 4 * 420 / 4 + 4 * 100
    assert state.optimizer == 8 * 420 / 4 and activations == 10.0 + 40.0 + 1000.0
    state2, activations2 = rank_bytes(shape, 4, 2, slots=2)
    assert activations2 == 5000.0 and state2.params == 4 * 420
    deeper, deeper_acts = rank_bytes(shape, 4, 3, slots=2, depth=2)  # carries scale with depth, the level not
    assert deeper_acts == 10.0 + 80.0 + 1000.0 and deeper.params == 4 * 820 / 4 + 2 * 4 * 100
    assert shape.level_bytes() == 3 * 4 * 100 + 1000.0

@pytest.mark.parametrize("overrides,fragment", [
    (["distribution.zero=1"], "backend is single"),
    (["distribution.zero=2", "distribution.backend=mirrored"], "backend is mirrored"),
    (["distribution.zero=2", "distribution.backend=multi_worker"], "backend horovod only"),
    (["distribution.zero=3", "distribution.backend=horovod", "train.jit_compile=true"],
     "train.jit_compile does not combine with distribution.zero 3"),
    (["distribution.zero=3", "distribution.backend=horovod", "model.dropout=0.1"], "set model.dropout=0.0"),
    (["distribution.zero=1", "distribution.backend=horovod", "train.mixed_precision=float16"], "use bfloat16"),
    (["distribution.zero=3", "distribution.backend=horovod", "distribution.pipeline={stages: 2}",
      "model.dropout=0.0"], "zero 3's level-by-level engine is itself a schedule over the levels; use "
                            "distribution.zero=2 with a pipeline"),
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
