"""Parallel planning (pure): the layout's rules, stage partitions, GPipe/1F1B schedules and their simulated
bubble and memory, and the `strata plan` text."""
from __future__ import annotations

import itertools
import random
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import config_from_dict
from trainer.errors import ConfigError
from trainer.parallel import layout, partition, report, schedule as sched  # pure: no TensorFlow import

LEVELS = ["embed", "encoder_1", "encoder_2", "decoder", "output"]


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ============================================================================ explicit_partition
def test_explicit_partition_returns_half_open_ranges():
    stages = [["embed", "encoder_1"], ["encoder_2", "decoder"], ["output"]]
    assert partition.explicit_partition(LEVELS, stages) == [(0, 2), (2, 4), (4, 5)]
    assert partition.explicit_partition(LEVELS, [LEVELS]) == [(0, 5)]
    assert partition.stage_level_names(LEVELS, [(0, 2), (2, 4), (4, 5)]) == stages


@pytest.mark.parametrize("stages, message", [
    ([["embed", "encoder_1", "encoder_2", "decoder"], ["decoder", "output"]],
     "level 'decoder' is in stage 0 and stage 1; keep it in one stage"),
    ([["embed", "embed", "encoder_1", "encoder_2", "decoder", "output"]],
     "level 'embed' is listed twice in stage 0"),
    ([["encoder_1", "encoder_2", "decoder", "output"], ["embed"]],
     "stages must follow the model's level order: 'embed' (stage 1) is listed after 'output' (stage 0)"),
    ([["embed", "encoder_2", "encoder_1", "decoder", "output"]],
     "stages must follow the model's level order: 'encoder_1' (stage 0) is listed after 'encoder_2'"),
    ([["embed", "encoder_1"], ["encoder_2", "decoder"]],
     "level 'output' is in no stage; add it to stage 1"),
    ([["encoder_1"], ["encoder_2", "decoder", "output"]],
     "level 'embed' is in no stage; add it to stage 0"),
    ([["embed", "encoder_1"], ["decoder", "output"]],
     "level 'encoder_2' is in no stage; add it to stage 0 or stage 1"),
    ([["embed", "encoder_2"], ["decoder", "output"]],
     "level 'encoder_1' is in no stage; add it to stage 0"),
    ([["embed", "encoder_1"], ["encoder_2", "decodr", "output"]],
     "unknown level 'decodr'; levels are: embed, encoder_1, encoder_2, decoder, output; did you mean 'decoder'?"),
    ([["embed", "encoder_1"], [], ["encoder_2", "decoder", "output"]],
     "stage 1 is empty; give every stage at least one level"),
    ([], "no stages given"),
    (["embed", "encoder_1"], "stage 0 is the string 'embed'"),
])
def test_explicit_partition_errors_name_the_level_and_fix(stages, message):
    with pytest.raises(ValueError) as excinfo:
        partition.explicit_partition(LEVELS, stages)
    assert message in _one_line_error(excinfo)


# ============================================================================ balanced_partition
def _brute_force(costs, stages, memory=None, capacity=None):
    """Best (max stage cost, earliest boundaries) split by enumeration; None when nothing fits."""
    n = len(costs)
    best = None
    # combinations() yields boundary tuples in lexicographic order, so the first optimum is the earliest.
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = [0, *cuts, n]
        split = list(zip(bounds, bounds[1:]))
        if memory is not None and any(sum(memory[i:j]) > capacity[k] + 1e-9 for k, (i, j) in enumerate(split)):
            continue
        worst = max(sum(costs[i:j]) for i, j in split)
        if best is None or worst < best[0] - 1e-9:
            best = (worst, split)
    return best


def test_balanced_partition_matches_brute_force_and_prefers_earlier_boundaries():
    rng = random.Random(1234)
    for _ in range(300):
        n = rng.randint(1, 9)
        stages = rng.randint(1, n)
        # Small integer costs make ties common, which exercises the tie-break.
        costs = [float(rng.randint(0, 4)) for _ in range(n)]
        expected = _brute_force(costs, stages)
        got = partition.balanced_partition(costs, stages)
        assert got == expected[1], (costs, stages)
        assert max(partition.stage_costs(costs, got)) == expected[0]


