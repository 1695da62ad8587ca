"""ZeRO equivalence check, run by every rank of one Horovod job (horovodrun --gloo / --mpi, 2 ranks):

    horovodrun -np 2 -H localhost:2 --gloo python tests/scripts/zero_check.py OUT_DIR [CASE-zeroN,...]

One process pair trains the tiny transformer through the real training loop (trainer.loop.train: the compiled
step, NaN/Inf flags and stop votes, checkpoint hook, evaluation) once per case at zero 0 and at the ZeRO levels
asked for (default: every entry of CASES), from the same initial weights:
  * adamw    : AdamW with weight decay, clipping by the global norm (1.0), grad_accum 2 (zero 1, 2 and 3);
  * sgd      : plain SGD (no momentum: a wrong gradient scale moves every step), lr 0.1 (zero 1, 2 and 3);
  * sgd-clip : the same with clipping by the global norm (0.5), which SGD does not hide (zero 2 and 3);
  * bf16     : the adamw case's optimizer (no accumulation) under train.mixed_precision bfloat16, 20 steps
               (zero 2 and 3);
  * pipe-adamw, pipe-sgd: 2 pipeline stages per rank on logical CPU devices (zero 1 and 2: ZeRO across the
    data-parallel group of each stage), AdamW clipped by the global norm over both stages and ranks (0.2,
    below the norm) and plain SGD; each rank also checks that every shard and its slots live on the device of
    its stage and that the update's collectives of each bucket are placed there (the update traced, not run),
    and, with `adamw` run too, the chief that the pipelined ZeRO checkpoint holds exactly the variables, shapes
    and dtypes of the unpipelined replicated one (`adamw` zero 0).
Each rank checks, against the zero 0 run of the same case in this process: the loss curve (the first 20 of
200 steps within 1e-5 relative, the loss at step 200 within 1e-3), the final evaluation's loss (1e-3
relative), the final weights at step 200 (within 1e-3; zero 3: all-gathered level by level), the optimizer
state it really holds (slot elements = 1/N of the replicated
optimizer's, +-1%); with zero 3 also the parameters it really holds (its shards + any model variable with
storage) <= 1/N of the model + its two largest levels; the chief also reads both final checkpoints back and
checks they hold the same variables in the same (replicated) format, equal within 1e-3. Prints `zero_check: ...`
lines and, last, one JSON line (also written to OUT_DIR/summary-rank<R>.json); exits 1 if any check failed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

REPO = Path(__file__).resolve().parents[2]
STEPS, CURVE = 200, 20  # issue 13: the curve over the first 20 steps, loss and weights at step 200
TINY = ["model.d_model=32", "model.num_heads=2", "model.ff_dim=64", "model.encoder_layers=1", "model.decoder_layers=1",
        "model.dropout=0.0", "data.builtin.train_examples=400", "data.builtin.val_examples=40",
        "data.builtin.test_examples=40", "data.vocab_size=300", "data.batch_size=8", f"train.steps={STEPS}",
        "train.log_every=1", "eval.max_batches=1", "eval.rouge_examples=2", "logging.progress_bar=false",
        f"checkpoint.every={STEPS}", "distribution.backend=horovod"]
SGD = ["optimizer.name=sgd", "optimizer.lr=0.1", "optimizer.weight_decay=0.0", "optimizer.schedule=constant"]
# 2 pipeline stages per rank on logical CPU devices, an explicit split (`auto` measures times, which differ
# between runs: the zero 0 and ZeRO runs could split differently).
PIPE = ["distribution.pipeline={stages: 2, micro_batches: 2, partition: [[embed, encoder_block_0], "
        "[decoder_block_0, output]]}"]
# case -> (overrides, ZeRO levels compared with its zero 0 run)
CASES = {
    "adamw": (["train.grad_accum=2"], (1, 2, 3)),  # the config's AdamW: weight decay 0.01, clip_norm 1.0, cosine
    "sgd": ([*SGD, "optimizer.clip_norm=null"], (1, 2, 3)),  # plain SGD: a wrong gradient scale moves every step
    "sgd-clip": ([*SGD, "optimizer.clip_norm=0.5"], (2, 3)),  # SGD shows a wrong global norm (Adam hides most)
    # ZeRO across the data-parallel group of each pipeline stage: AdamW clipped by the global norm over both
    # stages and both ranks (clip_norm 0.2, below the norm: every step clips), and plain SGD. lr 3e-4: at the
    # config's 1e-3 the two runs' different norm summation order (per stage, then over ranks) grew from 8e-8 over
    # the first 20 steps to 1.1e-2 in the weights at step 200 (Adam clipped every step amplifies it); at 3e-4,
    # 2.2e-6.
    "pipe-adamw": ([*PIPE, "optimizer.clip_norm=0.2", "optimizer.lr=0.0003"], (1, 2)),
    "pipe-sgd": ([*PIPE, *SGD, "optimizer.clip_norm=null"], (1, 2)),
    # mixed precision: bfloat16 compute, float32 variables, shards and slots (float16's loss scaling is refused).
    # 20 steps: a 1e-7 difference in a float32 weight can round its bfloat16 copy the other way, so the runs part
    # at bfloat16's resolution (measured at step 200: loss 1.5e-3 relative, weights 4e-2; over 20 steps 1e-5).
    "bf16": (["train.mixed_precision=bfloat16", f"train.steps={CURVE}", f"checkpoint.every={CURVE}"], (2, 3)),
}


def run_case(out: Path, case: str, zero: int, strategy) -> dict:
    """Train one case at one ZeRO level; its loss curve, final weights, slot elements and checkpoint dir."""
    import keras
    from trainer.config import load_config
    from trainer.experiment import configure_runtime, prepare
    from trainer.hooks import Hook
    from trainer.loop import train
    from trainer.strategy.zero import optimizer_slots

    overrides = [*TINY, *CASES[case][0], f"distribution.zero={zero}", f"run_dir={out / f'{case}-zero{zero}'}"]
    cfg = load_config(REPO / "configs" / "transformer_small.yaml", overrides)
    # Each run as in a fresh process: Keras' name counters restart. Horovod names the initial broadcast's ops
    # after the variables, and a ZeRO 1/2 save builds a throwaway optimizer on the chief only, so without this
    # the ranks of the next run would name their optimizer's step `adam_w_3` and `adam_w_2`, and wait forever.
    keras.backend.clear_session()
    configure_runtime(cfg)
    exp = prepare(cfg, strategy, training=True)
    losses: list[float] = []
    evaluated: list[float] = []

    class Losses(Hook):
        def on_log(self, state) -> None:
            losses.append(state.train_logs["loss"])

        def on_eval(self, state) -> None:  # zero 3: the forward runs level by level through gathered weights
            evaluated.append(state.eval_metrics["loss"])

    train(exp, strategy, extra_hooks=[Losses()])
    slots = sum(int(np.prod(s.shape)) for v in optimizer_slots(exp.optimizer).values() for s in v)
    misplaced = []
    if zero and case.startswith("pipe"):
        misplaced = misplaced_state(strategy.zero_state, exp.engine) + misplaced_ops(strategy.zero_state, exp.engine)
    levels = [[int(np.prod(v.shape)) for v in level.trainable_variables] for level in exp.model.levels]
    if zero == 3:  # no variable of the model has storage: gather each level in turn (every rank)
        weights, held = list(strategy.zero_state.gathered_weights()), strategy.zero_state.held_elements()
    else:  # per level, in the order zero 3 gathers them
        weights = [v.numpy() for level in exp.model.levels for v in level.trainable_variables]
        held = sum(map(sum, levels))
    sizes = sorted(map(sum, levels), reverse=True)
    return {"losses": np.array(losses), "val_loss": evaluated, "weights": weights, "slots": slots, "held": held,
            "bound": sum(sizes) / strategy.world_size + sum(sizes[:2]), "checkpoints": exp.run_dir / "checkpoints",
            "misplaced": misplaced}


def misplaced_state(state, engine) -> list[str]:
    """A pipelined ZeRO run: every shard and every optimizer slot over it on the device of its bucket's stage,
    which holds the bucket's model variables; both stages have buckets. Empty: all in place."""
    from tensorflow import DeviceSpec
    from trainer.strategy.zero import optimizer_slots

    def where(device: str) -> tuple:
        spec = DeviceSpec.from_string(device)
        return (spec.device_type or "").upper(), spec.device_index or 0

    stages = sorted({b.stage for b in state.buckets})
    problems = [] if stages == list(range(engine.num_stages)) else [f"buckets on stages {stages} only"]
    slots = list(zip(*optimizer_slots(state.optimizer).values()))  # per shard, its slots (none: plain SGD)
    for i, (bucket, shard) in enumerate(zip(state.buckets, state.shards)):
        wanted = where(engine.devices[bucket.stage])
        owners = {where(state.variables[p.index].value.device) for p in bucket.pieces}
        held = [where(v.value.device) for v in (shard, *(slots[i] if slots else ()))]
        if owners != {wanted} or set(held) != {wanted}:
            problems.append(f"bucket {i} (stage {bucket.stage}, {wanted}): variables on {owners}, shard and slots "
                            f"on {held}")
    return problems


