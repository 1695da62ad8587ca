"""ZeRO 3's update of the level shards one after another (trainer/strategy/zero3.py `apply_in_order`): the same
numbers as one `apply_gradients`, and each level's update ordered after the previous one's."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.strategy.zero3 import apply_in_order

SIZES = (7, 12, 5)


def _optimizer(**kw):
    schedule = keras.optimizers.schedules.CosineDecay(1e-2, decay_steps=10, warmup_target=2e-2, warmup_steps=2)
    return keras.optimizers.AdamW(learning_rate=schedule, weight_decay=0.1, **kw)


def _run(in_order: bool, optimizer) -> tuple[list[np.ndarray], int]:
    rng = np.random.default_rng(0)
    variables = [keras.Variable(rng.normal(size=n).astype("float32"), name=f"shard_{i}") for i, n in enumerate(SIZES)]
    optimizer.build(variables)

    @tf.function
    def step(grads, scale):
        if in_order:
            apply_in_order(optimizer, grads, variables, scale)
        else:
            optimizer.apply_gradients(zip([g * scale for g in grads], variables))

    for _ in range(4):
        step([tf.constant(rng.normal(size=n).astype("float32")) for n in SIZES], tf.constant(0.7))
    return [v.numpy() for v in variables], int(optimizer.iterations.numpy())


@pytest.mark.parametrize("make", [_optimizer, lambda: keras.optimizers.SGD(0.1, momentum=0.9),
                                  lambda: keras.optimizers.LossScaleOptimizer(_optimizer())])
def test_in_order_equals_one_apply(make):
    ordered, steps = _run(True, make())
    together, steps_together = _run(False, make())
    assert steps == steps_together == 4  # the step counter advances once per step, not once per level
    for a, b in zip(ordered, together):
        np.testing.assert_array_equal(a, b)


def test_each_level_waits_for_the_previous_one():
    variables = [keras.Variable(np.ones(n, "float32")) for n in SIZES]
    optimizer = _optimizer()
    optimizer.build(variables)
    graph = tf.function(lambda grads: apply_in_order(optimizer, grads, variables, tf.constant(0.5))) \
        .get_concrete_function([tf.TensorSpec([n], tf.float32) for n in SIZES]).graph
    ancestors: dict[str, set[str]] = {}

    def above(op) -> set[str]:
        if op.name not in ancestors:
            ancestors[op.name] = set()
            for parent in [t.op for t in op.inputs] + list(op.control_inputs):
                ancestors[op.name] |= {parent.name} | above(parent)
        return ancestors[op.name]

    for k in (1, 2):
        ends = {op.name for op in graph.get_operations() if op.name.startswith(f"level_update_{k - 1}/")}
        ops = [op for op in graph.get_operations() if op.name.startswith(f"level_update_{k}/")]
        assert ops  # (Placeholder: a captured variable handle, an input, not work)
        late = [op.name for op in ops if op.type not in ("NoOp", "Placeholder") and not ends & above(op)]
        assert not late, f"level {k}'s update does not wait for level {k - 1}'s: {late[:5]}"
