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
import threading
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

from trainer.tasks import SUMMARIZATION  # noqa: E402
from trainer.config import SummarizerModel, TransformerModel  # noqa: E402
from trainer.models import BOS_ID, EOS_ID, PAD_ID, Level, LevelModel  # noqa: E402
from trainer.tasks import build_model  # noqa: E402
from trainer.strategy.pipeline import PipelineEngine, split_micro_batches  # noqa: E402
from trainer.parallel.partition import balanced_partition  # noqa: E402

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
        loss = tf.reduce_sum(SUMMARIZATION.per_example_loss(batch, out)) / global_batch
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


def schedule_dependencies(schedule, num_stages: int) -> dict[tuple, set[tuple]]:
    """op -> every op it must wait for (transitively), from the schedule alone: the previous op of its own
    stage, F(s-1, m) before F(s, m) (activations), B(s+1, m) before B(s, m) (gradients)."""
    direct: dict[tuple, set[tuple]] = {}
    for s, ops in enumerate(schedule):
        for i, (kind, m) in enumerate(ops):
            needs = {(s, *ops[i - 1])} if i else set()
            if kind == "F" and s > 0:
                needs.add((s - 1, "F", m))
            if kind == "B" and s < num_stages - 1:
                needs.add((s + 1, "B", m))
            direct[(s, kind, m)] = needs
    closure: dict[tuple, set[tuple]] = {}

    def waits_for(op: tuple) -> set[tuple]:
        if op not in closure:
            closure[op] = set().union(*({d} | waits_for(d) for d in direct[op])) if direct[op] else set()
        return closure[op]

    return {op: waits_for(op) for op in direct}


def check_order(engine: PipelineEngine, graph) -> bool:
    """The graph's dependencies between the ops of different stages are exactly the schedule's, in BOTH
    directions: every op waits for the ops the schedule puts before it (its own stage's previous op,
    activations from upstream, gradients from downstream), and for no part of any other op. A hidden
    dependency either way (stage s+1's F(m) behind stage s's F(m+1), or stage s's F(m+1) behind stage s+1's
    F(m)) would serialise the stages while every result stayed correct."""
    markers, inputs = engine.op_markers, _input_map(graph)
    expected = schedule_dependencies(engine.schedule, engine.num_stages)
    names = {op: {t.op.name for t in tensors} for op, tensors in markers.items()}
    # What an op itself produced: its marker tensors minus those it passed on from the ops it waits for (a
    # pass-through key's gradient leaves B(s, m) as the very tensor B(s+1, m) sent).
    own = {op: names[op] - set().union(*(names[d] for d in expected[op])) for op in expected}
    if not all(own.values()):
        log(f"  ORDER: ops that produce nothing of their own: {[op for op, n in own.items() if not n]}")
        return False
    for b, needed in expected.items():
        before = _ancestors(inputs, markers[b])
        for a in expected:
            if a == b or (a[0] == b[0] and a not in needed):
                continue  # a later op of the same stage: the graph cannot make an op wait for its future
            # An op waits for ALL of its own stage's previous op (control dependencies), for the part of
            # another stage's op it reads (B(s, m) reads the input gradients of B(s+1, m), not its weights').
            waits = all if a[0] == b[0] else any
            if a in needed and not waits(n in before for n in names[a]):
                log(f"  ORDER: stage {b[0]} {b[1]}{b[2]} does not wait for stage {a[0]} {a[1]}{a[2]}")
                return False
            if a not in needed and any(n in before for n in own[a]):
                log(f"  ORDER: stage {b[0]} {b[1]}{b[2]} is serialised behind stage {a[0]} {a[1]}{a[2]}, "
                    "which the schedule does not ask for")
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
    # Overlap, measured by the engine's own clocks: stage-seconds of compute per step-second (1.0 = serial;
    # the schedule allows at most K*M/(M+K-1)), the same from wall-clock op durations (which also count
    # time an op waited for a core another stage held), and whether some stage-1 forward ran while stage 0
    # was busy with a later micro-batch's forward.
    overlaps, wall_overlaps, concurrent = [], [], False
    for _ in range(5):
        timing = pipe_step(batches[0])[2]
        overlaps.append(float(tf.reduce_sum(timing["stage_busy_s"])) / float(timing["step_span_s"]))
        wall_overlaps.append(float(tf.reduce_sum(timing["stage_wall_s"])) / float(timing["step_span_s"]))
        iv = timing["op_intervals"].numpy()
        spans = {label: iv[i] for i, label in enumerate(engine.op_labels)}
        concurrent |= any(spans[(1, "F", mb)][0] < spans[(0, "F", mb + 1)][1] and
                          spans[(0, "F", mb + 1)][0] < spans[(1, "F", mb)][1] for mb in range(m - 1))
    bound = k * m / (m + k - 1)
    log(f"measured stage overlap {np.round(overlaps, 2).tolist()} (1.0 = serial, bound {bound:.2f}); from wall-clock "
        f"op durations {np.round(wall_overlaps, 2).tolist()}; stage 1 forward concurrent with stage 0's next "
        f"forward: {concurrent}")
    log(f"10 steps (batch {batch_size}, d_model 64): unpipelined {t_ref:.3f} s, pipelined K={k} M={m} {sched} "
        f"{t_pipe:.3f} s, speed-up {t_ref / t_pipe:.2f}x (informational; 2 cores shared by all stages)")
    return row, {"ref_curve": ref_curve, "pipe_curve": pipe_curve, "curve_max_abs": curve_diff,
                 "weights_max_abs": weight_diff,
                 "timing": {"unpipelined_s": round(t_ref, 4), "pipelined_s": round(t_pipe, 4),
                            "speedup": round(t_ref / t_pipe, 3)},
                 "overlaps": overlaps, "wall_overlaps": wall_overlaps, "overlap_bound": bound,
                 "forward_concurrent": concurrent}


