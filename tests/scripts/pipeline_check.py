"""Pipeline engine equivalence check: pipelined loss/gradients == one tape over the whole model.

For a small GRU summarizer and a small Transformer it compares `PipelineEngine.gradients` (inside a
tf.function, stages on logical CPUs /cpu:0../cpu:2) with the unpipelined reference (one GradientTape over
the whole model and batch, loss sum(per-example)/batch) over stages K x micro-batches M x schedule x
recompute; checks that each stage's variables and ops sit on its device and that the schedule's per-stage
order is in the graph; trains 5 Adam steps both ways from identical weights and compares the loss
curves; times 10 steps each way (K=2, M=4; informational). Prints one JSON summary as the LAST line.

    python tests/scripts/pipeline_check.py          # the K x M x schedule grid (transformer) + 3 GRU cells
    python tests/scripts/pipeline_check.py --full   # every (K, M, schedule, recompute) on both models, ~4-6 min

Building graphs dominates the cost (~0.5 ms per graph op; one K x M=4 step is ~6-10k ops, 5-12 s to
trace and 3-10 s to optimise on first run), so the default run covers the K x M x schedule grid on the
small transformer and a few cells of the GRU summarizer, whose while-loop gradients are slowest to build.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trainer.strategy.tf_distribute import use_logical_cpus  # noqa: E402

# Logical devices must exist before TensorFlow initialises its runtime: first thing.
DEVICES = use_logical_cpus(3)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

# Stages only overlap when the executor has a thread per concurrently runnable stage.
tf.config.threading.set_inter_op_parallelism_threads(4)

from trainer import task as task_lib  # noqa: E402
from trainer.config import SummarizerModel, TransformerModel  # noqa: E402
from trainer.models import BOS_ID, EOS_ID, PAD_ID, build_model  # noqa: E402
from trainer.strategy.pipeline import PipelineEngine, split_micro_batches  # noqa: E402
from trainer.strategy.pipeline_plan import balanced_partition  # noqa: E402

TASK = "summarization"
VOCAB, DOC_LEN, SUM_LEN, BATCH = 40, 12, 6, 8
TINY = {
    "summarizer": SummarizerModel(embed_dim=16, hidden_dim=16, encoder_layers=1, dropout=0.0),
    "transformer": TransformerModel(d_model=16, num_heads=2, ff_dim=32, encoder_layers=1, decoder_layers=1,
                                    dropout=0.0),
}
# (K, M, schedule, recompute) run by default (at M=1 both schedules are the same op list). The GRU
# summarizer's while-loop gradients make its graphs the slowest to build, so it gets the M <= 2 cells.
# The transformer covers the whole K x M x schedule grid (12 cells), recomputation on in half of them so
# every (K, M) and every schedule is seen with and without it.
SUBSET = {
    "transformer": [(k, m, sched, (k + m + (sched == "1f1b")) % 2 == 0)
                    for k, m, sched in itertools.product((2, 3), (1, 2, 4), ("gpipe", "1f1b"))],
    "summarizer": [(2, 1, "gpipe", False), (3, 1, "1f1b", True), (3, 2, "gpipe", False)],
}
TRAIN_COMBO = (2, 4, "1f1b", False)  # the training phase's engine; its first step's gradients are checked too


def log(msg: str) -> None:
    print(msg, flush=True)


def make_batch(rng: np.random.Generator, batch: int, doc_len: int, sum_len: int, vocab: int) -> dict:
    """Random token ids: PAD tails on documents, BOS-first summary_in, EOS-terminated summary_out."""
    doc = rng.integers(4, vocab, (batch, doc_len)).astype(np.int32)
    for i, n in enumerate(rng.integers(1, doc_len + 1, batch)):
        doc[i, n:] = PAD_ID
    words = rng.integers(4, vocab, (batch, sum_len)).astype(np.int32)
    s_in = np.full((batch, sum_len), PAD_ID, np.int32)
    s_out = np.full((batch, sum_len), PAD_ID, np.int32)
    for i, n in enumerate(rng.integers(1, sum_len, batch)):  # n words, then EOS, within sum_len
        s_in[i, 0], s_in[i, 1:n + 1] = BOS_ID, words[i, :n]
        s_out[i, :n], s_out[i, n] = words[i, :n], EOS_ID
    return {"document": tf.constant(doc), "summary_in": tf.constant(s_in), "summary_out": tf.constant(s_out)}


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("document", "summary_in")}


def reference_loss_and_grads(model, batch: dict, global_batch: int):
    """The unpipelined reference: one tape over the whole model on the whole batch."""
    with tf.GradientTape() as tape:
        out = model(model_inputs(batch), training=True)
        loss = tf.reduce_sum(task_lib.per_example_loss(TASK, batch, out)) / global_batch
    grads = tape.gradient(loss, model.trainable_variables)
    return loss, [None if g is None else tf.convert_to_tensor(g) for g in grads]


def copy_weights(src, dst) -> None:
    assert len(src.weights) == len(dst.weights)
    for a, b in zip(src.weights, dst.weights):
        assert a.shape == b.shape and a.path.split("/", 1)[1] == b.path.split("/", 1)[1], (a.path, b.path)
        b.assign(a)


def pipelined_model(kind: str, cfg, ref, partition, devices):
    """A fresh model whose stages' variables live on their devices, with `ref`'s weights."""
    model = build_model(cfg, vocab_size=VOCAB, max_len=DOC_LEN, summary_len=SUM_LEN)
    PipelineEngine(model, TASK, partition, devices, 1, "gpipe", False, BATCH).build(ref.example_inputs(2))
    copy_weights(ref, model)
    return model


def compare(loss, grads, ref_loss, ref_grads) -> dict:
    """Relative loss diff; per gradient min(abs, rel) error and max abs diff."""
    r = float(ref_loss)
    loss_rel = abs(float(loss) - r) / max(abs(r), 1e-12)
    grad_err = grad_abs = 0.0
    for g, rg in zip(grads, ref_grads, strict=True):
        if (g is None) != (rg is None):
            return {"loss_rel": loss_rel, "grad_err": float("inf"), "grad_abs": float("inf")}
        if g is None:
            continue
        d = float(tf.reduce_max(tf.abs(g - rg)))
        scale = float(tf.reduce_max(tf.abs(rg)))
        grad_abs = max(grad_abs, d)
        grad_err = max(grad_err, min(d, d / scale if scale > 0 else d))
    return {"loss_rel": loss_rel, "grad_err": grad_err, "grad_abs": grad_abs}


# ---------------------------------------------------------------------------------------- graph checks
def _level_of(op_name: str, names: list[str]) -> str | None:
    """The level whose name scope an op was created in ("decoder_3/..." or "gradient_tape/decoder/...")."""
    parts = op_name.split("/")
    head = parts[1] if parts[0] == "gradient_tape" and len(parts) > 1 else parts[0]
    for name in sorted(names, key=len, reverse=True):
        suffix = head[len(name):]
        if head.startswith(name) and (not suffix or (suffix[0] == "_" and suffix[1:].isdigit())):
            return name
    return None


# Ops TensorFlow leaves without a device: resource reads and the captured handles are colocated with their
# variable, gradient shape constants with the embedding table.
_COLOCATED = ("ReadVariableOp", "ResourceGather", "VariableShape", "Placeholder", "Const")


def check_op_placement(graph, model, partition, devices) -> tuple[bool, dict]:
    """Every op built inside a level's name scope requests that level's stage device.

    Resource reads carry no device of their own: the placer colocates them with their variable, whose
    placement `PipelineEngine.placement()` checks on the live variables.
    """
    stage_of = {name: s for s, (a, b) in enumerate(partition) for name in model.level_names[a:b]}
    counts: dict[str, dict[str, int]] = {}
    ok = True
    for op in graph.get_operations():
        level = _level_of(op.name, model.level_names)
        if level is None or (not op.device and op.type in _COLOCATED):
            continue
        want = tf.DeviceSpec.from_string(devices[stage_of[level]])
        got = tf.DeviceSpec.from_string(op.device) if op.device else None
        good = got is not None and got.device_type == want.device_type and got.device_index == want.device_index
        ok &= good
        counts.setdefault(level, {}).setdefault(op.device or "<none>", 0)
        counts[level][op.device or "<none>"] += 1
    return ok and len(counts) == len(model.level_names), counts


def _input_map(graph) -> dict[str, list[str]]:
    """op name -> names of the ops it reads or waits for (data and control inputs), from the GraphDef:
    walking plain strings is ~100x faster than walking `tf.Operation.inputs`."""
    return {node.name: [i.lstrip("^").split(":")[0] for i in node.input] for node in graph.as_graph_def().node}


def _ancestors(inputs: dict[str, list[str]], tensors) -> set[str]:
    seen, stack = set(), [t.op.name for t in tensors]
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(inputs.get(name, ()))
    return seen


def check_order(engine: PipelineEngine, graph) -> bool:
    """Each op on a stage depends on the previous one in the graph; stage s+1's F(m) not on stage s's F(m+1)."""
    markers, inputs = engine.op_markers, _input_map(graph)
    for s, ops in enumerate(engine.schedule):
        for (k0, m0), (k1, m1) in zip(ops, ops[1:]):
            before = _ancestors(inputs, markers[(s, k1, m1)])
            if not all(t.op.name in before for t in markers[(s, k0, m0)]):
                log(f"  ORDER: stage {s} {k1}{m1} does not wait for {k0}{m0}")
                return False
    for s in range(engine.num_stages - 1):
        for m in range(engine.micro_batches - 1):
            if any(t.op.name in _ancestors(inputs, markers[(s + 1, "F", m)]) for t in markers[(s, "F", m + 1)]):
                log(f"  ORDER: stage {s + 1} F{m} is serialised behind stage {s} F{m + 1}")
                return False
    return True


# ------------------------------------------------------------------------------------------- phases
def equivalence(full: bool, rng: np.random.Generator) -> tuple[list[dict], bool, bool]:
    rows, placement_ok, order_ok = [], True, True
    for kind, cfg in TINY.items():
        ref = build_model(cfg, vocab_size=VOCAB, max_len=DOC_LEN, summary_len=SUM_LEN).build_from_inputs()
        batch = make_batch(rng, BATCH, DOC_LEN, SUM_LEN, VOCAB)
        ref_loss, ref_grads = tf.function(reference_loss_and_grads, autograph=False)(ref, batch, BATCH)
        combos = SUBSET[kind]
        if full:
            combos = [(k, m, s, r) for k, m, s, r in itertools.product((2, 3), (1, 2, 4), ("gpipe", "1f1b"),
                                                                        (False, True)) if m > 1 or s == "gpipe"]
        models, graph_checked = {}, False
        for k, m, sched, rec in combos:
            partition = balanced_partition([1.0] * ref.num_levels, k)
            devices = DEVICES[:k]
            if k not in models:
                models[k] = pipelined_model(kind, cfg, ref, partition, devices)
            model = models[k]
            engine = PipelineEngine(model, TASK, partition, devices, m, sched, rec, BATCH).build()
            var_ok = all(tf.DeviceSpec.from_string(d).device_index == s
                         for s, devs in enumerate(engine.placement()) for d in devs)
            placement_ok &= var_ok
            t0 = time.perf_counter()
            fn = tf.function(engine.gradients, autograph=False)
            graph = fn.get_concrete_function(batch).graph
            t1 = time.perf_counter()
            order = check_order(engine, graph)
            order_ok &= order
            t2 = time.perf_counter()
            loss, grads, _ = fn(batch)
            log(f"  trace {t1 - t0:.2f} s, order check {t2 - t1:.2f} s, first run {time.perf_counter() - t2:.2f} s")
            row = {"model": kind, "K": k, "M": m, "schedule": sched, "recompute": rec,
                   **compare(loss, grads, ref_loss, ref_grads), "order_ok": order, "vars_placed": var_ok,
                   "seconds": round(time.perf_counter() - t0, 2)}
            if k == 3 and not graph_checked:  # one graph per model: ops of every level on its stage
                ops_ok, counts = check_op_placement(graph, model, partition, devices)
                placement_ok &= ops_ok
                row["ops_placed"] = ops_ok
                log(f"  op devices per level: {json.dumps(counts)}")
                graph_checked = True
            rows.append(row)
            log(f"{kind:11s} K={k} M={m} {sched:5s} recompute={rec!s:5s} loss_rel={row['loss_rel']:.2e} "
                f"grad_abs={row['grad_abs']:.2e} grad_err={row['grad_err']:.2e} order={order} "
                f"placed={var_ok} ({row['seconds']} s)")
    return rows, placement_ok, order_ok


def training(rng: np.random.Generator) -> tuple[dict, dict]:
    """5 Adam steps unpipelined vs pipelined (TRAIN_COMBO) from identical weights, the first step's
    gradients compared too; then 10 timed steps each way (informational)."""
    k, m, sched, rec = TRAIN_COMBO
    cfg = TransformerModel(d_model=64, num_heads=4, ff_dim=128, encoder_layers=1, decoder_layers=1, dropout=0.0)
    doc_len, sum_len, batch_size = 32, 8, 32
    ref = build_model(cfg, vocab_size=VOCAB, max_len=doc_len, summary_len=sum_len)
    with tf.device(DEVICES[0]):
        ref.build_from_inputs()
    pipe = build_model(cfg, vocab_size=VOCAB, max_len=doc_len, summary_len=sum_len)
    partition = balanced_partition([1.0] * ref.num_levels, k)
    engine = PipelineEngine(pipe, TASK, partition, DEVICES[:k], m, sched, rec, batch_size)
    engine.build(ref.example_inputs(2))
    copy_weights(ref, pipe)
    ref_opt, pipe_opt = keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3)

    @tf.function(autograph=False)
    def ref_step(batch):
        with tf.device(DEVICES[0]):
            loss, grads = reference_loss_and_grads(ref, batch, batch_size)
            ref_opt.apply_gradients([(g, v) for g, v in zip(grads, ref.trainable_variables) if g is not None])
        return loss, grads

    timings: list[dict] = []

    @tf.function(autograph=False)
    def pipe_step(batch):
        loss, grads, timing = engine.gradients(batch)
        pipe_opt.apply_gradients([(g, v) for g, v in zip(grads, pipe.trainable_variables) if g is not None])
        timings.append(timing)  # trace time only: the symbolic outputs, fetched below by `timed_step`
        return loss, grads, timing

    batches = [make_batch(rng, batch_size, doc_len, sum_len, VOCAB) for _ in range(5)]
    t0 = time.perf_counter()
    ref_out = [ref_step(b) for b in batches]
    pipe_out = [pipe_step(b)[:2] for b in batches]
    ref_curve = [float(loss) for loss, _ in ref_out]
    pipe_curve = [float(loss) for loss, _ in pipe_out]
    row = {"model": "transformer_d64", "K": k, "M": m, "schedule": sched, "recompute": rec,
           **compare(*pipe_out[0], *ref_out[0]), "order_ok": check_order(
               engine, pipe_step.get_concrete_function(batches[0]).graph),
           "vars_placed": all(tf.DeviceSpec.from_string(d).device_index == s
                              for s, devs in enumerate(engine.placement()) for d in devs),
           "seconds": round(time.perf_counter() - t0, 2)}
    weight_diff = max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(ref.trainable_variables,
                                                                          pipe.trainable_variables))
    curve_diff = max(abs(a - b) for a, b in zip(ref_curve, pipe_curve))
    log(f"{row['model']} K={k} M={m} {sched} recompute={rec} first-step loss_rel={row['loss_rel']:.2e} "
        f"grad_abs={row['grad_abs']:.2e} grad_err={row['grad_err']:.2e} order={row['order_ok']}")
    log(f"loss curve unpipelined {np.round(ref_curve, 6).tolist()}")
    log(f"loss curve pipelined   {np.round(pipe_curve, 6).tolist()}  max diff {curve_diff:.2e}, "
        f"weights after 5 steps max diff {weight_diff:.2e}")

    def timed(step) -> float:
        start = time.perf_counter()
        for _ in range(10):
            loss, _ = step(batches[0])
        float(loss)  # wait for the last step
        return time.perf_counter() - start

    t_ref, t_pipe = timed(ref_step), timed(lambda b: pipe_step(b)[:2])
    # Overlap, measured by the engine's own clocks: stage-seconds per step-second (1.0 = serial), and
    # whether some stage-1 forward ran while stage 0 was busy with a later micro-batch's forward.
    overlaps, concurrent = [], False
    for _ in range(5):
        timing = pipe_step(batches[0])[2]
        overlaps.append(float(tf.reduce_sum(timing["stage_busy_s"])) / float(timing["step_span_s"]))
        iv = timing["op_intervals"].numpy()
        spans = {label: iv[i] for i, label in enumerate(engine.op_labels)}
        concurrent |= any(spans[(1, "F", mb)][0] < spans[(0, "F", mb + 1)][1] and
                          spans[(0, "F", mb + 1)][0] < spans[(1, "F", mb)][1] for mb in range(m - 1))
    log(f"measured stage overlap {np.round(overlaps, 2).tolist()} (1.0 = serial, {k} = all stages busy); "
        f"stage 1 forward concurrent with stage 0's next forward: {concurrent}")
    log(f"10 steps (batch {batch_size}, d_model 64): unpipelined {t_ref:.3f} s, pipelined K={k} M={m} {sched} "
        f"{t_pipe:.3f} s, speed-up {t_ref / t_pipe:.2f}x (informational; 2 cores shared by all stages)")
    return row, {"ref_curve": ref_curve, "pipe_curve": pipe_curve, "curve_max_abs": curve_diff,
                 "weights_max_abs": weight_diff,
                 "timing": {"unpipelined_s": round(t_ref, 4), "pipelined_s": round(t_pipe, 4),
                            "speedup": round(t_ref / t_pipe, 3)},
                 "overlap": max(overlaps), "forward_concurrent": concurrent}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="run every (K, M, schedule, recompute) on both models")
    args = parser.parse_args()
    start = time.perf_counter()
    rng = np.random.default_rng(1234)
    keras.utils.set_random_seed(1234)

    try:  # the helper's one-line error for a batch that does not split
        split_micro_batches({"x": tf.zeros([8, 2])}, 3)
        split_error = None
    except ValueError as err:
        split_error = str(err)
    log(f"split_micro_batches(8 rows, 3) -> {split_error}")

    rows, placement_ok, order_ok = equivalence(args.full, rng)
    log(f"equivalence phase done at {time.perf_counter() - start:.1f} s")
    train_row, train = training(rng)
    rows.append(train_row)
    placement_ok &= train_row["vars_placed"]
    order_ok &= train_row["order_ok"]
    summary = {
        "mode": "full" if args.full else "grid",
        "combos": len(rows),
        "max_loss_rel": max(r["loss_rel"] for r in rows),
        "max_grad_err": max(r["grad_err"] for r in rows),
        "max_grad_abs": max(r["grad_abs"] for r in rows),
        "placement_ok": placement_ok,
        "order_ok": order_ok,
        "split_error": split_error,
        **train,
        "rows": rows,
        "elapsed_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
