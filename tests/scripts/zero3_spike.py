"""ZeRO-3 feasibility spike (trainer/strategy/zero3.py), run by every rank of one Horovod job:

    horovodrun -np 2 -H localhost:2 --gloo python tests/scripts/zero3_spike.py OUT_DIR

A tiny untied LM is built twice with the same seed: replicated (every variable materialised) and deferred
(no variable allocated), whose levels are then sharded over the ranks one level at a time. Checks, per rank:
  * every variable of the sharded model is still deferred (no storage) before and after training;
  * the all-gathered initial parameters equal the replicated model's exactly;
  * 20 steps on the same global batches, the level-by-level step (all-gather, stateless forward, all-gather +
    recompute backward, reduce-scatter) against the replicated one: plain SGD; SGD clipped by the global norm
    (0.5; the norm of the sharded gradient is an all-reduce of the slices' squared sums); AdamW with weight
    decay, clipping (1.0), 2 accumulated micro-steps and, at step 7, a NaN loss on rank 1 only, which the
    NaN/Inf guard (finite flags summed over the ranks) must skip on both ranks as the replicated run skips it.
    and plain SGD again under mixed_bfloat16. The replicated reference differentiates each rank's rows apart
    and sums the gradients in float32, as 2-rank data parallel does (bfloat16 rounding depends on the rows per
    matmul). Loss curves within 1e-5 relative (the poisoned step aside), final weights within 1e-3;
  * parameter elements held by the rank <= 1/N of the model + its two largest levels.
Writes OUT_DIR/zero3-rank<R>.json and exits 1 if a check failed.

    python tests/scripts/zero3_spike.py --rss WIDTH LAYERS    (one process: peak RSS of a deferred build)
    horovodrun -np 2 ... tests/scripts/zero3_spike.py --memory replicated|zero3 WIDTH LAYERS
                                                (each rank's peak RSS over 3 AdamW steps)
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
REPO = Path(__file__).resolve().parents[2]
STEPS, VOCAB, SEQ, BATCH = 20, 300, 16, 8
TINY = ["model.d_model=32", "model.num_heads=2", "model.ff_dim=64", "model.layers=2", "model.dropout=0.0",
        "model.tie_embeddings=false", f"data.seq_len={SEQ}", f"data.batch_size={BATCH}",
        "distribution.backend=horovod"]


def new_model(cfg):
    import keras
    from trainer.tasks import build_model

    keras.utils.set_random_seed(0)
    return build_model(cfg.model, vocab_size=VOCAB, max_len=SEQ, summary_len=0)


def example(rows: int) -> dict:
    return {"tokens": np.zeros((rows, SEQ), np.int32)}


def batches() -> list[dict]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(STEPS):
        t = rng.integers(4, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
        out.append({"tokens": t[:, :-1], "targets": t[:, 1:]})
    return out


def train_replicated(model, task, optimizer, data, skip: int | None, replicas: int = 2) -> list[float]:
    """Replicated data parallel over `replicas`, emulated by every rank alone: each replica's rows of the global
    batch differentiated apart and their gradients summed in float32 (what the all-reduce does: under bfloat16
    the rounding depends on the rows per matmul); step `skip` (the poisoned one) applies nothing."""
    import tensorflow as tf

    variables = model.trainable_variables
    rows = BATCH // replicas

    @tf.function
    def step(batch, apply):
        loss, grads = tf.constant(0.0), None
        for r in range(replicas):
            part = {k: v[r * rows:(r + 1) * rows] for k, v in batch.items()}
            with tf.GradientTape() as tape:
                outputs = model({"tokens": part["tokens"]}, training=True)
                mine = tf.reduce_sum(task.per_example_loss(part, outputs)) / BATCH
            got = [tf.cast(tf.convert_to_tensor(g), tf.float32) for g in tape.gradient(mine, variables)]
            grads = got if grads is None else [a + b for a, b in zip(grads, got)]
            loss += mine
        tf.cond(apply, lambda: _none(optimizer.apply_gradients(zip(grads, variables))), lambda: None)
        return loss

    return [float(step(b, tf.constant(i != skip))) for i, b in enumerate(data)]


def _none(_):
    return None


def train_sharded(sharded, hvd, task, optimizer, data, *, accum: int, clip: float | None, skip: int | None):
    """Each rank its rows of the global batch in `accum` micro-steps; at step `skip` rank 1's loss is
    multiplied by NaN, which the guard (finite flags summed over the ranks) must turn into a skip everywhere."""
    import tensorflow as tf

    shards = [s for s in sharded.shards if s is not None]
    rows = BATCH // hvd.size()
    lo, micro = hvd.rank() * rows, rows // accum

    @tf.function
    def step(batch, poison):
        total, grads = tf.constant(0.0), None
        for m in range(accum):
            part = {k: v[lo + m * micro:lo + (m + 1) * micro] for k, v in batch.items()}
            loss, got = sharded.loss_and_grads(
                {"tokens": part["tokens"]},
                lambda out, part=part: poison * tf.reduce_sum(task.per_example_loss(part, out)) / BATCH)
            grads = got if grads is None else [None if a is None else a + b for a, b in zip(grads, got)]
            total += loss
        grads = [g for g in grads if g is not None]
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads]) & tf.math.is_finite(total)
        bad = hvd.allreduce(1.0 - tf.cast(finite, tf.float32), op=hvd.Sum, name="zero3_flags")
        if clip is not None:
            grads = sharded.clip(grads, clip)
        tf.cond(bad == 0.0, lambda: _none(optimizer.apply_gradients(zip(grads, shards))), lambda: None)
        return hvd.allreduce(total, op=hvd.Sum, name="zero3_loss")

    nan = float("nan")
    return [float(step(b, tf.constant(nan if i == skip and hvd.rank() == 1 else 1.0))) for i, b in enumerate(data)]


def run_case(cfg, hvd, name: str, make_optimizer, *, accum: int = 1, clip: float | None = None,
             skip: int | None = None, policy: str = "float32") -> dict:
    import keras

    keras.mixed_precision.set_global_policy(policy)
    try:
        return _run_case(cfg, hvd, name, make_optimizer, accum=accum, clip=clip, skip=skip)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _run_case(cfg, hvd, name: str, make_optimizer, *, accum: int, clip: float | None, skip: int | None) -> dict:
    from trainer.strategy.zero3 import ShardedLevels, build_deferred, is_deferred
    from trainer.tasks import task_for

    task, data = task_for("lm"), batches()
    ref = new_model(cfg).build_from_inputs(example(2))
    model = new_model(cfg)
    build_deferred(model, example(2))
    deferred_before = all(is_deferred(v) for v in model.variables)
    sharded = ShardedLevels(hvd, model)
    want0 = [v.numpy() for vs in sharded_order(ref) for v in vs]
    init_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(sharded.full_values(), want0))
    want = np.array(train_replicated(ref, task, make_optimizer(clip), data, skip))
    got = np.array(train_sharded(sharded, hvd, task, make_optimizer(None), data, accum=accum, clip=clip, skip=skip))
    kept = np.arange(STEPS) != (skip if skip is not None else -1)
    rel = float(np.max(np.abs(got[kept] - want[kept]) / np.abs(want[kept])))
    skipped = bool(np.isnan(got[skip])) if skip is not None else True
    weights = max(float(np.max(np.abs(a - b.numpy()))) for a, b in
                  zip(sharded.full_values(), [v for vs in sharded_order(ref) for v in vs]))
    held = sum(int(np.prod(s.shape)) for s in sharded.shards if s is not None)
    sizes = sorted((b.size for b in sharded.buckets if b is not None), reverse=True)
    bound = sum(sizes) / hvd.size() + sum(sizes[:2])
    return {"case": name, "deferred": deferred_before and all(is_deferred(v) for v in model.variables),
            "init_max_diff": init_diff, "loss_rel": rel, "weights_max_diff": weights, "held": held,
            "params": sum(sizes), "bound": bound, "losses": got[:3].tolist(), "poisoned_step_nan": skipped}


def sharded_order(model) -> list[list]:
    return [list(level.trainable_variables) for level in model.levels]


def problems_of(r: dict) -> list[str]:
    p = []
    if not r["deferred"]:
        p.append("a variable of the sharded model was materialised")
    if r["init_max_diff"] != 0.0:
        p.append(f"initial weights differ by {r['init_max_diff']}")
    if not r["loss_rel"] <= 1e-5:
        p.append(f"loss curve differs by {r['loss_rel']:.3g} relative")
    if not r["weights_max_diff"] <= 1e-3:
        p.append(f"weights differ by {r['weights_max_diff']:.3g}")
    if not r["poisoned_step_nan"]:
        p.append("the poisoned step's loss is not NaN (the guard case tested nothing)")
    if not r["held"] <= r["bound"]:
        p.append(f"holds {r['held']} parameters > bound {r['bound']}")
    return [f"{r['case']}: {x}" for x in p]


def rss(width: int, layers: int) -> None:
    """Peak RSS of building an untied LM of this size deferred, then replicated, in one process."""
    from trainer.config import load_config
    from trainer.strategy.zero3 import build_deferred, is_deferred

    cfg = load_config(REPO / "configs" / "lm_small.yaml",
                      [*TINY[:-1], f"model.d_model={width}", f"model.ff_dim={4 * width}", f"model.layers={layers}",
                       "model.num_heads=8"])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    model = new_model(cfg)
    build_deferred(model, example(1))
    params = sum(int(np.prod(v.shape)) for v in model.variables)
    deferred = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    new_model(cfg).build_from_inputs(example(1))
    full = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"params": params, "fp32_GiB": params * 4 / 2**30, "peak_rss_GiB_before": round(base, 3),
                      "after_deferred_build": round(deferred, 3), "after_replicated_build": round(full, 3),
                      "all_deferred": all(is_deferred(v) for v in model.variables)}))


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def memory(mode: str, width: int, layers: int) -> None:
    """Each rank's peak RSS over 3 AdamW steps of an untied LM, `replicated` (every rank the whole model, no
    communication: its memory is what matters) or `zero3` (this module), under horovodrun -np 2."""
    import keras
    import tensorflow as tf
    from trainer.config import load_config
    from trainer.strategy import make_strategy
    from trainer.strategy.zero3 import ShardedLevels, build_deferred
    from trainer.tasks import task_for

    cfg = load_config(REPO / "configs" / "lm_small.yaml",
                      [*TINY, f"model.d_model={width}", f"model.ff_dim={4 * width}", f"model.layers={layers}",
                       "model.num_heads=8", "data.batch_size=2"])
    hvd = make_strategy(cfg).hvd
    base, task = peak_gib(), task_for("lm")
    data = [{k: v[:2] for k, v in b.items()} for b in batches()[:3]]
    global BATCH
    BATCH = 2
    model = new_model(cfg)
    if mode == "zero3":
        build_deferred(model, example(1))
        sharded = ShardedLevels(hvd, model)
        built = peak_gib()
        losses = train_sharded(sharded, hvd, task, keras.optimizers.AdamW(1e-3), data, accum=1, clip=1.0, skip=None)
        held = sum(int(np.prod(s.shape)) for s in sharded.shards if s is not None)
    else:
        model.build_from_inputs(example(1))
        built = peak_gib()
        losses = train_replicated(model, task, keras.optimizers.AdamW(1e-3, global_clipnorm=1.0), data, None,
                                  replicas=1)
        held = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    print(json.dumps({"mode": mode, "rank": hvd.rank(), "params": params, "params_held": held,
                      "fp32_params_GiB": round(params * 4 / 2**30, 3), "peak_rss_GiB_imports": round(base, 3),
                      "peak_rss_GiB_built": round(built, 3), "peak_rss_GiB_after_steps": round(peak_gib(), 3),
                      "losses": [round(x, 4) for x in losses]}), flush=True)
    del tf


def main() -> int:
    if sys.argv[1] == "--rss":
        rss(int(sys.argv[2]), int(sys.argv[3]))
        return 0
    if sys.argv[1] == "--memory":
        memory(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return 0
    import keras
    from trainer.config import load_config
    from trainer.strategy import make_strategy

    out = Path(sys.argv[1])
    cfg = load_config(REPO / "configs" / "lm_small.yaml", TINY)
    strategy = make_strategy(cfg)
    hvd = strategy.hvd
    results = [run_case(cfg, hvd, "sgd", lambda clip: keras.optimizers.SGD(0.5)),
               run_case(cfg, hvd, "sgd-clip", lambda clip: keras.optimizers.SGD(0.5, global_clipnorm=clip), clip=0.5),
               run_case(cfg, hvd, "adamw", lambda clip: keras.optimizers.AdamW(0.01, weight_decay=0.01,
                                                                                 global_clipnorm=clip),
                        accum=2, clip=1.0, skip=7),
               run_case(cfg, hvd, "sgd-bf16", lambda clip: keras.optimizers.SGD(0.5), policy="mixed_bfloat16")]
    problems = [p for r in results for p in problems_of(r)]
    summary = {"rank": hvd.rank(), "ranks": hvd.size(), "results": results, "problems": problems}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"zero3-rank{hvd.rank()}.json").write_text(json.dumps(summary))
    print(json.dumps(summary), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