def misplaced_ops(state, engine) -> list[str]:
    """A pipelined ZeRO run: the step's update traced (not run) over zero gradients. Every bucket's collectives
    (reduce-scatter or all-reduce, all-gather; in the update's graph and its tf.cond branch) are placed on its
    stage's device, and every non-scalar tensor the optimizer computes has a device (its variable's:
    trainer/strategy/zero.py `_update_on_variable_device`; unplaced, it would run on the first device). Empty:
    all in place."""
    import re

    import tensorflow as tf

    def ops(graph):  # the graph's operations and those of its tf.cond branches
        for op in graph.get_operations():
            yield op
            for branch in (getattr(op, "_true_graph", None), getattr(op, "_false_graph", None)):
                if branch is not None:
                    yield from ops(branch)

    def key(device: str) -> tuple:
        spec = tf.DeviceSpec.from_string(device)
        return (spec.device_type or "").upper(), spec.device_index or 0

    grads = [tf.zeros(v.shape, v.dtype) for v in state.variables]
    every = list(ops(tf.function(lambda: state(grads, tf.constant(True))).get_concrete_function().graph))
    problems, found = [], 0
    for op in every:
        match = re.search(r"zero_(rs|ar|ag)_(\d+)$", op.name)
        if op.type.startswith("Horovod") and match:
            found += 1
            wanted = engine.devices[state.buckets[int(match.group(2))].stage]
            if not op.device or key(op.device) != key(wanted):
                problems.append(f"{op.type} {op.name} on {op.device or 'no device'}, not {wanted}")
    if found != 2 * len(state.buckets):
        problems.append(f"{found} ZeRO collectives in the update's graph, expected {2 * len(state.buckets)}")
    scope = f"/{state.optimizer.name}/"  # Adam's moments, AdamW's decay, SGD's step (not the scalar rate)
    arithmetic = [op for op in every if scope in f"/{op.name}" and any(o.shape.rank != 0 for o in op.outputs)
                  and op.type not in ("Placeholder", "Identity", "IdentityN", "ReadVariableOp")]
    unplaced = [op.name for op in arithmetic if not op.device]
    if not arithmetic or unplaced:
        problems.append(f"{len(unplaced)} of the optimizer's {len(arithmetic)} tensor ops without a device: "
                        f"{unplaced[:4]}")
    return problems


