"""MFU's two halves: the analytic FLOPs per example of every model kind, checked against the matrix products
XLA lowers the real forward+backward step to, and the peak probe's cache (a stale or foreign entry is never
used), with one real probe."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import peak
from trainer.config import ClassifierModel, LMModel, SummarizerModel, TransformerModel, config_from_dict
from trainer.errors import ConfigError
from trainer.flops import FORMULAS, dense, mfu, training_flops
from trainer.loop import call_length
from trainer.models import BOS_ID
from trainer.strategy.engine import AccumulatingEngine
from trainer.tasks import WORKLOADS, build_model, task_for

VOCAB, MAX_LEN, SUMMARY_LEN, BATCH = 40, 12, 6, 3
CASES = {  # (model section, classes): widths that differ, so a swapped term changes the count
    "classifier": (ClassifierModel(embed_dim=8, hidden_dim=24), 2),
    "classifier-4-classes": (ClassifierModel(embed_dim=8, hidden_dim=24), 4),
    "summarizer": (SummarizerModel(embed_dim=8, hidden_dim=12, encoder_layers=2, dropout=0.1), 2),
    "transformer": (TransformerModel(d_model=16, num_heads=2, ff_dim=40, encoder_layers=2, decoder_layers=1,
                                     dropout=0.1), 2),
    "lm": (LMModel(d_model=16, num_heads=2, ff_dim=40, layers=2, positions="rotary"), 2),
    "lm-untied-learned": (LMModel(d_model=16, num_heads=2, ff_dim=40, layers=1, positions="learned",
                                  tie_embeddings=False), 2),
}


# ----------------------------------------------------------------------- XLA's count of the step
_SHAPE = r"[a-z0-9]+\[([0-9,]*)\]"
_DOT = re.compile(rf"=\s*{_SHAPE}\S*\s+dot\(\s*{_SHAPE}")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations|true_computation|false_computation)"
                    r"=\{?([^}\n]*)")


def hlo_matmul_flops(hlo: str) -> int:
    """2 x (output elements) x (contracted size) summed over every `dot` of an HLO module, following the
    computations each instruction calls (fusions, calls, conditionals). A while loop is refused: its trip
    count is not in the text, and the models are traced unrolled for this count."""
    bodies: dict[str, list[str]] = {}
    entry, name = None, None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            name = head.group(2)
            bodies[name] = []
            entry = name if head.group(1) else entry
        elif name is not None:
            bodies[name].append(line)

    def dims(text: str) -> list[int]:
        return [int(d) for d in text.split(",") if d]

    def flops(comp: str) -> int:
        total = 0
        for line in bodies[comp]:
            if re.search(r"\swhile\(", line):
                raise AssertionError("a while loop in the step: its products cannot be counted from the text")
            dot = _DOT.search(line)
            if dot:
                out, lhs = dims(dot.group(1)), dims(dot.group(2))
                contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", line)
                k = int(np.prod([lhs[i] for i in dims(contracting.group(1))])) if contracting else 1
                total += 2 * int(np.prod(out)) * k
            for called in _CALLS.findall(line):
                total += sum(flops(c.strip().lstrip("%")) for c in called.split(",") if c.strip().lstrip("%") in bodies)
        return total

    assert entry is not None, hlo[:500]
    return flops(entry)


def _inputs(kind: str) -> dict[str, tf.Tensor]:
    rng = np.random.default_rng(0)
    doc = rng.integers(4, VOCAB, (BATCH, MAX_LEN)).astype(np.int32)
    doc[1, MAX_LEN // 2:] = 0  # padding, as the data pipeline makes it
    if kind.startswith("classifier"):
        return {"tokens": tf.constant(doc), "label": tf.constant(np.arange(BATCH) % 2, tf.float32)}
    if kind.startswith("lm"):  # prepared sequences: targets are the tokens shifted by one
        return {"tokens": tf.constant(doc), "targets": tf.constant(np.roll(doc, -1, axis=1))}
    summary = rng.integers(4, VOCAB, (BATCH, SUMMARY_LEN + 1)).astype(np.int32)
    summary[:, 0] = BOS_ID
    return {"document": tf.constant(doc), "summary_in": tf.constant(summary[:, :-1]),
            "summary_out": tf.constant(summary[:, 1:])}


def _step_hlo(case: str) -> str:
    """The unoptimised HLO of one replica's forward and backward pass (what train.jit_compile compiles)."""
    cfg, classes = CASES[case]
    keras.utils.set_random_seed(0)
    model = build_model(cfg, vocab_size=VOCAB, max_len=MAX_LEN, summary_len=SUMMARY_LEN, num_classes=classes)
    batch = _inputs(case)
    if classes > 2:
        batch["label"] = tf.constant(np.arange(BATCH) % classes, tf.int32)
    model(task_for(cfg.kind).model_inputs(batch))
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.RNN):
            layer.unroll = True  # the same products, one per time step in the graph instead of a while loop
    engine = AccumulatingEngine(model, task_for(cfg.kind), global_batch=BATCH)
    def step(b):
        loss, grads, _ = engine.gradients(b)
        return loss, [tf.convert_to_tensor(g) for g in grads]  # embedding rows: dense (a scatter, no product)

    step = tf.function(step, jit_compile=True)
    return step.experimental_get_compiler_ir(batch)(stage="hlo")


