"""Models as an ordered list of levels: f = f_n ∘ … ∘ f_1.

Each level maps a *carry* (a flat dict of dense tensors) to a new carry. A pipeline stage is then just a
contiguous slice of levels (`LevelModel.run_levels`), and whatever crosses a stage boundary is exactly
the carry dict, so levels pass through only the keys later levels still need.

Carry contract (checked by `LevelModel.run_levels` at trace time):
  * a dict with string keys and dense `tf.Tensor` values (no None, no Python numbers, no ragged/sparse);
  * float values are differentiable activations; int/bool values (token ids, masks) carry no gradient;
  * under a mixed-precision policy activations are in the compute dtype (bf16/fp16) — half the bytes at
    a stage boundary — except the user-facing outputs ("logit", "probability", "logits", "attention"),
    which are always float32.

This module holds no distribution code: placement of levels on devices belongs to the pipeline layer.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf

Carry = dict[str, tf.Tensor]

# Special token ids shared with the tokenizer.
PAD_ID = 0
BOS_ID = 2
EOS_ID = 3


class Level(keras.layers.Layer):
    """One function f_i of the model: `call(carry, training) -> new carry`.

    Subclasses create their sublayers in `__init__` (they build lazily on the first call) and return a
    NEW dict holding only what later levels need.
    """

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        # Keras casts every floating input of `__call__` to the layer's compute dtype. A level's input is
        # the whole carry, so under mixed_bfloat16 that would silently downcast float32 pass-through keys
        # (e.g. "attention"). Sublayers still autocast their own inputs.
        self._convert_input_args = False

    def __call__(self, carry: Mapping[str, Any], training: bool | None = None, **kwargs: Any) -> Carry:
        # None lets Keras take `training` from an enclosing layer's call, as for any layer.
        if training is not None:
            kwargs["training"] = training
        out = super().__call__(carry, **kwargs)
        # RNN/Dropout/Dense outputs come back with Keras' implicit `_keras_mask` attached. In a carry
        # it would be picked up silently by the next level's sublayers (and warned about on every
        # call), yet it cannot cross a device boundary. Masks are explicit carry keys instead.
        if isinstance(out, Mapping):
            for value in out.values():
                if getattr(value, "_keras_mask", None) is not None:
                    value._keras_mask = None
        return out

    def build(self, carry_shape: Any) -> None:
        # Sublayers are created in __init__ and build on their first call. Overriding build stops Keras 3
        # from tracing `call` a second time on symbolic inputs just to create variables.
        del carry_shape

    def call(self, carry: Carry, training: bool = False) -> Carry:  # pragma: no cover - abstract
        raise NotImplementedError


def _check_carry(level_name: str, carry: Any) -> None:
    """Fail at trace time, naming the level, if a carry would not survive a device boundary."""
    if not isinstance(carry, Mapping):
        raise TypeError(f"level '{level_name}' returned {type(carry).__name__}; a level must return a dict")
    for key, value in carry.items():
        if not isinstance(key, str):
            raise TypeError(f"level '{level_name}': carry key {key!r} is not a string")
        if isinstance(value, keras.KerasTensor):  # symbolic tracing by Keras: shapes only
            continue
        if not tf.is_tensor(value) or isinstance(value, (tf.RaggedTensor, tf.SparseTensor)):
            raise TypeError(
                f"level '{level_name}': carry['{key}'] is {type(value).__name__}; every carry value must be "
                "a dense tf.Tensor so it can cross a device boundary"
            )


class LevelModel(keras.Model):
    """A model made of an ordered list of `Level`s, run one after another on a carry dict.

    Attributes:
        levels: the levels, in order.
        task: the name of the task it learns (a `Task.name` of trainer/tasks/).
        input_specs: `{name: tf.TensorSpec}` of the model inputs (batch dimension None).
    """

    def __init__(
        self,
        levels: Sequence[Level],
        *,
        task: str,
        input_specs: Mapping[str, tf.TensorSpec],
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        names = [lvl.name for lvl in levels]
        if not names:
            raise ValueError("a LevelModel needs at least one level")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"level names must be unique; repeated: {duplicates}")
        self.levels = list(levels)
        # Keras 3 stores list attributes in a TrackedList, which TensorFlow's object graph does not
        # follow: tf.train.Checkpoint(model=self) would save no weights at all (and a restore's
        # assert_consumed() would pass vacuously). One attribute per level fixes that and gives
        # checkpoint keys named after the stable level names (Keras de-duplicates its own tracking).
        for lvl in self.levels:
            setattr(self, f"level_{lvl.name}", lvl)
        self.task = task
        self.input_specs = dict(input_specs)

    # ------------------------------------------------------------------------------------ structure
    @property
    def level_names(self) -> list[str]:
        """The stable, user-facing level names, in execution order."""
        return [lvl.name for lvl in self.levels]

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def level_index(self, name: str) -> int:
        """Position of the level called `name` (for configs that name pipeline split points)."""
        try:
            return self.level_names.index(name)
        except ValueError:
            raise KeyError(f"no level named {name!r}; levels are {self.level_names}") from None

    # ------------------------------------------------------------------------------------- running
    def run_levels(
        self, carry: Mapping[str, Any], start: int = 0, stop: int | None = None, training: bool = False
    ) -> Carry:
        """Run the contiguous slice of levels [start, stop) on `carry` (what one pipeline stage runs)."""
        stop = self.num_levels if stop is None else stop
        if not 0 <= start <= stop <= self.num_levels:
            raise ValueError(f"level slice [{start}, {stop}) is outside [0, {self.num_levels}]")
        out: Carry = {k: tf.convert_to_tensor(v) for k, v in carry.items()}
        for lvl in self.levels[start:stop]:
            out = lvl(out, training=training)
            _check_carry(lvl.name, out)
        return out

    def call(self, inputs: Mapping[str, Any], training: bool = False) -> Carry:
        missing = sorted(set(self.input_specs) - set(inputs))
        if missing:
            raise KeyError(f"model inputs missing {missing}; expected keys {sorted(self.input_specs)}")
        # Cast to the declared dtypes so numpy int64 batches and int32 serving inputs trace alike.
        carry = {k: tf.cast(inputs[k], spec.dtype) for k, spec in self.input_specs.items()}
        return self.run_levels(carry, training=training)

    def build(self, input_shape: Any) -> None:
        # Same reason as Level.build: levels build on the first real call, no extra symbolic trace.
        del input_shape

    def example_inputs(self, batch_size: int = 2) -> Carry:
        """All-PAD inputs (with BOS first on `summary_in`) of the right shapes and dtypes."""
        out = {}
        for key, spec in self.input_specs.items():
            shape = [batch_size, *spec.shape[1:]]
            value = tf.zeros(shape, spec.dtype)
            if key == "summary_in":
                value = tf.concat([tf.fill([batch_size, 1], tf.cast(BOS_ID, spec.dtype)), value[:, 1:]], 1)
            out[key] = value
        return out

    def build_from_inputs(self, example_inputs: Mapping[str, Any] | None = None) -> "LevelModel":
        """Create every variable by one inference call (on `example_inputs` or `self.example_inputs()`)."""
        self(dict(example_inputs) if example_inputs is not None else self.example_inputs(), training=False)
        return self