def compare(case: str, zero: int, got: dict, ref: dict, ranks: int, chief: bool) -> list[str]:
    """What differs between a ZeRO run and the replicated one (empty: equivalent)."""
    problems = []
    steps = CURVE if case == "bf16" else STEPS
    if len(got["losses"]) != steps or len(ref["losses"]) != steps:
        problems.append(f"{len(got['losses'])}/{len(ref['losses'])} losses logged, expected {steps}")
    rel = np.max(np.abs(got["losses"][:CURVE] - ref["losses"][:CURVE]) / np.abs(ref["losses"][:CURVE]))
    if not rel <= 1e-5:
        problems.append(f"loss curve differs by {rel:.3g} relative (> 1e-5) over the first {CURVE} steps: "
                        f"{got['losses'][:CURVE]} vs {ref['losses'][:CURVE]}")
    last = abs(got["losses"][-1] - ref["losses"][-1]) / abs(ref["losses"][-1])
    if not last <= 1e-3:
        problems.append(f"loss at step {steps} differs by {last:.3g} relative (> 1e-3)")
    if len(got["val_loss"]) != 1 or not np.allclose(got["val_loss"], ref["val_loss"], rtol=1e-3, atol=0):
        problems.append(f"validation loss {got['val_loss']} vs replicated {ref['val_loss']} (1e-3 relative)")
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(got["weights"], ref["weights"]))
    if not worst <= 1e-3:
        problems.append(f"weights differ by up to {worst:.3g} (> 1e-3)")
    ratio = got["slots"] / (ref["slots"] / ranks) if ref["slots"] else float(got["slots"] == 0)  # plain SGD: none
    if not abs(ratio - 1) <= 0.01:
        problems.append(f"optimizer slots {got['slots']} elements on this rank, not 1/{ranks} of {ref['slots']}")
    problems += got["misplaced"]
    if zero == 3 and not got["held"] <= got["bound"]:
        problems.append(f"holds {got['held']} parameter elements > 1/{ranks} + two largest levels = {got['bound']}")
    if chief:
        problems += compare_checkpoints(got["checkpoints"], ref["checkpoints"])
    held = f", parameters held {got['held']} <= {got['bound']:.0f}" if zero == 3 else ""
    held += f", val loss {got['val_loss']} vs {ref['val_loss']}"
    print(f"zero_check: {case} zero {zero}: loss rel diff {rel:.2e} (steps 1-{CURVE}), {last:.2e} (step {steps}), "
          f"weights max diff {worst:.2e}, "
          f"slots {got['slots']} = {ratio:.4f} x 1/{ranks} of {ref['slots']}{held}", flush=True)
    return [f"{case} zero {zero}: {p}" for p in problems]


