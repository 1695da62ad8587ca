"""`strata plan` for sharded data parallel (issue 13): per-rank bytes for zero 0..3 and the largest model that
fits a device's memory, from the real command."""
from __future__ import annotations

import re

from tests.conftest import CONFIGS, strata


def test_plan_shows_per_rank_memory_for_every_zero_stage_and_the_largest_fitting_depth():
    done = strata("plan", str(CONFIGS / "transformer_small.yaml"), "-np", "2", "--set", "distribution.backend=horovod",
                  "--set", "distribution.zero=2", "--device-memory", "80GB")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {int(m.group(1)): m for m in re.finditer(
        r"^  (\d)(\*?)\s+(\S+ \S+)\s+(\S+ \S+)\s+(\S+ \S+)\s+(\S+ \S+)\s+(\S+ \S+)\s+(\d+) x depth", done.stdout, re.M)}
    assert sorted(rows) == [0, 1, 2, 3], done.stdout
    assert rows[2].group(2) == "*" and not rows[0].group(2)  # the configured stage is marked
    assert rows[2].group(4) != rows[0].group(4)  # zero 2 holds half the gradients of zero 0 on 2 ranks
    depths = [int(rows[z].group(8)) for z in range(4)]
    assert depths == sorted(depths) and depths[0] < depths[3]  # sharding more state fits a deeper model
    assert "encoder_layers and decoder_layers" in done.stdout


def test_plan_with_a_pipeline_counts_each_stages_state_sharded():
    """Zero 2 with 2 pipeline stages on 2 ranks: each stage's memory estimate counts 4 + 4/2 + (8 + 4)/2 = 12
    bytes per parameter per rank (trainer/parallel/zero.py shard_bytes), not the replicated 16, and says so."""
    done = strata("plan", str(CONFIGS / "transformer_small.yaml"), "-np", "2", "--set", "distribution.backend=horovod",
                  "--set", "distribution.zero=2", "--set", "distribution.pipeline={stages: 2, device_memory_gb: 0.001}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("zero 2: each stage's optimizer state and gradients sharded over its data-parallel group (2 ranks): "
            "12 bytes per parameter per rank") in done.stdout, done.stdout
    params = [float(m.group(1)) * 1e3 for m in re.finditer(r"^\d\s+\|[^|]+\|[^|]+\|\s*([\d.]+)K", done.stdout, re.M)]
    shown = [float(m.group(1)) * {"KiB": 2**10, "MiB": 2**20}[m.group(2)]
             for m in re.finditer(r"params ([\d.]+) (KiB|MiB)", done.stdout)]
    assert len(params) == len(shown) == 2, done.stdout
    for count, size in zip(params, shown):  # the table rounds counts to 0.1K and sizes to 0.1 unit
        assert abs(size - 12 * count) <= 0.01 * size, (count, size)