def test_balanced_partition_with_memory_matches_brute_force():
    rng = random.Random(99)
    checked_infeasible = 0
    for _ in range(300):
        n = rng.randint(1, 8)
        stages = rng.randint(1, n)
        costs = [float(rng.randint(1, 5)) for _ in range(n)]
        memory = [float(rng.randint(1, 6)) for _ in range(n)]
        capacity = [float(rng.randint(3, 14)) for _ in range(stages)]
        expected = _brute_force(costs, stages, memory, capacity)
        if expected is None:
            checked_infeasible += 1
            with pytest.raises(ValueError, match="fits in memory"):
                partition.balanced_partition(costs, stages, memory=memory, capacity=capacity)
            continue
        got = partition.balanced_partition(costs, stages, memory=memory, capacity=capacity)
        assert got == expected[1], (costs, memory, capacity)
    assert checked_infeasible > 10


def test_balanced_partition_examples():
    assert partition.balanced_partition([1, 2, 3, 4, 5, 6, 7, 8, 9], 3) == [(0, 5), (5, 7), (7, 9)]
    assert partition.balanced_partition([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert partition.balanced_partition([5, 1, 1, 1], 2) == [(0, 1), (1, 4)]
    assert partition.balanced_partition([3, 1, 2], 3) == [(0, 1), (1, 2), (2, 3)]
    # Tie: [1 | 1 1] and [1 1 | 1] are both optimal (2); the earlier boundary wins.
    assert partition.balanced_partition([1, 1, 1], 2) == [(0, 1), (1, 3)]
    # Memory pushes the heavy level off the small device even though it makes the slowest stage slower.
    assert partition.balanced_partition([1, 1, 1, 1], 2, memory=[1, 1, 1, 5], capacity=[10, 5]) == [(0, 3), (3, 4)]
    # One capacity for every stage; floating-point sums that fit exactly still fit.
    assert partition.balanced_partition([1, 1, 1], 1, memory=[0.1, 0.2, 0.0], capacity=0.3) == [(0, 3)]


def test_balanced_partition_errors():
    with pytest.raises(ValueError) as excinfo:
        partition.balanced_partition([1, 2, 3], 4)
    assert "more stages (4) than levels (3)" in _one_line_error(excinfo)
    with pytest.raises(ValueError) as excinfo:
        partition.balanced_partition([5, 5, 5, 5], 2, memory=[3, 3, 9, 3], capacity=[8, 8])
    # Best split [3 3 | 9 3] over-fills stage 1 by 4, less than any other split.
    assert "at best stage 1 (levels 2-3) needs 12 but its capacity is 8" in _one_line_error(excinfo)
    with pytest.raises(ValueError, match=r"1 level into 1 stage fits in memory: at best stage 0 \(level 0\) needs 9"):
        partition.balanced_partition([1], 1, memory=[9], capacity=[8])
    with pytest.raises(ValueError, match="both memory"):
        partition.balanced_partition([1, 2], 1, memory=[1, 1])
    with pytest.raises(ValueError, match="capacity has 1 entries but there are 2 stages"):
        partition.balanced_partition([1, 2], 2, memory=[1, 1], capacity=[4])
    with pytest.raises(ValueError, match=r"costs\[1\] is -1"):
        partition.balanced_partition([1, -1], 1)
    with pytest.raises(ValueError, match="positive integer"):
        partition.balanced_partition([1, 2], 0)


def test_stage_costs_and_imbalance():
    costs = [1.0, 2.0, 3.0, 6.0]
    assert partition.stage_costs(costs, [(0, 3), (3, 4)]) == [6.0, 6.0]
    assert partition.imbalance(costs, [(0, 3), (3, 4)]) == 1.0
    assert partition.imbalance(costs, [(0, 1), (1, 4)]) == pytest.approx(11 / 6)
    assert partition.imbalance([0.0, 0.0], [(0, 1), (1, 2)]) == 1.0
    with pytest.raises(ValueError, match="stage 1 covers levels"):
        partition.stage_costs(costs, [(0, 2), (3, 4)])
    with pytest.raises(ValueError, match="covers levels \\[0, 3\\) but the model has 4 levels"):
        partition.stage_costs(costs, [(0, 3)])


# ============================================================================ schedules
KM = [(k, m) for k in (1, 2, 3, 4, 6) for m in (1, 2, 3, 4, 5, 8, 13)]
SCHEDULE_FNS = {"gpipe": sched.gpipe_schedule, "1f1b": sched.one_f_one_b_schedule}


@pytest.mark.parametrize("name", SCHEDULE_FNS)
def test_every_op_appears_exactly_once_per_stage(name):
    for k, m in KM:
        schedule = SCHEDULE_FNS[name](k, m)
        assert len(schedule) == k
        want = sorted((kind, i) for kind in "FB" for i in range(m))
        for ops in schedule:
            assert sorted(ops) == want
            # A stage never runs a backward before its own forward of that micro-batch.
            assert all(ops.index(("F", i)) < ops.index(("B", i)) for i in range(m))


def test_gpipe_runs_all_forwards_then_backwards_last_micro_batch_first():
    assert sched.gpipe_schedule(2, 3) == [
        [("F", 0), ("F", 1), ("F", 2), ("B", 2), ("B", 1), ("B", 0)],
    ] * 2


def test_one_f_one_b_warmup_steady_cooldown():
    schedule = sched.one_f_one_b_schedule(4, 6)
    for s, ops in enumerate(schedule):
        warmup = min(4 - s - 1, 6)
        assert ops[:warmup] == [("F", m) for m in range(warmup)]
        assert ops[warmup] == ("F", warmup)  # steady state starts with one forward ...
        assert ops[warmup + 1] == ("B", 0)  # ... then one backward
    assert schedule[3] == [(kind, m) for m in range(6) for kind in "FB"]  # the last stage: pure 1F1B
    assert schedule[0] == [("F", 0), ("F", 1), ("F", 2), ("F", 3), ("B", 0), ("F", 4), ("B", 1),
                           ("F", 5), ("B", 2), ("B", 3), ("B", 4), ("B", 5)]
    # Fewer micro-batches than warm-up slots: all forwards, then all backwards in order.
    assert sched.one_f_one_b_schedule(4, 2)[0] == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]


@pytest.mark.parametrize("name", SCHEDULE_FNS)
@pytest.mark.parametrize("backward_time", [2.0, 1.0, 3.0])
def test_simulated_bubble_equals_theory_for_uniform_stages(name, backward_time):
    for k, m in KM:  # includes M < K
        timeline = sched.simulate(SCHEDULE_FNS[name](k, m), forward_time=1.0, backward_time=backward_time)
        theory = sched.theoretical_bubble(k, m)
        assert timeline.bubble == pytest.approx(theory, abs=1e-12), (k, m)
        assert timeline.stage_bubble == pytest.approx([theory] * k, abs=1e-12)
        assert timeline.makespan == pytest.approx((m + k - 1) * (1.0 + backward_time))
        assert timeline.busy == pytest.approx([m * (1.0 + backward_time)] * k)


def test_peak_live_activations_gpipe_m_and_1f1b_at_most_k():
    for k, m in KM:
        gpipe = sched.simulate(sched.gpipe_schedule(k, m)).peak_live
        one_f_one_b = sched.simulate(sched.one_f_one_b_schedule(k, m)).peak_live
        assert gpipe[0] == m
        assert gpipe == [m] * k
        assert one_f_one_b == [min(k - s, m) for s in range(k)]
        assert max(one_f_one_b) <= k
    assert sched.peak_live_micro_batches("1f1b", 4, 16) == [4, 3, 2, 1]
    assert sched.peak_live_micro_batches("gpipe", 4, 16) == [16] * 4


@pytest.mark.parametrize("name", SCHEDULE_FNS)
def test_simulated_times_respect_dependencies(name):
    for k, m in KM:
        # Unequal stage times so that dependencies, not symmetry, decide the start times.
        fwd = [1.0 + 0.5 * s for s in range(k)]
        bwd = [2.5 - 0.25 * s for s in range(k)]
        tl = sched.simulate(SCHEDULE_FNS[name](k, m), forward_time=fwd, backward_time=bwd)
        for s in range(k):
            ops = tl.ops[s]
            assert [(t.kind, t.micro_batch) for t in ops] == SCHEDULE_FNS[name](k, m)[s]
            for prev, cur in zip(ops, ops[1:]):
                assert cur.start >= prev.end  # one op at a time, in order
            for t in ops:
                assert t.end - t.start == (fwd[s] if t.kind == "F" else bwd[s])
                if t.kind == "F" and s > 0:
                    assert t.start >= tl.op(s - 1, "F", t.micro_batch).end
                if t.kind == "B":
                    assert t.start >= tl.op(s, "F", t.micro_batch).end
                    if s < k - 1:
                        assert t.start >= tl.op(s + 1, "B", t.micro_batch).end
        assert tl.makespan == max(t.end for ops in tl.ops for t in ops)
        assert tl.ops[0][0].start == 0.0


def test_unbalanced_stages_have_a_bigger_bubble():
    tl = sched.simulate(sched.one_f_one_b_schedule(2, 8), forward_time=[1.0, 3.0], backward_time=[2.0, 6.0])
    assert tl.bubble > sched.theoretical_bubble(2, 8)
    assert tl.stage_bubble[1] < tl.stage_bubble[0]  # the slow stage is the busy one


@pytest.mark.parametrize("schedule, stuck", [
    # Stage 0 wants B0 before it has run F0 itself.
    ([[("B", 0), ("F", 0)], [("F", 0), ("B", 0)]], "stage 0 waits at B0 for F0 on stage 0"),
    # Stage 0 waits for B1 from stage 1, which waits for F1 that stage 0 only runs after B1.
    ([[("F", 0), ("B", 1), ("F", 1), ("B", 0)], [("F", 0), ("F", 1), ("B", 1), ("B", 0)]],
     "stage 1 waits at F1 for F1 on stage 0"),
    # Stage 1 insists on B1 first; stage 0 runs the forwards but stage 1's order blocks B0 forever.
    ([[("F", 0), ("F", 1), ("B", 0), ("B", 1)], [("F", 0), ("B", 1), ("F", 1), ("B", 0)]],
     "stage 1 waits at B1 for F1 on stage 1"),
])
def test_deadlocking_schedule_raises(schedule, stuck):
    with pytest.raises(sched.ScheduleDeadlock) as excinfo:
        sched.simulate(schedule)
    assert isinstance(excinfo.value, ValueError)
    msg = _one_line_error(excinfo)
    assert msg.startswith("schedule deadlocks: ") and stuck in msg


@pytest.mark.parametrize("schedule, message", [
    ([[("F", 0), ("B", 0)], [("F", 0)]], "stage 1 never runs ('B', 0)"),
    ([[("F", 0), ("B", 0), ("B", 0)]], "stage 0 runs ('B', 0) twice"),
    ([[("F", 0), ("X", 0), ("B", 0)]], "stage 0 has op ('X', 0)"),
    ([[("F", 0), ("B", 0)], [("F", 1), ("B", 1)]], "stage 1 has op ('F', 1)"),
    ([], "no stages"),
    ([[("B", 0)]], "stage 0 runs no forward"),
])
def test_malformed_schedule_raises(schedule, message):
    with pytest.raises(ValueError, match=None) as excinfo:
        sched.simulate(schedule)
    assert not isinstance(excinfo.value, sched.ScheduleDeadlock)
    assert message in _one_line_error(excinfo)


def test_bubble_and_speedup_formulas():
    assert sched.theoretical_bubble(1, 5) == 0.0
    assert sched.theoretical_bubble(4, 4) == pytest.approx(3 / 7)
    assert sched.theoretical_bubble(2, 2) == pytest.approx(1 / 3)
    assert sched.gpipe_speedup_bound(4, 4) == pytest.approx(16 / 7)
    assert sched.gpipe_speedup_bound(4, 4) == pytest.approx(4 * (1 - sched.theoretical_bubble(4, 4)))
    assert sched.gpipe_speedup_bound(1, 7) == 1.0
    with pytest.raises(ValueError, match="micro_batches must be a positive integer"):
        sched.theoretical_bubble(2, 0)
    with pytest.raises(ValueError, match="unknown schedule 'interleaved'"):
        sched.make_schedule("interleaved", 2, 2)


# ============================================================================ layout
def _config(batch: int = 32, micro_batches: int | None = 4, stages: int = 2, **train):
    pipeline = {"stages": stages, "micro_batches": micro_batches} if micro_batches else None
    return config_from_dict({"name": "p", "model": {"kind": "summarizer", "encoder_layers": 2},
                             "data": {"batch_size": batch}, "train": train, "distribution": {"pipeline": pipeline}})


def test_layout_sizes():
    four = layout.layout_for(_config(256, 8, 4), 2)
    assert (four.per_replica_batch, four.micro_batch_size, four.devices, four.pipelined) == (128, 16, 8, True)
    one = layout.layout_for(_config(32, 4, 2), 1)
    assert (one.per_replica_batch, one.micro_batch_size) == (32, 8)
    accum = layout.layout_for(_config(64, None, grad_accum=4), 2)
    assert (accum.per_replica_batch, accum.micro_batch_size, accum.pipelined) == (32, 8, False)
    assert layout.layout_for(_config(), 4).data_shard(3, 4) == (3, 4)  # one process per replica: its rank


@pytest.mark.parametrize("cfg, replicas, message", [
    (dict(batch=32, micro_batches=3), None,
     "distribution.pipeline.micro_batches (3) must divide data.batch_size (32); try micro_batches=2"),
    (dict(batch=64, micro_batches=64), 2,
     "distribution.pipeline.micro_batches (64) must divide the per-replica batch (32) of data.batch_size 64 over "
     "replicas (2); try micro_batches=32 or data.batch_size=128"),
    (dict(batch=30, micro_batches=1), 4,
     "data.batch_size (30) must be divisible by replicas (4): at most 3 replica(s) of this config fit; use fewer "
     "or set data.batch_size=28"),
    (dict(batch=32, micro_batches=None, grad_accum=5), None, "train.grad_accum (5) must divide data.batch_size (32)"),
    (dict(batch=32, micro_batches=4, stages=7), None, "stages (7) exceeds the 6 levels"),
    (dict(batch=32, micro_batches=4, grad_accum=2), None, "train.grad_accum must be 1 with distribution.pipeline"),
])
def test_layout_errors_are_one_line_naming_the_fields(cfg, replicas, message):
    if replicas is None:  # a rule the config alone breaks: refused when the config is read
        with pytest.raises(ConfigError) as excinfo:
            _config(**cfg)
    else:
        with pytest.raises(layout.LayoutError) as excinfo:
            layout.layout_for(_config(**cfg), replicas)
    assert message in _one_line_error(excinfo)


def test_layout_messages_say_how_the_replicas_were_asked_for():
    with pytest.raises(layout.LayoutError) as excinfo:
        layout.layout_for(_config(32, 4), 3, "-np ({n})")
    assert "data.batch_size (32) must be divisible by -np (3): at most 2 replica(s)" in _one_line_error(excinfo)
    with pytest.raises(layout.LayoutError, match="replicas must be a positive integer"):
        layout.layout_for(_config(), 0)


# ============================================================================ PipelineReport / format_report
def _plan(**overrides):
    fields = dict(
        stages=2, micro_batches=8, schedule="1f1b",
        stage_levels=[["embed", "encoder_1", "encoder_2"], ["decoder", "output"]],
        global_batch=128, replicas=2,
        stage_params=[1_500_000, 2_000_000], stage_activation_bytes=[64 * 2**20, 32 * 2**20],
        stage_costs=[1.0, 1.1], device_memory_bytes=16 * 2**30,
    )
    fields.update(overrides)
    return report.PipelineReport(**fields)


def test_plan_numbers():
    plan = _plan()
    assert (plan.per_replica_batch, plan.micro_batch_size) == (64, 8)
    assert plan.bubble == pytest.approx(1 / 9)
    assert plan.peak_live == [2, 1]
    assert plan.activation_bytes(0) == 2 * 64 * 2**20
    assert plan.memory_bytes(1) == 2_000_000 * 16 + 32 * 2**20
    assert _plan(schedule="gpipe").peak_live == [8, 8]
    assert plan.warnings() == []


def test_plan_with_zero_counts_the_sharded_bytes_per_parameter_and_says_so():
    from trainer.parallel.zero import shard_bytes

    plan = _plan(zero=2, bytes_per_param=shard_bytes(1, 2, 2).total)  # 2 ranks: 4 + 2 + 6 bytes per parameter
    assert plan.memory_bytes(1) == 2_000_000 * 12 + 32 * 2**20
    assert "zero 2: each stage's optimizer state and gradients sharded over its data-parallel group (2 ranks): " \
           "12 bytes per parameter per rank" in report.format_report(plan)
    assert "zero" not in report.format_report(_plan())


def test_plan_warnings():
    few = _plan(micro_batches=2, global_batch=64)
    assert few.warnings() == ["micro_batches (2) < 4 x stages (2): bubble 33%; use >= 8"]

    unbalanced = _plan(stage_costs=[0.001, 0.003])  # seconds, measured; shown in ms like the level table
    (warning,) = unbalanced.warnings()
    assert warning.startswith("stages are unbalanced: 1 ms, 3 ms per micro-batch (slowest/mean 1.50 > 1.25); "
                              "move levels off stage 1")

    assert _plan(stage_costs=[1.0, 1.5]).warnings() == []  # 1.2 <= 1.25

    tight = _plan(schedule="gpipe", device_memory_bytes=[16 * 2**30, 256 * 2**20])
    (warning,) = tight.warnings()
    assert warning.startswith("stage 1 needs ~")
    assert "(params 30.5 MiB + activations 8 x 32.0 MiB) but GPU:1 has 256.0 MiB" in warning
    assert "use the 1f1b schedule" in warning
    assert _plan(device_memory_bytes=[16 * 2**30, 256 * 2**20]).warnings() == []  # 1F1B keeps only 1 alive

    assert all("\n" not in w for w in few.warnings() + unbalanced.warnings() + tight.warnings())


def test_plan_rejects_inconsistent_fields():
    with pytest.raises(ValueError, match="stage_levels has 1 entries but there are 2 stages"):
        _plan(stage_levels=[LEVELS])
    with pytest.raises(ValueError, match="unknown schedule 'zb'"):
        _plan(schedule="zb")


def test_format_plan_table():
    text = report.format_report(_plan(devices=["/gpu:0", "/gpu:1"], micro_batches=4, global_batch=64))
    lines = text.splitlines()
    assert lines[0] == "pipeline: 2 stages x 2 replicas, 4 devices"
    assert [c.strip() for c in lines[1].split("|")] == ["stage", "device", "levels", "params", "activation memory"]
    assert set(lines[2]) <= {"-", "+"}
    assert [c.strip() for c in lines[3].split("|")] == [
        "0", "/gpu:0", "embed, encoder_1, encoder_2", "1.5M", "128.0 MiB (2 x 64.0 MiB)"]
    assert [c.strip() for c in lines[4].split("|")] == ["1", "/gpu:1", "decoder, output", "2.0M", "32.0 MiB (1 x 32.0 MiB)"]
    # Columns line up.
    assert len({line.index("|") for line in lines[1:5] if "|" in line}) == 1
    assert "schedule: 1f1b, 4 micro-batches per step" in text
    assert "bubble: 20.0% idle = (K-1)/(M+K-1) = 1/5" in text
    assert "micro-batch size 8 (32 / 4)" in text
    assert "warnings:\n  - micro_batches (4) < 4 x stages (2): bubble 20%; use >= 8" in text


def test_format_plan_without_estimates():
    plan = report.PipelineReport(stages=1, micro_batches=1, schedule="gpipe", stage_levels=[LEVELS], global_batch=8)
    text = report.format_report(plan)
    assert "| GPU:0  |" in text and "| -" in text
    assert "bubble: 0.0% idle" in text
    assert "warnings" not in text


# ============================================================================ purity and speed
def test_module_imports_no_tensorflow():
    code = (
        "import sys\n"
        "import trainer.parallel.layout, trainer.parallel.partition, trainer.parallel.report, trainer.parallel.schedule\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('tensorflow', 'keras', 'numpy', 'pydantic')\n"
        "             or (n.startswith('trainer.') and not n.startswith('trainer.parallel')))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


def test_large_plan_is_fast():
    import time

    t0 = time.perf_counter()
    timeline = sched.simulate(sched.one_f_one_b_schedule(16, 128))
    assert timeline.bubble == pytest.approx(sched.theoretical_bubble(16, 128))
    partition.balanced_partition([float(i % 7 + 1) for i in range(48)], 8)
    assert time.perf_counter() - t0 < 1.0


# ---------------------------------------------------------------------------------- strata plan helpers
def test_plan_rank_placement_and_device_labels():
    from launch.launcher import rank_hosts
    from trainer.config import PipelineConfig
    from trainer.plan import device_label, parse_ranks

    ranks = rank_hosts(np=3, hosts_spec="a:2,b:2", hostfile=None)
    assert ranks == ["a:0", "a:1", "b:0"]
    assert parse_ranks(",".join(ranks)) == [("a", 0), ("a", 1), ("b", 0)]
    pipe = PipelineConfig(stages=2)
    # The local rank's block of K GPUs; logical CPUs without GPUs; explicit devices win.
    assert [device_label(pipe, s, 1, gpus_here=4) for s in (0, 1)] == ["/gpu:2", "/gpu:3"]
    assert device_label(pipe, 1, 1, gpus_here=0) == "/cpu:1 (logical)"
    explicit = PipelineConfig(stages=2, devices=["/gpu:5", "/gpu:7"])
    assert device_label(explicit, 1, 0, gpus_here=8) == "/gpu:7"


def test_plan_rank_list_errors_are_one_line():
    from trainer.errors import ConfigError
    from trainer.plan import parse_ranks

    with pytest.raises(ConfigError, match="host:local_rank"):
        parse_ranks("a:0,b")


def test_recompute_changes_the_activation_estimate():
    base = dict(stages=2, micro_batches=8, schedule="gpipe", stage_levels=[["a"], ["b"]], global_batch=32,
                stage_activation_bytes=[100.0, 100.0], stage_boundary_bytes=[10.0, 10.0])
    keep_all = report.PipelineReport(**base)
    recompute = report.PipelineReport(**base, recompute=True)
    assert keep_all.activation_bytes(0) == 8 * 100.0  # GPipe keeps all M micro-batches
    assert recompute.activation_bytes(0) == 8 * 10.0 + 100.0  # inputs of M, plus one re-run forward
    assert "8 x 10 B inputs + 100 B recomputed" in report.format_report(recompute)


def test_stage_device_names():
    assert layout.stage_device_names(2, 1, gpus=4) == ["/gpu:2", "/gpu:3"]
    assert layout.stage_device_names(3, 0, gpus=0) == ["/cpu:0", "/cpu:1", "/cpu:2"]
    assert layout.stage_device_names(2, 5, gpus=8, explicit=["/gpu:6", "/gpu:1"]) == ["/gpu:6", "/gpu:1"]
