"""Horovod allreduce bus bandwidth over loopback point-to-point bandwidth, Gloo and MPI, plus tensor fusion.

    .venv/bin/python bench/allreduce.py [--sizes 4K,64K,1M,16M,64M] [--repeats 3] [--controllers gloo,mpi] [--pin]

Method
------
For each controller the driver launches 2 ranks on this host through horovodrun (both controllers, so both
get the same launcher and the same unpinned placement):

    horovodrun -np 2 -H localhost:2 --gloo  python bench/_allreduce_worker.py ...
    horovodrun -np 2 -H localhost:2 --mpi --mpi-args=--oversubscribe  python bench/_allreduce_worker.py ...

(horovodrun's mpirun line already carries --allow-run-as-root, -bind-to none, -mca pml ob1.) Each rank runs
with TF_NUM_INTRAOP_THREADS=TF_NUM_INTEROP_THREADS=OMP_NUM_THREADS=1, i.e. one compute thread per rank, one
core each on a 2-core box. Ranks are NOT pinned by default: Horovod's background thread and the transport's
threads then float to whichever core is idle; --pin binds rank i to core i (sched_setaffinity before TF starts).

Per size, inside one launch, blocks alternate: N allreduces, then N ping-pongs, repeated --repeats times, after
a warm-up (N is 3 for 64 MB up to 60 for small sizes; ~128 MiB moved per block). Rank 0 times each iteration.

  allreduce   hvd.allreduce(op=Sum) of a float32 tensor of that many bytes, inside a tf.function.
              bus GB/s = 2(n-1)/n * bytes / median time  (n = 2, so simply bytes / time).
  p2p         one message in flight between the same two ranks, GB/s = bytes / (median round trip / 2).
              Gloo's baseline is a plain TCP socket over 127.0.0.1 (Gloo's transport is TCP over loopback);
              MPI's baseline is mpi4py Send/Recv, i.e. the same Open MPI BTL (shared memory, "vader") that
              Horovod's MPI_Allreduce uses. The two baselines are therefore different transports.
  ratio       bus / p2p, both measured in the same processes at the same time. 1.0 would mean the allreduce
              moves data as fast as a bare one-way transfer; the ring allreduce sends as many bytes per rank
              as the ping-pong does, but in both directions at once, plus a reduction and copies.

Tensor fusion: 256 tensors of 16 KB (4 MB total) allreduced as separate ops in one tf.function, under Horovod's
default fusion threshold (fusion on) and under HOROVOD_FUSION_THRESHOLD=0 (fusion off, a separate launch,
since the variable is read at hvd.init()), and one 4 MB tensor for reference. speedup = off time / on time.

The machine may be shared; the 1-minute load average is printed before and after. Ratios are robust to a
steady background load (both sides share it), absolute figures are not. Exits non-zero if any launch fails.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_allreduce_worker.py"
BASELINE = {"gloo": "tcp", "mpi": "mpi"}
BASELINE_NAME = {"tcp": "TCP socket", "mpi": "mpi4py shm"}


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    value = int(float(text[:-1] if mult > 1 else text) * mult)
    if value <= 0 or value % 4:
        raise argparse.ArgumentTypeError(f"size {text!r} must be a positive multiple of 4 bytes")
    return value


def fmt_size(nbytes: int) -> str:
    for unit, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= mult and nbytes % mult == 0:
            return f"{nbytes // mult}{unit}"
    return f"{nbytes}B"


def horovodrun() -> str:
    cand = Path(sys.executable).parent / "horovodrun"
    found = str(cand) if cand.exists() else shutil.which("horovodrun")
    if not found:
        sys.exit("bench/allreduce.py: horovodrun not found next to this Python or on PATH")
    return found


def launch(controller: str, worker_args: list[str], extra_env: dict[str, str], timeout: float,
           log: Path) -> dict:
    """Run one 2-rank horovodrun launch; return rank 0's JSON, or exit non-zero with the log's tail."""
    out = log.with_suffix(".json")
    cmd = [horovodrun(), "-np", "2", "-H", "localhost:2"]
    cmd += ["--gloo"] if controller == "gloo" else ["--mpi", "--mpi-args=--oversubscribe"]
    cmd += [sys.executable, str(WORKER), "--out", str(out), *worker_args]
    env = dict(os.environ)
    env.pop("HOROVOD_FUSION_THRESHOLD", None)
    env.update({"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1",
                "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    env.update(extra_env)
    t0 = time.monotonic()
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):  # our own process group only
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=10)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            rc = None
    if rc != 0 or not out.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        why = f"timed out after {timeout:.0f} s" if rc is None else f"exited with {rc}"
        sys.exit(f"bench/allreduce.py: {controller} launch {why}.\ncommand: {' '.join(cmd)}\n"
                 f"--- last lines of its output ---\n{tail}")
    res = json.loads(out.read_text())
    res["wall_s"] = time.monotonic() - t0
    # Check we measured what we think we measured.
    if controller == "gloo" and not res["gloo_enabled"] or controller == "mpi" and not res["mpi_enabled"]:
        sys.exit(f"bench/allreduce.py: asked for {controller}, but Horovod reports "
                 f"gloo_enabled={res['gloo_enabled']} mpi_enabled={res['mpi_enabled']}")
    want = extra_env.get("HOROVOD_FUSION_THRESHOLD")
    if res["env"]["HOROVOD_FUSION_THRESHOLD"] != want:
        sys.exit(f"bench/allreduce.py: HOROVOD_FUSION_THRESHOLD in the ranks was "
                 f"{res['env']['HOROVOD_FUSION_THRESHOLD']!r}, expected {want!r}")
    return res


def med(blocks: list[list[float]]) -> float:
    return statistics.median([t for b in blocks for t in b])


def spread(blocks: list[list[float]]) -> float:
    """Relative spread of the per-block medians, (max - min) / median: how stable the figure was."""
    m = [statistics.median(b) for b in blocks]
    return (max(m) - min(m)) / statistics.median(m)


def loadavg() -> str:
    try:
        return "%.2f" % os.getloadavg()[0]
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="4K,64K,1M,16M,64M")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved measurement blocks per size")
    ap.add_argument("--controllers", default="gloo,mpi")
    ap.add_argument("--fusion-count", type=int, default=256)
    ap.add_argument("--fusion-each", default="16K", help="bytes per small tensor in the fusion test")
    ap.add_argument("--pin", action="store_true", help="pin rank i to core i")
    ap.add_argument("--timeout", type=float, default=240, help="seconds allowed per horovodrun launch")
    args = ap.parse_args()

    sizes = sorted({parse_size(s) for s in args.sizes.split(",") if s.strip()})
    controllers = [c.strip().lower() for c in args.controllers.split(",") if c.strip()]
    for c in controllers:
        if c not in BASELINE:
            ap.error(f"unknown controller {c!r} (gloo, mpi)")
    each = parse_size(args.fusion_each)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    common = ["--repeats", str(args.repeats), "--fusion-count", str(args.fusion_count),
              "--fusion-bytes", str(each)] + (["--pin"] if args.pin else [])

    print(f"allreduce benchmark: 2 ranks on {os.cpu_count()} cores, pinned={args.pin}, "
          f"sizes={','.join(map(fmt_size, sizes))}, repeats={args.repeats}, load avg {loadavg()}", flush=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="strata-allreduce-") as tmp:
        for c in controllers:
            base = ["--baseline", BASELINE[c]]
            print(f"  [{c}] fusion on, sizes sweep ...", end=" ", flush=True)
            on = launch(c, base + common + ["--sizes", ",".join(map(str, sizes))], {}, args.timeout,
                        Path(tmp) / f"{c}-on.log")
            print(f"{on['wall_s']:.0f} s; fusion off ...", end=" ", flush=True)
            off = launch(c, base + common + ["--sizes", ""], {"HOROVOD_FUSION_THRESHOLD": "0"}, args.timeout,
                         Path(tmp) / f"{c}-off.log")
            print(f"{off['wall_s']:.0f} s", flush=True)
            results[c] = {"on": on, "off": off}
    print(f"load avg after: {loadavg()}\n")

    # ---- bandwidth table ----------------------------------------------------------------------------------
    n = 2
    hdr = (f"{'size':>6} | {'ctrl':<4} | {'allreduce ms':>12} | {'bus GB/s':>8} | {'p2p GB/s':>8} | "
           f"{'ratio bus/p2p':>13} | {'p2p via':<11} | spread ar/p2p")
    print(hdr)
    print("-" * len(hdr))
    ratios: dict[tuple[str, int], float] = {}
    for nbytes in sizes:
        for c in controllers:
            r = results[c]["on"]["sizes"][str(nbytes)]
            t_ar, t_pp = med(r["allreduce"]), med(r["pingpong"])
            bus = 2 * (n - 1) / n * nbytes / t_ar / 1e9
            p2p = nbytes / (t_pp / 2) / 1e9
            ratios[(c, nbytes)] = bus / p2p
            print(f"{fmt_size(nbytes):>6} | {c:<4} | {t_ar * 1e3:12.3f} | {bus:8.3f} | {p2p:8.3f} | "
                  f"{bus / p2p:13.3f} | {BASELINE_NAME[BASELINE[c]]:<11} | "
                  f"{spread(r['allreduce']):4.0%} / {spread(r['pingpong']):4.0%}")
    print("(GB = 1e9 bytes; spread = (max-min)/median of the per-block medians)\n")

    # ---- fusion table -------------------------------------------------------------------------------------
    speedups: dict[str, float] = {}
    some = results[controllers[0]]["on"]["fusion"]
    total = some["count"] * some["each_bytes"]
    print(f"tensor fusion: {some['count']} x {fmt_size(some['each_bytes'])} tensors (= {fmt_size(total)}) "
          f"vs one {fmt_size(total)} tensor, ms per step")
    hdr = f"{'ctrl':<4} | {'fusion on':>9} | {'fusion off':>10} | {'one tensor':>10} | {'speedup on/off':>14} | on vs one"
    print(hdr)
    print("-" * len(hdr))
    for c in controllers:
        fon, foff = results[c]["on"]["fusion"], results[c]["off"]["fusion"]
        t_on, t_off = med(fon["many"]), med(foff["many"])
        t_one = statistics.median([t for b in fon["one"] + foff["one"] for t in b])
        speedups[c] = t_off / t_on
        print(f"{c:<4} | {t_on * 1e3:9.2f} | {t_off * 1e3:10.2f} | {t_one * 1e3:10.2f} | "
              f"{t_off / t_on:13.2f}x | {t_on / t_one:.2f}x slower")
    print("(fusion on = Horovod's default threshold; off = HOROVOD_FUSION_THRESHOLD=0, separate launch)\n")

    # ---- summary ------------------------------------------------------------------------------------------
    def pick(c: str, want: int) -> str:
        return f"{ratios[(c, want)]:.2f}" if (c, want) in ratios else "n/a"

    print("summary (paste into README):")
    print("| controller | p2p baseline | bus/p2p @ 64 MB | bus/p2p @ 64 KB | fusion speedup (256x16 KB) |")
    print("|---|---|---|---|---|")
    for c in controllers:
        print(f"| {c} | {BASELINE_NAME[BASELINE[c]]} | {pick(c, 64 << 20)} | {pick(c, 64 << 10)} | "
              f"{speedups[c]:.2f}x |")


if __name__ == "__main__":
    main()
