"""Collectives per training step, Strata's Horovod step beside the plain Horovod loop, read from Horovod's
timeline (HOROVOD_TIMELINE): how many tensors each step reduces, in how many transport operations (Horovod
fuses tensors that are ready in the same cycle into one), and how many of those wait on another's result.

    .venv/bin/python bench/collectives.py [--config configs/summarizer.yaml] [--steps 60] [--batch 64]
                                          [--baseline DIR] [--keep]

Each side trains 2 workers (Gloo, pinned one core each) for --steps steps with the timeline on (rank 0
writes it); the first --skip steps (tracing, the broadcast) are left out. --baseline DIR: also Strata's
step with the code in DIR first on PYTHONPATH (e.g. `git archive COMMIT | tar -x -C DIR`), to show what a
change removed. Timings in a timeline run are slowed by the timeline itself: read the counts, not the
times (bench/scaling.py measures throughput).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAIN_SCRIPT = ROOT / "bench" / "_plain_horovod.py"


def read_timeline(path: Path) -> list[dict]:
    """The timeline's events (Horovod leaves the JSON array open while it runs)."""
    text = path.read_text().rstrip().rstrip(",")
    return json.loads(text if text.endswith("]") else text + "]")


def per_step(events: list[dict], steps: int, skip: int) -> dict[str, float]:
    """Counts per step over steps skip+1..steps (pure): tensors reduced or gathered, transport operations
    (one per fused launch), and the tensors named like Strata's step outputs (`metric_*`)."""
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name" and "name" in e.get("args", {})}
    launches: dict[tuple[int, str], list[str]] = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "B" and e.get("name", "").startswith(("GLOO_ALLREDUCE", "GLOO_ALLGATHER", "MPI_ALLREDUCE",
                                                                 "MPI_ALLGATHER")):
            launches[(e["ts"], e["name"])].append(names.get(e["pid"], "?"))
    ordered = sorted(launches.items())
    per_tensor = collections.Counter(n for _, group in ordered for n in group)
    # A step's gradient of the first variable is reduced once per step: its occurrences mark the steps.
    anchor = max(per_tensor, key=lambda n: (per_tensor[n] == max(per_tensor.values()), n))
    marks = [i for i, (_, group) in enumerate(ordered) if anchor in group]
    kept = ordered[marks[skip]:marks[-1]] if len(marks) > skip + 1 else ordered
    n = max(len(marks) - 1 - skip, 1)
    tensors = [name for _, group in kept for name in group]
    return {"steps counted": n, "tensors reduced": len(tensors) / n, "transport operations": len(kept) / n,
            "step outputs reduced (metric_*)": sum(t.startswith("metric_") for t in tensors) / n,
            "largest fused group": max(len(g) for _, g in kept)}


def run(argv: list[str], env: dict, cwd: Path, log: Path, timeout: float) -> None:
    with open(log, "wb") as out:
        done = subprocess.run(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if done.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"bench/collectives.py: {argv[0]} exited {done.returncode}\n{tail}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/summarizer.yaml")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=10, help="first steps left out (tracing, broadcast)")
    p.add_argument("--batch", type=int, default=64, help="global batch (2 workers)")
    p.add_argument("--baseline", metavar="DIR", help="also Strata with the code in DIR first on PYTHONPATH")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    if args.steps <= args.skip + 2:
        p.error("--steps must exceed --skip by at least 3")
    bin_dir = Path(sys.executable).parent
    work = Path(tempfile.mkdtemp(prefix="strata-collectives-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOROVOD_", "OMPI_", "STRATA_"))}
    env.update(TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", STRATA_PIN_CPU="1", TF_CPP_MIN_LOG_LEVEL="2")
    sets = [f"train.steps={args.steps}", f"data.batch_size={args.batch}", "train.log_every=10",
            f"eval.every={10**9}", f"checkpoint.every={10**9}", "logging.progress_bar=false", "eval.max_batches=1",
            "eval.rouge_examples=1"]
    config = str(Path(args.config).resolve())
    # `python -m trainer` finds `trainer` in its working directory first: the baseline runs from DIR.
    sides = {"Strata (horovod, Gloo)": ("strata", env, ROOT)}
    if args.baseline:
        base = Path(args.baseline).resolve()
        sides[f"Strata, code of {args.baseline}"] = ("strata", {**env, "PYTHONPATH": os.pathsep.join(
            [str(base), *filter(None, [env.get("PYTHONPATH")])])}, base)
    sides["plain Horovod loop (Gloo)"] = ("plain", env, ROOT)
    results = {}
    for i, (label, (kind, side_env, cwd)) in enumerate(sides.items()):
        timeline, run_dir = work / f"timeline-{i}.json", work / f"run-{i}"
        more = [x for s in [*sets, f"run_dir={run_dir}"] for x in ("--set", s)]
        if kind == "strata":
            argv = [str(bin_dir / "strata"), "launch", "-np", "2", "--backend", "horovod", config, *more,
                    "--set", f"distribution.horovod.timeline={timeline}"]
        else:
            argv = [str(bin_dir / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo", "--timeline-filename",
                    str(timeline), sys.executable, str(PLAIN_SCRIPT), config, *more]
        print(f"{label} ...", flush=True)
        run(argv, side_env, cwd, work / f"run-{i}.log", timeout=600 + 5 * args.steps)
        results[label] = per_step(read_timeline(timeline), args.steps, args.skip)
    keys = list(next(iter(results.values())))
    width = max(map(len, keys))
    print(f"\nconfig={Path(args.config).name} 2 workers, global batch {args.batch}, steps {args.skip + 1}-{args.steps}")
    print(f"{'per step':<{width}} | " + " | ".join(f"{k:>28}" for k in results))
    for key in keys:
        print(f"{key:<{width}} | " + " | ".join(f"{r[key]:>28.2f}" for r in results.values()))
    if args.keep:
        print(f"timelines and logs: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