def compare_checkpoints(got: Path, ref: Path) -> list[str]:
    """The two runs' final checkpoints hold the same variables (layout-free format), equal within 1e-3."""
    import tensorflow as tf

    a, b = tf.train.load_checkpoint(str(got)), tf.train.load_checkpoint(str(ref))
    keys_a, keys_b = a.get_variable_to_shape_map(), b.get_variable_to_shape_map()
    if keys_a != keys_b:
        return [f"checkpoint variables differ: {sorted(set(keys_a) ^ set(keys_b))[:5]}"]
    worst = max(float(np.max(np.abs(np.asarray(a.get_tensor(k), np.float64) - np.asarray(b.get_tensor(k), np.float64))))
                for k in keys_a if k != "_CHECKPOINTABLE_OBJECT_GRAPH" and a.get_tensor(k).dtype.kind in "fiu")
    return [] if worst <= 1e-3 else [f"checkpoints differ by up to {worst:.3g}"]


def same_format(got: Path, ref: Path) -> list[str]:
    """Both checkpoints hold the same variables, shapes and dtypes (values apart): a pipelined ZeRO run's
    checkpoint is the unpipelined replicated run's format, which any layout restores."""
    import tensorflow as tf

    a, b = tf.train.load_checkpoint(str(got)), tf.train.load_checkpoint(str(ref))
    if a.get_variable_to_shape_map() != b.get_variable_to_shape_map():
        keys_a, keys_b = a.get_variable_to_shape_map(), b.get_variable_to_shape_map()
        return [f"checkpoint variables differ from the unpipelined replicated run's: "
                f"{sorted(k for k in set(keys_a) | set(keys_b) if keys_a.get(k) != keys_b.get(k))[:5]}"]
    if a.get_variable_to_dtype_map() != b.get_variable_to_dtype_map():
        return ["checkpoint dtypes differ from the unpipelined replicated run's"]
    print(f"zero_check: {got.parent.name} checkpoint: same {len(a.get_variable_to_shape_map())} variables, shapes "
          f"and dtypes as {ref.parent.name}'s", flush=True)
    return []


def main() -> int:
    out = Path(sys.argv[1])
    every = [f"{c}-zero{z}" for c, (_, zs) in CASES.items() for z in zs]
    wanted = sys.argv[2].split(",") if len(sys.argv) > 2 else every
    chosen = {c: tuple(int(w.rsplit("-zero", 1)[1]) for w in wanted if w.rsplit("-zero", 1)[0] == c)
              for c in CASES if any(w.rsplit("-zero", 1)[0] == c for w in wanted)}  # e.g. `sgd-zero3`
    from trainer.config import load_config
    from trainer.strategy import make_strategy

    # hvd.init, once; with a pipelined case, also the logical CPU devices of its stages, before TensorFlow starts
    piped = PIPE if any(c.startswith("pipe") for c in chosen) else []
    strategy = make_strategy(load_config(REPO / "configs" / "transformer_small.yaml", [*TINY, *piped]))
    problems, summary = [], {}
    for case, levels in chosen.items():
        ref = run_case(out, case, 0, strategy)
        for zero in levels:
            got = run_case(out, case, zero, strategy)
            found = compare(case, zero, got, ref, strategy.world_size, strategy.is_chief)
            problems += found
            summary[f"{case}-zero{zero}"] = "ok" if not found else found
    if strategy.is_chief and chosen.get("pipe-adamw") and "adamw" in chosen:  # layout-free: pipelined = not
        found = [f"pipe-adamw zero {max(chosen['pipe-adamw'])}: {p}" for p in same_format(
            out / f"pipe-adamw-zero{max(chosen['pipe-adamw'])}" / "checkpoints", out / "adamw-zero0" / "checkpoints")]
        problems += found  # the chief's alone: its exit code fails the job
    for problem in problems:
        print(f"zero_check: FAILED {problem}", flush=True)
    result = json.dumps({"rank": strategy.rank, "ranks": strategy.world_size, "cases": summary})
    (out / f"summary-rank{strategy.rank}.json").write_text(result)  # mpirun may interleave the ranks' lines
    print(result, flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
