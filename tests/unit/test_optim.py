"""Learning-rate schedule and replica scaling."""
from __future__ import annotations

import pytest

from trainer.config import OptimizerConfig
from trainer.optim import WarmupSchedule, build_optimizer


def test_warmup_then_cosine_to_the_floor():
    s = WarmupSchedule(1.0, warmup_steps=10, total_steps=110, decay="cosine", min_ratio=0.1)
    assert float(s(0)) == pytest.approx(0.1)
    assert float(s(9)) == pytest.approx(1.0)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.55)
    assert float(s(110)) == pytest.approx(0.1)


def test_linear_and_constant():
    lin = WarmupSchedule(2.0, warmup_steps=0, total_steps=100, decay="linear", min_ratio=0.0)
    assert float(lin(50)) == pytest.approx(1.0)
    const = WarmupSchedule(2.0, warmup_steps=0, total_steps=100, decay="constant", min_ratio=0.0)
    assert float(const(99)) == pytest.approx(2.0)


def test_learning_rate_scales_with_replicas_only_when_asked():
    plain = build_optimizer(OptimizerConfig(lr=0.01), total_steps=10, num_replicas=4, mixed_precision="off")
    scaled = build_optimizer(OptimizerConfig(lr=0.01, scale_lr_with_replicas=True), total_steps=10, num_replicas=4,
                             mixed_precision="off")
    assert plain.learning_rate.numpy() == pytest.approx(0.01)
    assert scaled.learning_rate.numpy() == pytest.approx(0.04)


def test_float16_gets_loss_scaling():
    opt = build_optimizer(OptimizerConfig(), total_steps=10, num_replicas=1, mixed_precision="float16")
    assert hasattr(opt, "inner_optimizer") and hasattr(opt, "scale_loss")


def test_sgd_with_momentum_steps_by_lr_times_gradient():
    import keras
    import numpy as np

    opt = build_optimizer(OptimizerConfig(name="sgd", lr=0.5, momentum=0.9), total_steps=10, num_replicas=1,
                          mixed_precision="off")
    assert isinstance(opt, keras.optimizers.SGD) and opt.momentum == pytest.approx(0.9)
    w = keras.Variable(np.array([1.0, -2.0], np.float32))
    opt.apply_gradients([(np.array([0.2, 0.4], np.float32), w)])
    np.testing.assert_allclose(w.numpy(), [0.9, -2.2], rtol=1e-6)  # w - lr * g on the first step


def test_momentum_is_for_sgd_only():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="momentum needs optimizer.name: sgd"):
        OptimizerConfig(name="adam", momentum=0.9)


def test_clipping_a_sparse_gradient_clips_the_gradient_it_adds_up_to():
    """Row 0 gets [1, 1] twice: the gradient is [[2, 2], 0, 0], norm sqrt(8). Keras clips the slices as given
    (norm sqrt(4)); merged first, the clipped step is the dense gradient's."""
    import keras
    import numpy as np
    import tensorflow as tf

    from trainer.optim import merge_duplicate_rows

    sparse = tf.IndexedSlices(tf.constant([[1.0, 1.0], [1.0, 1.0], [3.0, 0.0]]), tf.constant([0, 0, 2]),
                              tf.constant([3, 2]))
    dense = tf.convert_to_tensor(sparse)
    steps = {}
    for name, grad in (("sparse", sparse), ("merged", merge_duplicate_rows([sparse])[0]), ("dense", dense)):
        w = keras.Variable(np.zeros((3, 2), np.float32))
        keras.optimizers.SGD(learning_rate=1.0, global_clipnorm=1.0).apply_gradients([(grad, w)])
        steps[name] = -w.numpy()
    np.testing.assert_allclose(steps["merged"], steps["dense"], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(steps["dense"]), 1.0, rtol=1e-6)
    assert not np.allclose(steps["sparse"], steps["dense"])  # what Keras does with the slices as they are
    merged = merge_duplicate_rows([sparse, dense])
    assert merged[1] is dense and sorted(merged[0].indices.numpy().tolist()) == [0, 2]


def test_adam_second_moment_of_a_sparse_gradient_is_that_of_the_row_sum():
    """Through the step's update (no clipping) with the optimizer Strata builds: row 0 gets [1, 2] and [2, 1].
    Keras' Adam squares the slices one by one (v from 1 + 4, 4 + 1); Strata's sums them first, so v and the
    step are the dense gradient's ([3, 3] squared), as under ZeRO and the pipeline, which densify."""
    import keras
    import numpy as np
    import tensorflow as tf

    from trainer.strategy.base import OptimizerUpdate
    from trainer.strategy.single import SingleDevice

    sparse = tf.IndexedSlices(tf.constant([[1.0, 2.0], [2.0, 1.0]]), tf.constant([0, 0]), tf.constant([2, 2]))
    results = {}
    for name, grad in (("sparse", sparse), ("dense", tf.convert_to_tensor(sparse))):
        w = keras.Variable(np.zeros((2, 2), np.float32))
        optimizer = build_optimizer(OptimizerConfig(name="adam", lr=0.1), total_steps=10, num_replicas=1,
                                    mixed_precision="off")
        optimizer.build([w])
        OptimizerUpdate(SingleDevice(), optimizer, [w], merge_rows=False, loss_scaling=False)([grad],
                                                                                             ok=tf.constant(True))
        results[name] = (w.numpy(), optimizer._velocities[0].numpy())
    np.testing.assert_allclose(results["sparse"][1], results["dense"][1], rtol=1e-6)
    np.testing.assert_allclose(results["sparse"][1][0], [0.009, 0.009], rtol=1e-5)  # (1 - 0.999) * 3^2
    np.testing.assert_allclose(results["sparse"][0], results["dense"][0], rtol=1e-6)
