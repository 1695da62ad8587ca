"""The guard's pieces, in-process: flags, first bad position, poisoning, message, fault spec."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from trainer.faults import parse_fault, parse_faults
from trainer.nonfinite import describe, first_bad, local_flags, poison


def test_flags_mark_the_loss_and_each_gradient():
    grads = [tf.constant([1.0, 2.0]), tf.IndexedSlices(tf.constant([[np.inf]]), tf.constant([0]), tf.constant([3, 1])),
             tf.constant([np.nan])]
    flags = local_flags(tf.constant(0.5), grads)
    assert flags.numpy().tolist() == [0.0, 0.0, 1.0, 1.0]
    assert int(first_bad(flags)) == 3  # 1 + index: the loss is 1, gradient 1 is 3
    assert int(first_bad(local_flags(tf.constant(np.inf), [tf.constant([1.0])]))) == 1
    assert int(first_bad(local_flags(tf.constant(1.0), [tf.constant([1.0])]))) == 0


def test_poison_only_when_not_ok():
    g = [tf.constant([1.0, -0.0]), tf.constant([2.0])]
    same = poison(g, tf.constant(True))
    assert same[0].numpy().tobytes() == g[0].numpy().tobytes()  # bit for bit, -0.0 included
    assert np.isnan(poison(g, tf.constant(False))[0].numpy()).all()


def test_describe_names_variable_and_level():
    paths = ["m/embed/emb", "m/output/dense/bias"]
    assert describe(1, paths, ["embed", "output"]) == "loss"
    assert describe(3, paths, ["embed", "output"]) == "gradient of m/output/dense/bias (level output)"


def test_fault_spec_ranges_are_for_in_step_faults_only():
    assert parse_fault("1:5:inf") == (1, 5, 5, "inf")
    assert parse_fault("0:4-9:inf") == (0, 4, 9, "inf")
    assert parse_fault("0:4-9:nan_loss") == (0, 4, 9, "nan_loss")
    assert parse_fault("1:5:kill") == (1, 5, 5, "kill")
    for bad in ("1:5-9:kill", "1:9-5:inf", "1:x:inf", "1:5:boom", "1:5:nan"):
        with pytest.raises(ValueError):
            parse_fault(bad)


def test_several_faults_in_one_spec():
    assert parse_faults("1:5:inf, 1:7:nan_loss") == [(1, 5, 5, "inf"), (1, 7, 7, "nan_loss")]
    assert parse_faults("") == []
    with pytest.raises(ValueError, match="1:5:boom"):
        parse_faults("1:5:inf,1:5:boom")
