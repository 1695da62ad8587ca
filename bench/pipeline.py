"""Pipeline parallelism on 2 logical CPU devices (one core each): measured speed-up vs the GPipe bound,
and peak activation memory per schedule.

    .venv/bin/python bench/pipeline.py [--steps 12] [--batch 64] [--micro-batches 1,2,4,8] [--quick]

Every configuration runs in its own child process (fresh TensorFlow, same seed, same weights), with one
intra-op thread (each kernel runs on one core) and four inter-op threads:

  single        the unpipelined step (one GradientTape over the whole model and batch + Adam), on ONE core
                (the one-device baseline of the GPipe bound) and on both cores (what TensorFlow's own
                inter-op parallelism already gets from the second core).
  K=1, M        the engine with one stage and M micro-batches on both cores: what splitting the batch into
                micro-batches costs by itself (smaller matmuls, more ops), with no pipelining.
  K=2, M, sched the engine with stages on /cpu:0 and /cpu:1 (logical devices), both cores.

  overlap    = sum of the stages' compute time / step time, from the engine's own clocks: 1.0 = the stages
               ran one after the other, K = all busy all the time. For K equal stages a perfect schedule
               reaches K*M/(M+K-1), the GPipe bound, so overlap / bound is the schedule's efficiency.
               Compute time counts each op at the duration of the fastest op of its kind on its stage in
               the same step (trainer/strategy/pipeline.py `_compute_seconds`), so it cannot exceed the
               bound; "wall" is the same ratio from every op's own wall-clock duration, which also counts
               time an op waited for a core another stage held (wall / overlap = that slowdown).
  speedup    = single step time / pipelined step time, against the 1-core and the 2-core single run.
               Logical CPU devices share one thread pool, so a "stage" is not confined to one core: against
               one core, speed-ups also contain plain inter-op parallelism; against two cores, only what
               overlapping the stages adds on top of it.

Also: a deliberately unbalanced split (first level alone on stage 0) against the measured `auto` split,
and peak activation memory (TensorFlow's BFC allocator on CPU, TF_CPU_ALLOCATOR_USE_BFC=true: peak minus
resident bytes during one step) for GPipe vs 1F1B, with and without recomputation, at the largest M.
Logical CPU devices share one allocator, so memory is for the whole replica, not per stage.

Run on a quiet machine; the 1-minute load average is printed before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(d_model=128, num_heads=4, ff_dim=512, encoder_layers=2, decoder_layers=2, dropout=0.0)
MAX_LEN, SUMMARY_LEN, VOCAB = 48, 16, 2000


# ------------------------------------------------------------------------------------------- child
def child(spec: dict) -> dict:
    """Build the model and time `spec["steps"]` training steps; return timings (and memory)."""
    cores = spec["cores"]
    os.sched_setaffinity(0, set(cores))  # before TensorFlow starts a thread
    os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    sys.path.insert(0, str(REPO))
    from trainer.strategy.tf_distribute import use_logical_cpus

    k = spec["stages"]
    devices = use_logical_cpus(max(k, 1))
    import keras
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(spec.get("intra", 1))
    tf.config.threading.set_inter_op_parallelism_threads(1 if len(cores) == 1 else 4)
    from trainer.config import TransformerModel
    from trainer.tasks import SUMMARIZATION, build_model
    from trainer.strategy.pipeline import PipelineEngine
    from trainer.strategy.pipeline.profile import profile_levels
    from trainer.parallel.partition import balanced_partition

    rng = np.random.default_rng(0)
    batch_size = spec["batch"]
    doc = rng.integers(4, VOCAB, size=(batch_size, MAX_LEN)).astype(np.int32)
    summary = rng.integers(4, VOCAB, size=(batch_size, SUMMARY_LEN + 1)).astype(np.int32)
    batch = {"document": tf.constant(doc), "summary_in": tf.constant(summary[:, :-1]),
             "summary_out": tf.constant(summary[:, 1:])}
    cfg = TransformerModel(**MODEL)

    def new_model():
        return build_model(cfg, vocab_size=VOCAB, max_len=MAX_LEN, summary_len=SUMMARY_LEN)

    out: dict = {}
    keras.utils.set_random_seed(0)
    if spec["mode"] == "single":
        model = new_model()
        model({k_: v[:2] for k_, v in batch.items() if k_ != "summary_out"})
        opt = keras.optimizers.Adam(1e-3)
        opt.build(model.trainable_variables)

        @tf.function
        def step(b):
            with tf.GradientTape() as tape:
                o = model({"document": b["document"], "summary_in": b["summary_in"]}, training=True)
                loss = tf.reduce_sum(SUMMARIZATION.per_example_loss(b, o)) / batch_size
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))
            return loss, tf.constant(1.0), tf.constant(1.0)
    else:
        micro = batch_size // spec["micro_batches"]
        example = {k_: v[:micro] for k_, v in batch.items()}
        if spec["partition"] == "auto":
            costs = profile_levels(new_model(), example, "summarization", devices[0])
            partition = balanced_partition([c.seconds for c in costs], k)
            out["level_ms"] = {c.name: round(1e3 * c.seconds, 3) for c in costs}
            keras.utils.set_random_seed(0)
        elif spec["partition"] == "unbalanced":
            partition = [(0, 1), (1, len(cfg.level_names()))]
        else:
            partition = [(0, len(cfg.level_names()))]
        out["partition"] = partition
        model = new_model()
        engine = PipelineEngine(model, "summarization", partition, devices[:k], spec["micro_batches"],
                                schedule=spec["schedule"], recompute=spec["recompute"],
                                global_batch=batch_size).build()
        opt = keras.optimizers.Adam(1e-3)
        opt.build(model.trainable_variables)

        @tf.function
        def step(b):
            loss, grads, timing = engine.gradients(b)
            opt.apply_gradients(zip(grads, model.trainable_variables))
            span = tf.cast(timing["step_span_s"], tf.float32)
            return loss, tf.reduce_sum(timing["stage_busy_s"]) / span, tf.reduce_sum(timing["stage_wall_s"]) / span

    began = time.perf_counter()
    float(step(batch)[0])
    out["first_step_s"] = time.perf_counter() - began
    for _ in range(2):
        float(step(batch)[0])
    if spec.get("memory"):
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        tf.config.experimental.reset_memory_stats("CPU:0")
        float(step(batch)[0])
        out["peak_extra_mib"] = (tf.config.experimental.get_memory_info("CPU:0")["peak"] - before) / 2**20
    times, overlap, wall = [], [], []
    for _ in range(spec["steps"]):
        began = time.perf_counter()
        loss, stage_overlap, wall_overlap = step(batch)
        out["loss"] = float(loss)
        times.append(time.perf_counter() - began)
        overlap.append(float(stage_overlap))
        wall.append(float(wall_overlap))
    out["step_s"] = statistics.median(times)
    out["overlap"] = statistics.median(overlap)  # stage-seconds of compute per step-second (engine clocks)
    out["max_overlap"] = max(overlap)
    out["wall_overlap"] = statistics.median(wall)  # the same from wall-clock op durations, waits for cores included
    return out


def run_child(spec: dict, timeout: float = 900) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CPU_ALLOCATOR_USE_BFC": "true"}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        sys.exit(f"bench/pipeline.py: child {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ parent
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--micro-batches", default="1,2,4,8")
    p.add_argument("--quick", action="store_true", help="M=4 only, 1f1b only, no memory rows")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("bench/pipeline.py needs 2 cores")
    ms = [4] if args.quick else [int(m) for m in args.micro_batches.split(",")]
    schedules = ["1f1b"] if args.quick else ["gpipe", "1f1b"]
    base = dict(batch=args.batch, steps=args.steps, recompute=False, partition="auto")
    print(f"load average before: {os.getloadavg()[0]:.2f}; model transformer {MODEL}, batch {args.batch}, "
          f"2 logical CPU devices, one core each", flush=True)

    single1 = run_child({**base, "mode": "single", "stages": 1, "micro_batches": 1, "schedule": "gpipe",
                         "partition": "none", "cores": [0]})
    single2 = run_child({**base, "mode": "single", "stages": 1, "micro_batches": 1, "schedule": "gpipe",
                         "partition": "none", "cores": [0, 1]})
    print(f"single device: {1e3 * single1['step_s']:.1f} ms/step on 1 core, {1e3 * single2['step_s']:.1f} ms/step "
          f"on 2 cores (inter-op parallelism alone: {single1['step_s'] / single2['step_s']:.2f}x)", flush=True)
    print("M  sched | ms/step | overlap measured / bound = efficiency (wall) | speedup vs 1-core, vs 2-core single | "
          "K=1 same M (2 cores)", flush=True)
    rows = []
    for m in ms:
        one = run_child({**base, "mode": "pipe", "stages": 1, "micro_batches": m, "schedule": "gpipe",
                         "partition": "none", "cores": [0, 1]})
        for sched in schedules:
            two = run_child({**base, "mode": "pipe", "stages": 2, "micro_batches": m, "schedule": sched,
                             "cores": [0, 1]})
            bound = 2 * m / (m + 1)
            rows.append((m, sched, two))
            if two["max_overlap"] > bound * 1.02:
                sys.exit(f"bench/pipeline.py: measured overlap {two['max_overlap']:.3f} exceeds the bound "
                         f"{bound:.3f}: the engine's clocks are wrong")
            print(f"{m:<2d} {sched:5s} | {1e3 * two['step_s']:7.1f} | {two['overlap']:.2f} / {bound:.2f} = "
                  f"{two['overlap'] / bound:.2f} ({two['wall_overlap']:.2f}) | "
                  f"{single1['step_s'] / two['step_s']:.2f}x, "
                  f"{single2['step_s'] / two['step_s']:.2f}x | {1e3 * one['step_s']:.1f} ms "
                  f"(micro-batching alone {single2['step_s'] / one['step_s']:.2f}x)", flush=True)
            if "level_ms" in two and m == ms[0] and sched == schedules[0]:
                print(f"   split {two['partition']}; measured level costs (ms per micro-batch): {two['level_ms']}",
                      flush=True)
    m = max(ms)
    unbalanced = run_child({**base, "mode": "pipe", "stages": 2, "micro_batches": m, "schedule": "1f1b",
                            "partition": "unbalanced", "cores": [0, 1]})
    balanced = next(r[2] for r in rows if r[0] == m and r[1] == "1f1b")
    print(f"M={m} 1f1b unbalanced split {unbalanced['partition']}: {1e3 * unbalanced['step_s']:.1f} ms/step, overlap "
          f"{unbalanced['overlap']:.2f} vs auto split {balanced['partition']}: {1e3 * balanced['step_s']:.1f} ms, overlap "
          f"{balanced['overlap']:.2f} -> auto is {unbalanced['step_s'] / balanced['step_s']:.2f}x faster", flush=True)
    if not args.quick:
        print(f"peak activation memory at M={m} (whole replica, MiB above resident):", flush=True)
        for sched in ("gpipe", "1f1b"):
            for recompute in (False, True):
                r = run_child({**base, "mode": "pipe", "stages": 2, "micro_batches": m, "schedule": sched,
                               "recompute": recompute, "cores": [0, 1], "memory": True, "steps": 2})
                print(f"  {sched:5s} recompute={str(recompute):5s}: {r['peak_extra_mib']:.1f} MiB", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