class _Core:
    """One processor shared by whoever uses it, in 1 ms slices handed out in turn: two users at once each
    progress at half speed, like two stages' kernels on the same cores. Users sleep while waiting, so
    the engine's clocks (host callbacks) are never held up by it."""

    SLICE = 1e-3

    def __init__(self) -> None:
        self.lock, self.free_at = threading.Lock(), 0.0

    def use(self, seconds: float) -> None:
        while seconds > 0:
            piece = min(self.SLICE, seconds)
            with self.lock:  # book the next free slice
                begin = max(time.perf_counter(), self.free_at)
                self.free_at = begin + piece
            time.sleep(max(0.0, begin + piece - time.perf_counter()))
            seconds -= piece


class _HostWork(Level):
    """A level whose forward and backward each need `ms` of a processor (a Dense too, so its stage owns a
    variable): its own (`core` None: it just takes that long, like a device nothing else uses) or a
    `_Core` shared with the other stages (like logical CPU devices sharing the machine's cores)."""

    def __init__(self, name: str, ms: float, core: "_Core | None", last: bool) -> None:
        super().__init__(name)
        self.dense, self.last = keras.layers.Dense(4, name="dense"), last

        def work(_probe):
            (core.use if core else time.sleep)(ms / 1e3)
            return np.float32(0.0)

        def after_work(t):  # t, once `work` has run on it (a data edge: the work cannot be skipped or moved)
            return t + 0.0 * tf.ensure_shape(tf.numpy_function(work, [t[:1, :1]], tf.float32, stateful=False), [])

        @tf.custom_gradient
        def delayed(x):
            return after_work(x), after_work

        self.delayed = delayed

    def call(self, carry, training=False):
        x = carry["x"] if "x" in carry else tf.cast(carry["tokens"], tf.float32)
        x = self.delayed(self.dense(x))
        return {"logit": tf.reduce_sum(x, axis=-1)} if self.last else {"x": x}


def measurement() -> dict:
    """The engine's overlap on ops of known cost (K=2, M=4, GPipe and 1F1B, 15 ms per op): stages with a
    processor each must overlap; stages sharing one processor cannot, and there the wall-clock duration of
    an op also counts the time it waited for the processor (what `stage_busy_s` used to report)."""
    k, m, batch = 2, 4, 8
    out = {"bound": k * m / (m + k - 1)}
    for shared in (False, True):
        for sched in ("gpipe", "1f1b"):
            core = _Core() if shared else None
            levels = [_HostWork(f"work_{i}", 15.0, core, last=i == k - 1) for i in range(k)]
            model = LevelModel(levels, task="classification",
                               input_specs={"tokens": tf.TensorSpec([None, 4], tf.int32)})
            engine = PipelineEngine(model, "classification", [(0, 1), (1, 2)], DEVICES[:k], m, sched, False,
                                    batch).build()
            data = {"tokens": tf.ones([batch, 4], tf.int32), "label": tf.ones([batch], tf.float32)}
            step = tf.function(engine.gradients, autograph=False)
            compute, wall = [], []
            for i in range(6):
                timing = step(data)[2]
                if i:  # the first run also builds the graph
                    span = float(timing["step_span_s"])
                    compute.append(float(tf.reduce_sum(timing["stage_busy_s"])) / span)
                    wall.append(float(tf.reduce_sum(timing["stage_wall_s"])) / span)
            key = f"{'shared' if shared else 'independent'}_{sched}"
            out[key] = {"overlap": compute, "wall_overlap": wall}
            log(f"host-work stages ({key}): overlap {np.round(compute, 2).tolist()} (bound {out['bound']:.2f}); "
                f"from wall-clock op durations {np.round(wall, 2).tolist()}")
    return out


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
    measured = measurement()
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
        "measurement": measured,
        "rows": rows,
        "elapsed_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
