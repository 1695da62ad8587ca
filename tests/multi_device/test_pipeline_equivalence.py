"""Pipeline parallelism changes where and when a step's work runs, never its result: the pipelined loss,
gradients and 5-step Adam loss curve equal the unpipelined ones (tests/scripts/pipeline_check.py), for
GPipe and 1F1B, with and without recomputation, on 2 and 3 stages of logical CPUs; the graph holds exactly
the schedule's dependencies between stages, in both directions; the measured overlap stays within its bound
and is above 1 where stages have a processor each."""
from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import REPO, run_cmd

pytestmark = pytest.mark.slow

SCRIPT = REPO / "tests" / "scripts" / "pipeline_check.py"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"


@pytest.fixture(scope="module")
def summary() -> dict:
    python = str(VENV_PYTHON if VENV_PYTHON.exists() else sys.executable)
    # ~2 min on 2 idle cores; the limit leaves room for a loaded machine, not for a hang.
    done = run_cmd([python, str(SCRIPT)], timeout=480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_combination_matches_the_unpipelined_step(summary: dict) -> None:
    rows = summary["rows"]
    grid = {(k, m, sched) for k in (2, 3) for m in (1, 2, 4) for sched in ("gpipe", "1f1b")}
    assert {(r["K"], r["M"], r["schedule"]) for r in rows if r["model"] == "transformer"} == grid
    assert {(r["schedule"], r["recompute"]) for r in rows if r["M"] > 1} == {
        ("gpipe", False), ("gpipe", True), ("1f1b", False), ("1f1b", True)}
    assert {r["model"].split("_")[0] for r in rows} == {"summarizer", "transformer"}
    for r in rows:
        where = f"{r['model']} K={r['K']} M={r['M']} {r['schedule']} recompute={r['recompute']}"
        assert r["loss_rel"] < 1e-5, where
        assert r["grad_err"] < 1e-4, where  # per gradient: min(max abs diff, max abs diff / max |ref|)


def test_loss_curves_match(summary: dict) -> None:
    assert len(summary["ref_curve"]) == len(summary["pipe_curve"]) == 5
    assert summary["curve_max_abs"] < 1e-4, (summary["ref_curve"], summary["pipe_curve"])


def test_stages_run_on_their_devices_in_schedule_order(summary: dict) -> None:
    assert summary["placement_ok"]
    assert summary["order_ok"]
    assert all(r["vars_placed"] and r["order_ok"] for r in summary["rows"])
    assert any(r.get("ops_placed") for r in summary["rows"])


def test_indivisible_batch_is_a_clear_error(summary: dict) -> None:
    assert "does not split into 3 equal micro-batches" in (summary["split_error"] or "")


def test_stages_really_run_at_the_same_time(summary: dict) -> None:
    """Measured, not assumed: the engine's clocks show a stage-1 forward running while stage 0 computes the
    next micro-batch; on this shared CPU the overlap reported from compute time stays within its bound."""
    assert summary["forward_concurrent"]
    bound = summary["overlap_bound"]
    assert 0 < max(summary["overlaps"]) <= bound * TOLERANCE, (summary["overlaps"], bound)


TOLERANCE = 1.03  # clock granularity: each op's duration comes from two host callbacks


def test_overlap_is_compute_time_within_the_gpipe_bound(summary: dict) -> None:
    """Ops of known cost (15 ms each, K=2, M=4): stages with a processor each overlap (more than 1.2
    stage-seconds per second; the bound is K*M/(M+K-1) = 1.6); stages sharing one processor cannot beat the
    bound either. Wall-clock op durations, which also count the time an op waited for the shared
    processor, exceed the bound there (1.66-1.72 measured): the old measure failed this test."""
    measured = summary["measurement"]
    bound = measured["bound"]
    for sched in ("gpipe", "1f1b"):
        independent, shared = measured[f"independent_{sched}"], measured[f"shared_{sched}"]
        assert sorted(independent["overlap"])[len(independent["overlap"]) // 2] > 1.2, (sched, independent)
        for case in (independent, shared):
            assert max(case["overlap"]) <= bound * TOLERANCE, (sched, case, bound)