def not_computed(cfg) -> int:
    """Products the formula counts (training = 3 x forward) that backpropagation skips: the gradient with
    respect to a GRU's all-zero initial state (one [H, 3H] product per encoder direction and layer; the
    decoder's initial state comes from the bridge, so its gradient is computed)."""
    return 2 * cfg.encoder_layers * dense(1, cfg.hidden_dim, 3 * cfg.hidden_dim) if cfg.kind == "summarizer" else 0


@pytest.mark.parametrize("case", list(CASES))
def test_formula_equals_the_matmuls_of_the_compiled_step(case):
    # Both sides count matrix products only, so they agree exactly once the products backpropagation skips
    # are taken off (`not_computed`): elementwise ops (softmax, LayerNorm, masks, dropout, the optimizer) are
    # in neither count. The formula itself, as MFU uses it, is within 1% of XLA's count: those skipped
    # products are one time step of the encoders' L (0.9% here at L=12, less at real lengths).
    cfg, classes = CASES[case]
    dims = task_for(cfg.kind).model_dims(max_len=MAX_LEN, summary_len=SUMMARY_LEN, num_classes=classes)
    formula = training_flops(cfg, vocab_size=VOCAB, **dims)
    counted = hlo_matmul_flops(_step_hlo(case))
    assert counted == BATCH * (formula - not_computed(cfg)), (counted, BATCH * formula)
    assert counted == pytest.approx(BATCH * formula, rel=0.01)


def test_every_model_kind_has_a_formula():
    missing = sorted(set(WORKLOADS) - set(FORMULAS))
    assert not missing, f"model kinds without a FLOPs formula in trainer/flops.py: {missing}"


def test_mfu_is_model_flops_per_second_over_peak():
    assert mfu(flops_per_example=3e9, examples_per_sec=50, peak_flops=3e11) == pytest.approx(0.5)
    assert mfu(flops_per_example=3e9, examples_per_sec=50, peak_flops=0) == 0.0


# ------------------------------------------------------------------------------------- levers
def test_levers_with_a_pipeline_are_refused():
    with pytest.raises(ConfigError, match="train.jit_compile does not compile a pipeline"):
        config_from_dict({"name": "x", "model": {"kind": "classifier"}, "train": {"jit_compile": True},
                          "distribution": {"pipeline": {"stages": 2}}})
    with pytest.raises(ConfigError, match="train.steps_per_call above 1 does not run a pipeline yet"):
        config_from_dict({"name": "x", "model": {"kind": "classifier"}, "train": {"steps_per_call": 4},
                          "distribution": {"pipeline": {"stages": 2}}})


