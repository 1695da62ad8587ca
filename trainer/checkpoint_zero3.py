"""ZeRO-3 checkpoints, written and read a level at a time, in the replicated format.

No rank holds the whole model to save: every rank all-gathers one level (its parameters and optimizer
slots, `Zero3State.gather_level`), the chief writes that level's tensors into a part bundle
(`tf.raw_ops.SaveV2`) under the keys `tf.train.Checkpoint` gives those objects in a replicated run, and frees
them; a last part holds the small state (step, save counter, optimizer step, RNG) and the object graph; then
`MergeV2Checkpoints` joins the parts into `ckpt-<step>`. The object graph and the keys come from the
replicated checkpoint's own serialisation (`save_util.serialize_graph_view`) of the deferred model and a
deferred optimizer built over it: the structure does not depend on storage, and each deferred variable is
serialised through a placeholder. So the bundle is an ordinary TensorFlow checkpoint: a replicated run (any
number of ranks, zero 0, 1 or 2) restores it with `tf.train.Checkpoint.restore`; a ZeRO-3 run restores any
checkpoint (its own or a replicated one) by reading one tensor at a time and keeping this rank's slices
(`Zero3State.load_level`). Atomicity is trainer/checkpoint.py's (manifest committed after the merge).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import tensorflow as tf
from tensorflow.python.checkpoint import graph_view, save_util
from tensorflow.python.trackable import base
from tensorflow.python.training.saving.saveable_object import SaveSpec
from tensorflow.python.util import object_identity

PARTS = "{name}_temp"  # trainer/checkpoint_manifest.py `discard` and `leftovers` clean this folder up


class _Placeholder(base.Trackable):
    """Stands in for a deferred variable while the object graph is serialised (it has no value to read)."""

    def _serialize_to_tensors(self) -> dict:
        return {"VARIABLE_VALUE": tf.zeros([])}


class KeyMap:
    """The replicated checkpoint's view of `root` (a tf.train.Checkpoint over the deferred model and the
    deferred full optimizer): `key[id(variable)]` for every deferred variable, `small` (checkpoint key ->
    (trackable, current value)) for every variable with storage, and the serialised object graph."""

    def __init__(self, root: tf.train.Checkpoint) -> None:
        view = graph_view.ObjectGraphView(root)
        trackables, _ = view.breadth_first_traversal()
        stand_ins = object_identity.ObjectIdentityDictionary()
        for obj in trackables:
            if isinstance(obj, keras.Variable) and getattr(obj, "_value", None) is None:  # deferred: no storage
                stand_ins[obj] = _Placeholder()
        serialized, _, _, proto = save_util.serialize_graph_view(view, object_map=stand_ins)
        owner = {id(stand_in): obj for obj, stand_in in stand_ins.items()}
        self.key: dict[int, str] = {}
        self.small: dict[str, tuple[Any, tf.Tensor]] = {}
        for trackable, tensors in serialized.items():
            for key, value in tensors.items():
                if id(trackable) in owner:
                    self.key[id(owner[id(trackable)])] = key
                else:  # a SaveSpec (e.g. tensor_callable.Callable) reads its tensor only when asked
                    self.small[key] = (trackable, value.tensor if isinstance(value, SaveSpec) else value)
        self.graph = proto.SerializeToString()


def _slot_variable(full_slots: dict[str, list], index: dict[int, int], variable: Any, slot: str | None) -> Any:
    """The full optimizer's slot `slot` of model `variable` (the variable itself for None)."""
    return variable if slot is None else full_slots[slot][index[id(variable)]]


def _index(state: Any) -> tuple[dict[str, list], dict[int, int]]:
    """The full optimizer's slot lists, and each model variable's position in them."""
    return state.full_slots(), {id(v): j for j, v in enumerate(state.model.trainable_variables)}


class Zero3Writer:
    """One ZeRO-3 save. `write_parts` (every rank: the gathers are collectives) writes the chief's part
    bundles; `write(prefix)` (the chief, from Checkpointer._write) merges them into the checkpoint."""

    def __init__(self, state: Any, root: tf.train.Checkpoint) -> None:
        self.state, self.root = state, root
        self.parts: list[str] = []
        self.error: BaseException | None = None

    def write_parts(self, directory: Path, name: str, *, chief: bool) -> None:
        """Every rank gathers every level (in order); the chief saves each into a part. A failing disk does not
        stop the chief gathering (the other ranks would wait for it forever): the error is raised by `write`."""
        from trainer import checkpoint_manifest as files

        folder = directory / PARTS.format(name=name)
        if chief:
            self.error = _attempt(lambda: (directory.mkdir(parents=True, exist_ok=True),
                                           files.discard(directory, name), folder.mkdir()))
        full_slots, index = _index(self.state)
        self.state.full_optimizer().iterations.assign(self.state.optimizer.iterations)
        keys = KeyMap(self.root) if chief else None
        for i in range(self.state.level_count()):
            level = self.state.gather_level(i)
            if chief and level and self.error is None:
                names, tensors = [], []
                for variable, values in level:
                    for slot, value in values.items():
                        names.append(keys.key[id(_slot_variable(full_slots, index, variable, slot))])
                        tensors.append(tf.cast(value, variable.dtype) if slot is None else value)
                self._save(str(folder / f"part-{i:05d}"), names, tensors)
            del level  # this level's whole tensors are dead before the next gather
        if chief and self.error is None:
            names = [base.OBJECT_GRAPH_PROTO_KEY, *keys.small]
            tensors = [tf.constant(keys.graph), *(value for _, value in keys.small.values())]
            self._save(str(folder / "part-state"), names, tensors)

    def _save(self, prefix: str, names: list[str], tensors: list[tf.Tensor]) -> None:
        self.error = _attempt(lambda: tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names,
                                                        shape_and_slices=[""] * len(names), tensors=tensors))
        self.parts.append(prefix)

    def write(self, prefix: str) -> None:
        """The chief: merge the parts into `prefix` (.index + .data-*), or raise what went wrong writing them."""
        if self.error is not None:
            raise self.error
        tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=self.parts, destination_prefix=prefix,
                                      delete_old_dirs=True)


def _attempt(action) -> BaseException | None:
    try:
        action()
    except (OSError, tf.errors.OpError) as err:
        return err
    return None


def restore(state: Any, root: tf.train.Checkpoint, prefix: str) -> str | None:
    """Read checkpoint `prefix` (written by any layout) into this rank's shards, slots and small state, one
    tensor at a time; return what is missing, or None on success."""
    reader = tf.train.load_checkpoint(prefix)
    present = reader.get_variable_to_shape_map()
    keys = KeyMap(root)
    full_slots, index = _index(state)
    wanted = [keys.key[id(_slot_variable(full_slots, index, v, s))] for v in state.model.trainable_variables
              for s in [None, *full_slots]] + list(keys.small)
    missing = [k for k in wanted if k not in present]
    if missing:
        return f"it lacks {len(missing)} of the model's tensors (e.g. {missing[0]})"
    for i in range(state.level_count()):
        state.load_level(i, lambda v, s: reader.get_tensor(keys.key[id(_slot_variable(full_slots, index, v, s))]))
    for key, (trackable, _) in keys.small.items():
        trackable.assign(reader.get_tensor(key))
    state.optimizer.iterations.assign(state.full_optimizer().iterations)
    return None
