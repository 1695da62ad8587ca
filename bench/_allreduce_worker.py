"""Per-rank worker for bench/allreduce.py; launched by that driver through horovodrun, never by hand.

One launch = one controller (Gloo or MPI) and one fusion threshold. For every size it alternates, block by
block, a Horovod allreduce block and a point-to-point ping-pong block over the same pair of ranks, so both
figures come from the same processes at the same time. Rank 0 times every iteration and writes the raw
per-iteration times (seconds) as JSON to --out; the driver does the arithmetic.

Point-to-point baselines (rank 0 <-> rank 1, one message in flight, bandwidth = bytes / (round_trip / 2)):
  tcp  plain TCP socket over 127.0.0.1 (TCP_NODELAY, like Gloo's own pairs): the transport Gloo uses.
  mpi  mpi4py Send/Recv of numpy buffers: the same Open MPI BTL as Horovod's MPI_Allreduce (shared memory
       between two processes on one host).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time


def _pin_before_threads(pin: bool) -> int | None:
    """Optionally pin this rank to one core, before TensorFlow or Horovod start any thread (threads inherit)."""
    if not pin:
        return None
    local = os.environ.get("HOROVOD_LOCAL_RANK") or os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK") or "0"
    cores = sorted(os.sched_getaffinity(0))
    core = cores[int(local) % len(cores)]
    os.sched_setaffinity(0, {core})
    return core


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", default="", help="comma-separated byte counts (may be empty: fusion only)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline", choices=["tcp", "mpi"], required=True)
    ap.add_argument("--fusion-count", type=int, default=256)
    ap.add_argument("--fusion-bytes", type=int, default=16 * 1024)
    ap.add_argument("--pin", action="store_true")
    args = ap.parse_args()

    core = _pin_before_threads(args.pin)

    MPI = None
    if args.baseline == "mpi":
        # Initialise MPI ourselves (MPI_THREAD_MULTIPLE, mpi4py's default) before Horovod, which then reuses it.
        from mpi4py import MPI  # noqa: N811

    import numpy as np
    import tensorflow as tf
    import horovod.tensorflow as hvd

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    hvd.init()
    rank, n = hvd.rank(), hvd.size()
    if n != 2:
        raise SystemExit(f"expected 2 ranks, got {n}")
    peer = 1 - rank
    sizes = [int(s) for s in args.sizes.split(",") if s]

    # ---- point-to-point setup -------------------------------------------------------------------------
    sock = None
    comm = None
    if args.baseline == "tcp":
        if rank == 0:
            lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(1)
            port = lsock.getsockname()[1]
        else:
            port = None
        port = hvd.broadcast_object(port, root_rank=0, name="bench_port")
        if rank == 0:
            lsock.settimeout(60)
            sock, _ = lsock.accept()
            lsock.close()
        else:
            sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.settimeout(120)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        comm = MPI.COMM_WORLD
        assert comm.Get_rank() == rank, "mpi4py and Horovod disagree on rank order"

    maxbytes = max(sizes + [args.fusion_bytes * args.fusion_count])
    pbuf = np.ones(maxbytes, dtype=np.uint8)
    pmv = memoryview(pbuf)

    def recv_exact(nbytes: int) -> None:
        got = 0
        while got < nbytes:
            r = sock.recv_into(pmv[got:nbytes], nbytes - got)
            if r == 0:
                raise ConnectionError("peer closed the ping-pong socket")
            got += r

    def pingpong(nbytes: int) -> None:
        """One round trip of nbytes each way; rank 0 starts."""
        if comm is not None:
            view = [pbuf[:nbytes], MPI.BYTE]
            if rank == 0:
                comm.Send(view, dest=peer, tag=7)
                comm.Recv(view, source=peer, tag=7)
            else:
                comm.Recv(view, source=peer, tag=7)
                comm.Send(view, dest=peer, tag=7)
        else:
            if rank == 0:
                sock.sendall(pmv[:nbytes])
                recv_exact(nbytes)
            else:
                recv_exact(nbytes)
                sock.sendall(pmv[:nbytes])

    # ---- allreduce ------------------------------------------------------------------------------------
    @tf.function
    def allreduce_one(x):
        return hvd.allreduce(x, op=hvd.Sum)

    @tf.function
    def allreduce_many(xs):
        # Separate allreduce ops in one graph: Horovod sees them ready together and may fuse them.
        return [hvd.allreduce(x, op=hvd.Sum) for x in xs]

    def timed(fn, iters: int) -> list[float]:
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out

    def block_iters(nbytes: int) -> int:
        # ~128 MiB moved per block, between 3 and 60 iterations: few for 64 MB, many for 4 KB.
        return max(3, min(60, (128 << 20) // max(nbytes, 1)))

    result: dict = {
        "rank": rank, "size": n, "baseline": args.baseline, "pinned_core": core,
        "mpi_enabled": bool(hvd.mpi_enabled()), "gloo_enabled": bool(hvd.gloo_enabled()),
        "env": {k: os.environ.get(k) for k in ("HOROVOD_FUSION_THRESHOLD", "HOROVOD_CYCLE_TIME",
                                               "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")},
        "sizes": {}, "fusion": None,
    }

    for nbytes in sizes:
        x = tf.ones([nbytes // 4], dtype=tf.float32)
        y = allreduce_one(x)  # traces, and checks the sum once
        if not np.allclose(y.numpy()[:8], float(n)):
            raise SystemExit(f"allreduce of {nbytes} B gave {y.numpy()[:4]}, expected {n}")
        iters = block_iters(nbytes)
        warm = min(5, max(2, iters // 2))
        timed(lambda: allreduce_one(x), warm)
        timed(lambda: pingpong(nbytes), warm)
        ar, pp = [], []
        for _ in range(args.repeats):  # interleaved blocks: drift hits both columns alike
            ar.append(timed(lambda: allreduce_one(x), iters))
            pp.append(timed(lambda: pingpong(nbytes), iters))
        result["sizes"][str(nbytes)] = {"allreduce": ar, "pingpong": pp}
        del x, y

    # ---- tensor fusion: many small tensors in one tf.function vs one tensor of the same total -----------
    count, each = args.fusion_count, args.fusion_bytes
    smalls = [tf.fill([each // 4], float(i % 7)) for i in range(count)]
    fused = tf.ones([count * each // 4], dtype=tf.float32)
    outs = allreduce_many(smalls)
    if not all(np.allclose(o.numpy()[:4], n * float(i % 7)) for i, o in enumerate(outs)):
        raise SystemExit("allreduce of the small tensors gave a wrong sum")
    allreduce_one(fused)
    timed(lambda: allreduce_many(smalls), 3)
    timed(lambda: allreduce_one(fused), 3)
    many_t, one_t = [], []
    for _ in range(args.repeats):
        many_t.append(timed(lambda: allreduce_many(smalls), 6))
        one_t.append(timed(lambda: allreduce_one(fused), 6))
    result["fusion"] = {"count": count, "each_bytes": each, "many": many_t, "one": one_t}

    if sock is not None:
        sock.close()
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    hvd.shutdown()


if __name__ == "__main__":
    sys.exit(main())