def test_call_length_stops_at_every_boundary():
    assert call_length(0, 20, 4, (3, 7), []) == 3
    assert call_length(3, 20, 4, (3, 7), [5]) == 2
    assert call_length(18, 20, 4, (100,), [None]) == 2  # never past the last step
    assert call_length(8, 20, 10, (100,), [9, 50]) == 1
    assert call_length(4, 20, 10, (100,), [3]) == 10  # a hook's stop already passed


# --------------------------------------------------------------------------------- peak cache
KEY = peak.cache_key(host="h", device="Xeon", tensorflow="2.21.0", dtype="bfloat16", threads=2, processes=1)


def test_cache_entry_is_used_only_when_every_field_matches_and_it_is_fresh():
    cache = peak.with_entry({}, KEY, 4e11, now=1000.0)
    assert peak.lookup(cache, KEY, now=1000.0 + 60) == 4e11
    for field, other in [("host", "g"), ("device", "EPYC"), ("tensorflow", "2.22.0"), ("dtype", "float32"),
                         ("threads", 1), ("processes", 2)]:
        assert peak.lookup(cache, {**KEY, field: other}, now=1060.0) is None, field
    assert peak.lookup(cache, KEY, now=1000.0 + peak.MAX_AGE_S + 1) is None  # stale
    assert peak.lookup(cache, KEY, now=900.0) is None  # measured "in the future": a clock or a copied file
    # An entry filed under this key but describing another device (a hand-edited or copied file): not used.
    text = next(iter(cache))
    assert peak.lookup({text: {**cache[text], "device": "EPYC"}}, KEY, now=1060.0) is None
    assert peak.lookup({text: {**cache[text], "flops": -1}}, KEY, now=1060.0) is None


def test_cache_file_location_and_local_processes():
    assert peak.cache_path({"STRATA_CACHE_DIR": "/c"}) == Path("/c/peak.json")
    assert peak.cache_path({"XDG_CACHE_HOME": "/x", "HOME": "/h"}) == Path("/x/strata/peak.json")
    assert peak.cache_path({"HOME": "/h"}) == Path("/h/.cache/strata/peak.json")
    assert peak.local_processes({}) == 1
    assert peak.local_processes({"HOROVOD_LOCAL_SIZE": "2"}) == 2
    assert peak.local_processes({"STRATA_LOCAL_SIZE": "4", "HOROVOD_LOCAL_SIZE": "2"}) == 4
    assert peak.cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 9R14\n") == "AMD EPYC 9R14"


def test_probe_replaces_stale_and_ignores_foreign_entries_then_is_cached(tmp_path: Path):
    path = tmp_path / "peak.json"
    key = peak.device_key("float32")
    now = time.time()
    planted = peak.with_entry({}, key, 1e30, now=now - peak.MAX_AGE_S - 10)  # this device, stale
    planted = peak.with_entry(planted, {**key, "host": "elsewhere"}, 2e30, now=now)  # fresh, foreign
    planted = peak.with_entry(planted, {**key, "tensorflow": "0.0"}, 3e30, now=now)  # fresh, other TF
    path.write_text(json.dumps(planted))
    flops, source = peak.peak_flops("float32", cache_file=path, now=now)
    assert source == "measured" and 1e8 < flops < 1e16  # a real CPU, not a planted figure
    again, source = peak.peak_flops("float32", cache_file=path, now=now + 5)
    assert (again, source) == (flops, "cached")
    saved = json.loads(path.read_text())
    assert len(saved) == 3 and {e["flops"] for e in saved.values()} == {flops, 2e30, 3e30}
    path.write_text("{not json")  # a broken cache costs a probe, never the run
    assert peak.peak_flops("float32", cache_file=path, now=now)[1] == "measured"
