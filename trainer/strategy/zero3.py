"""ZeRO-3 on Horovod: parameters, gradients and optimizer state sharded by level (`distribution.zero: 3`).

No rank holds the whole model. The model's variables are created *deferred* (Keras 3: a variable created
under a `StatelessScope` with a callable initializer keeps only its shape, dtype and initializer; nothing is
allocated), then, one level at a time, each variable's initializer is run, the level's values are flattened
into one padded bucket (trainer/parallel/zero.py) and only this rank's slice is kept, in a real variable
(`shards[i]`). The initializers carry the seeds drawn when the layers were constructed, so the values equal
the replicated model's with the same seed, and at most one level is ever whole on a rank.

`loss_and_grads` runs one step's forward and backward level by level, inside a compiled step:
  forward:  for each level, all-gather its bucket, run the level under
            `StatelessScope(state_mapping={variable: gathered tensor})`, keep only the output carry
            (the gathered weights are dead after the level);
  backward: for each level in reverse, all-gather again and recompute the level under a tape (a per-level
            recompute, like the pipeline engine's `recompute`), get the gradients w.r.t. its input carry and
            its gathered weights, and reduce-scatter (Sum) the flattened weight gradients into this rank's
            slice: the full gradient of one level is a transient, the stored gradient is 1/N.

Wired into training by `Zero3State` (the run's update and its shards' optimizer) and `Zero3Engine` (the
step's gradients: one reduce-scattered slice per level with parameters), built by `build_replica`
(trainer/strategy/replica.py); checkpoints are written level by level (trainer/checkpoint_zero3.py).

Elastic Horovod: `host_copy` (every commit: the parameters and optimizer state gathered level by level into
each rank's host memory) and `reshard` (after the world changed size: new level buckets, this rank's slices of
that copy), as zero 1/2 do (trainer/strategy/zero.py).

Limits, each a one-line refusal in trainer/parallel/layout.py: variables shared by two levels (tied
embeddings) and non-trainable variables are not supported; randomness inside a level (dropout) would draw
the same mask in the forward and in the recompute (a StatelessScope records the seed generator's update
instead of applying it), but the seed state would not advance across steps.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import keras
import numpy as np
import tensorflow as tf
from keras.src.backend.common import global_state

from trainer.parallel.zero import Bucket, plan_buckets
from trainer.strategy.zero import flatten_bucket, host_key, host_shapes_of, new_shard, optimizer_slots

NO_CAP = 1 << 62  # one bucket per level, however large


def build_deferred(model: Any, inputs: Mapping[str, Any]) -> None:
    """Create every variable of `model` by one call, allocating none of its parameters (the call reads each weight
    through its initializer, one transient at a time). `initialize_variables=False`: by default leaving
    the outermost StatelessScope initialises every deferred variable, i.e. materialises the whole model."""
    with keras.StatelessScope(initialize_variables=False):
        model(dict(inputs), training=False)
    global_state.set_global_attribute("uninitialized_variables", [])  # no later scope may materialise them
    for variable in model.non_trainable_variables:  # a few elements each (RNN seed generators): kept whole
        if is_deferred(variable):
            variable._deferred_initialize()


def is_deferred(variable: Any) -> bool:
    """True while a Keras variable has no storage (created under a StatelessScope, never initialised)."""
    return getattr(variable, "_value", None) is None


class ShardedLevels:
    """This rank's slice of each level's parameters, and the level-by-level step over them."""

    def __init__(self, hvd: Any, model: Any, *, initialize: bool = True) -> None:
        """`initialize=False`: shards of zeros (an elastic re-shard loads them from the committed state)."""
        self.hvd, self.model = hvd, model
        self.rank, self.ranks = hvd.rank(), hvd.size()
        self.level_vars = [list(level.trainable_variables) for level in model.levels]
        self._check(model)
        self.buckets: list[Bucket | None] = [
            plan_buckets([int(np.prod(v.shape)) for v in vs], self.ranks, NO_CAP)[0] if vs else None
            for vs in self.level_vars]
        self.shards = [self._init_shard(i) if initialize else self._zero_shard(i) for i in range(len(self.level_vars))]

    def _check(self, model: Any) -> None:
        seen: set[int] = set()
        for level, variables in zip(model.levels, self.level_vars):
            state = [v.path for v in level.non_trainable_variables if "seed_generator" not in v.path]
            if state:  # (seed generators are inert: the layout refuses dropout; `build_deferred` materialised them)
                raise ValueError(f"level {level.name} has non-trainable variables {state}: not supported by zero 3 yet")
            shared = [v.path for v in variables if id(v) in seen]
            if shared:
                raise ValueError(f"level {level.name} shares {shared} with an earlier level (tied embeddings): "
                                 "not supported by zero 3; set model.tie_embeddings=false")
            seen |= {id(v) for v in variables}

    def _init_shard(self, i: int) -> Any:
        """Run the level's initializers (the whole level, once, transiently) and keep this rank's slice."""
        bucket = self.buckets[i]
        if bucket is None:
            return None
        values = [v._initializer(v.shape, dtype=v.dtype) if is_deferred(v) else v.value for v in self.level_vars[i]]
        start, stop = bucket.owned(self.rank)
        # A copy: a contiguous slice of an eager tensor can share its buffer, and the variable would then keep
        # the whole level alive (measured: a sharded 200M-parameter model held the whole model's bytes).
        mine = np.array(flatten_bucket(values, bucket)[start:stop], copy=True)
        return keras.Variable(mine, dtype="float32", trainable=True, name=f"zero3_shard_{i}")

    def _zero_shard(self, i: int) -> Any:
        return None if self.buckets[i] is None else new_shard(self.buckets[i].shard, f"zero3_shard_{i}")

    # ------------------------------------------------------------------------------- collectives
    def gather(self, i: int, after: Any = None) -> list[tf.Tensor]:
        """Level i's parameters, whole, from every rank's slice (one all-gather of its bucket), issued only
        once the tensors `after` exist. In a compiled step nothing else orders the gathers (they depend on the
        shards only): without it TensorFlow may run every level's gather first and hold the whole model."""
        bucket, variables = self.buckets[i], self.level_vars[i]
        deps = [t for t in tf.nest.flatten(after) if t is not None] if after is not None else []
        with tf.control_dependencies(deps or None):  # (a gradient that does not exist orders nothing)
            shard = tf.identity(self.shards[i].value)
        whole = self.hvd.allgather(shard, name=f"zero3_ag_{i}")
        return [tf.cast(tf.reshape(whole[p.offset:p.offset + p.size], variables[p.index].shape),
                        variables[p.index].dtype) for p in bucket.pieces]

    def _run(self, i: int, params: list, carry: dict, training: bool) -> dict:
        mapping = list(zip(self.level_vars[i], params))
        with keras.StatelessScope(state_mapping=mapping, initialize_variables=False):
            return self.model.levels[i](carry, training=training)

    def forward(self, inputs: Mapping[str, tf.Tensor], training: bool = False) -> dict:
        """The model's output carry, level by level through gathered weights (evaluation: no tape)."""
        carries = [{k: tf.convert_to_tensor(v) for k, v in inputs.items()}]
        for i in range(len(self.level_vars)):
            params = self.gather(i, carries[i - 1] if i >= 2 else None) if self.buckets[i] is not None else []
            carries.append(self._run(i, params, carries[-1], training))
        return carries[-1]

    # ----------------------------------------------------------------------------------- the step
    def loss_and_grads(self, inputs: Mapping[str, tf.Tensor], loss_fn: Callable[[dict], tf.Tensor],
                       training: bool = True) -> tuple[tf.Tensor, list]:
        """(loss, one reduce-scattered gradient slice per level: None for a level without parameters)."""
        # carries[j]: the input of level j. Level i's gather waits for level i-2's output (carries[i-1]): at
        # most two levels are whole at a time, the one running and the next one's prefetch.
        carries = [{k: tf.convert_to_tensor(v) for k, v in inputs.items()}]
        last = len(self.level_vars) - 1
        for i in range(last):  # forward: each level's weights live only during its call
            carries.append(self._run(i, self._prefetch(i, carries), carries[-1], training))
        grads: list = [None] * len(self.level_vars)
        # The last level's forward runs under the loss's tape: its backward follows at once, so its weights stay
        # gathered and nothing of it is recomputed (one level's forward saved per micro-step).
        params, carry = self._prefetch(last, carries), carries[last]
        ins = [k for k, v in carry.items() if v.dtype.is_floating]
        with tf.GradientTape() as tape:
            tape.watch(params + [carry[k] for k in ins])
            loss = loss_fn(self._run(last, params, carry, training))
        got = tape.gradient(loss, params + [carry[k] for k in ins])
        upstream, grads[last] = dict(zip(ins, got[len(params):])), self._reduce_scatter(last, got[:len(params)])
        # done[-2]: the backward of level i+2 (its input gradient and its reduce-scattered slice). Waiting for the
        # slice too bounds the reduce-scatters in flight: Horovod runs them on its own thread, each holding its
        # level's whole gradient until it is done, and one slower than the compute let them pile up.
        done = [(upstream, grads[last])]
        for i in reversed(range(last)):  # backward: gather again, recompute, reduce-scatter
            upstream, grads[i] = self._backward(i, carries[i], upstream, training, done[-2] if len(done) > 1 else None)
            done.append((upstream, grads[i]))
        return loss, grads

    def _prefetch(self, i: int, carries: list) -> list:
        """Level i's weights for its forward, gathered once level i-2's output exists (carries[i-1])."""
        return self.gather(i, carries[i - 1] if i >= 2 else None) if self.buckets[i] is not None else []

    def _backward(self, i: int, carry: dict, upstream: dict, training: bool, after: Any) -> tuple[dict, Any]:
        params = self.gather(i, after) if self.buckets[i] is not None else []
        ins = [k for k, v in carry.items() if v.dtype.is_floating]
        with tf.GradientTape() as tape:
            tape.watch(params + [carry[k] for k in ins])
            out = self._run(i, params, carry, training)
        keys = [k for k in out if upstream.get(k) is not None]
        got = tape.gradient([out[k] for k in keys], params + [carry[k] for k in ins],
                            output_gradients=[upstream[k] for k in keys])
        return dict(zip(ins, got[len(params):])), self._reduce_scatter(i, got[:len(params)])

    def _reduce_scatter(self, i: int, param_grads: list) -> Any:
        """Level i's weight gradients summed over the ranks into this rank's slice (None: no parameters)."""
        if self.buckets[i] is None:
            return None
        dense = [tf.zeros(v.shape, tf.float32) if g is None else tf.cast(tf.convert_to_tensor(g), tf.float32)
                 for g, v in zip(param_grads, self.level_vars[i])]
        return self.hvd.reducescatter(flatten_bucket(dense, self.buckets[i]), op=self.hvd.Sum, name=f"zero3_rs_{i}")

    def clip(self, grads: list, clip_norm: float) -> list:
        """Clip the slices by the global norm of the whole summed gradient (`clip_scale`)."""
        scale = self.clip_scale(grads, clip_norm)
        return [None if g is None else g * scale for g in grads]

    def clip_scale(self, grads: list, clip_norm: float) -> tf.Tensor:
        """The factor that clips the slices by the global norm of the whole summed gradient: the slices'
        squared sums, all-reduced (Keras' `global_clipnorm` formula, as the zero 1/2 update does). The squares
        are taken one slice after another: unordered, TensorFlow may square every level at once (a transient
        of 4 bytes per held parameter)."""
        sums: list = []
        for g in (g for g in grads if g is not None):
            with tf.control_dependencies(sums[-1:]):
                sums.append(tf.reduce_sum(tf.square(g)))
        squares = self.hvd.allreduce(tf.add_n(sums), op=self.hvd.Sum, name="zero3_norm")
        return clip_norm * tf.minimum(1.0 / tf.sqrt(squares), 1.0 / clip_norm)

    def full_values(self) -> list[np.ndarray]:
        """Every parameter, whole, in `model.trainable_variables`-per-level order (gathered level by level:
        a test and checkpoint helper)."""
        out = []
        for i in range(len(self.level_vars)):
            if self.buckets[i] is not None:
                out += [t.numpy() for t in self.gather(i)]
        return out


class Zero3State:
    """One rank's ZeRO-3 state: the level shards (`levels`), the run's Keras optimizer built over them (its
    slots hold 1/N of the replicated optimizer state), and the step's update (`__call__`, the interface of
    trainer/strategy/base.py `OptimizerUpdate`): clip the slices by the global norm, apply them to the
    shards when the agreed `ok` holds. Parameters stay sharded: nothing is gathered after the update."""

    def __init__(self, hvd: Any, model: Any, new_optimizer: Callable[[], Any], *, clip_norm: float | None) -> None:
        self.hvd, self.model, self.new_optimizer, self.clip_norm = hvd, model, new_optimizer, clip_norm
        self._plan(ShardedLevels(hvd, model))

    def _plan(self, levels: ShardedLevels) -> None:
        """Take `levels` (this rank's shards for the current number of ranks) and a fresh optimizer over them."""
        self.levels = levels
        self.shards = [s for s in self.levels.shards if s is not None]
        # level -> its position in `shards` (and in the optimizer's slot lists); None: no parameters
        positions = iter(range(len(self.shards)))
        self.position = [None if s is None else next(positions) for s in self.levels.shards]
        self.optimizer = self.new_optimizer()  # configured without global_clipnorm: the norm is global here
        self.optimizer.build(self.shards)

    @property
    def ranks(self) -> int:
        """The number of ranks the shards are cut for (as `ShardedOptimizer.ranks`)."""
        return self.levels.ranks

    def owned_variables(self) -> list:
        """Variables never broadcast: the deferred model variables (no storage), the shards and their slots
        (each rank's own; the initialisers agree by seed, restores read each rank's slice)."""
        slots = [s for group in optimizer_slots(self.optimizer).values() for s in group]
        return [*(v for v in self.model.variables if is_deferred(v)), *self.shards, *slots]

    def refresh(self) -> None:
        """Nothing to re-cut: the shards are the only parameter storage (ZeRO 1/2 re-cut theirs here)."""

    def held_elements(self) -> int:
        """Parameter elements this rank stores: its shards and any model variable with storage."""
        own = sum(int(np.prod(s.shape)) for s in self.shards)
        return own + sum(int(np.prod(v.shape)) for v in self.model.variables if not is_deferred(v))

    def gradient_paths(self) -> list[str]:
        """One name per gradient the engine returns (a level's slice), for the NaN/Inf guard's message."""
        return [f"{level.name}/zero3_shard" for level, b in zip(self.model.levels, self.levels.buckets)
                if b is not None]

    # ------------------------------------------------------------------ checkpoints, level by level
    levelwise = True  # trainer/checkpoint.py: saved and restored a level at a time (trainer/checkpoint_zero3.py)

    def full_optimizer(self) -> Any:
        """An optimizer of the configured kind built over the model's (deferred) variables, its slots deferred
        too: it allocates nothing and gives the replicated checkpoint's object graph (cached)."""
        if getattr(self, "_full", None) is None:
            self._full = self.new_optimizer()
            # Keras' TensorFlow optimizer keys a variable by its tf.Variable, which a deferred one lacks; this
            # optimizer never applies anything, so any unique key does.
            self._full._var_key = id
            with keras.StatelessScope(initialize_variables=False):
                self._full.build(self.model.trainable_variables)
            global_state.set_global_attribute("uninitialized_variables", [])
        return self._full

    def full_slots(self) -> dict[str, list]:
        """`full_optimizer()`'s slot lists by name, one (deferred) entry per model variable."""
        return optimizer_slots(self.full_optimizer())

    def level_count(self) -> int:
        return len(self.levels.level_vars)

    def gather_level(self, i: int) -> list[tuple[Any, dict[str | None, tf.Tensor]]]:
        """Every rank: level i whole, as (model variable, {None: its value, slot name: the slot's value}), one
        all-gather of its parameter bucket and one per slot kind. Empty for a level without parameters."""
        bucket = self.levels.buckets[i]
        if bucket is None:
            return []
        k = self.position[i]
        out = [(self.levels.level_vars[i][p.index], {None: t}) for p, t in zip(bucket.pieces, self.levels.gather(i))]
        for name, slots in optimizer_slots(self.optimizer).items():
            whole = self.hvd.allgather(slots[k].value, name=f"zero3_save_{name}_{i}")
            for (p, (_, parts)) in zip(bucket.pieces, out):
                parts[name] = tf.reshape(whole[p.offset:p.offset + p.size], self.levels.level_vars[i][p.index].shape)
        return out

    def load_level(self, i: int, read: Callable[[Any, str | None], np.ndarray]) -> None:
        """Take this rank's slice of level i's parameters and slots from `read(variable, slot name or None)`
        (whole tensors from a checkpoint, read one at a time; at most one level is whole at once)."""
        bucket = self.levels.buckets[i]
        if bucket is None:
            return
        variables, k = self.levels.level_vars[i], self.position[i]
        start, stop = bucket.owned(self.hvd.rank())
        targets = {None: self.shards[k], **{n: s[k] for n, s in optimizer_slots(self.optimizer).items()}}
        for name, target in targets.items():
            flat = flatten_bucket([read(v, name) for v in variables], bucket)
            target.assign(np.array(flat[start:stop], copy=True))

    # ---------------------------------------------------------------- elastic Horovod (re-sharding)
    # As ZeRO 1/2 (trainer/strategy/zero.py): an elastic commit keeps the whole state in every rank's host
    # memory, gathered level by level (a lost rank takes its slices, here of the parameters too, with it).
    def host_copy(self) -> dict[str, np.ndarray]:
        """Every rank: parameters and optimizer state whole, in host memory: {`host_key(slot or None, variable
        index)`: array, "iterations": array}, indices into `model.trainable_variables`."""
        index = self._variable_index()
        out = {"iterations": np.asarray(self.optimizer.iterations.numpy())}
        for i in range(self.level_count()):
            for variable, parts in self.gather_level(i):
                out.update({host_key(name, index[id(variable)]): t.numpy() for name, t in parts.items()})
        return out

    def host_shapes(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """The keys of `host_copy` with each array's (shape, dtype): what a worker that joins receives."""
        return host_shapes_of([None, *optimizer_slots(self.optimizer)], self.model.trainable_variables)

    def reshard(self, host: dict[str, np.ndarray]) -> None:
        """For the current number of ranks: new level buckets and shards, a new optimizer (the run's), this
        rank's slices of `host` (a `host_copy`) loaded level by level."""
        self._plan(ShardedLevels(self.hvd, self.model, initialize=False))
        index = self._variable_index()
        for i in range(self.level_count()):
            self.load_level(i, lambda variable, name: host[host_key(name, index[id(variable)])])
        self.optimizer.iterations.assign(host["iterations"])

    def _variable_index(self) -> dict[int, int]:
        return {id(v): k for k, v in enumerate(self.model.trainable_variables)}

    def gathered_weights(self):
        """Every parameter, whole, level by level (a generator: at most one level at a time; every rank)."""
        for i in range(self.level_count()):
            if self.levels.buckets[i] is not None:
                yield from (t.numpy() for t in self.levels.gather(i))

    def __call__(self, grads: list, ok: tf.Tensor) -> None:
        """Clip this rank's slices by the global norm, then apply them to its shards (all ranks, or none)."""
        scale = None if self.clip_norm is None else self.levels.clip_scale(grads, self.clip_norm)
        tf.cond(ok, lambda: apply_in_order(self.optimizer, grads, self.shards, scale), lambda: None)


class Zero3Engine:
    """The GradientEngine of a ZeRO-3 replica (trainer/strategy/engine.py): the replica's batch in
    `grad_accum` micro-steps through `ShardedLevels.loss_and_grads`; the gradients are this rank's
    reduce-scattered slices (already summed over the ranks), one per level with parameters, summed over
    the micro-steps. `forward` is evaluation's level-by-level forward."""

    reported: tuple[str, ...] = ()

    def __init__(self, state: Zero3State, task: Any, *, global_batch: int, grad_accum: int = 1) -> None:
        self.state, self.task = state, task
        self.global_batch, self.grad_accum = global_batch, grad_accum
        self.specs = dict(state.model.input_specs)

    @property
    def levels(self) -> ShardedLevels:
        return self.state.levels  # (replaced when an elastic job re-shards)

    def _inputs(self, batch: dict) -> dict:
        inputs = self.task.model_inputs(batch)
        return {k: tf.cast(inputs[k], spec.dtype) for k, spec in self.specs.items()}  # as LevelModel.call

    def gradients(self, batch: dict) -> tuple[tf.Tensor, list, dict[str, tf.Tensor]]:
        micro = tf.shape(next(iter(batch.values())))[0] // self.grad_accum
        grads, loss = None, tf.constant(0.0)
        for i in range(self.grad_accum):  # unrolled; each micro-step reduce-scatters its own slices
            part = {k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}
            part_loss, got = self.levels.loss_and_grads(
                self._inputs(part),
                lambda out, part=part: tf.reduce_sum(self.task.per_example_loss(part, out)) / self.global_batch)
            got = [g for g in got if g is not None]
            grads = got if grads is None else [a + b for a, b in zip(grads, got)]
            loss += part_loss
        return loss, grads, {}

    def forward(self, inputs: dict) -> dict:
        """The model's outputs for `inputs` (a task's model inputs), level by level (collectives inside:
        every rank must call it the same number of times)."""
        return self.levels.forward({k: tf.cast(inputs[k], spec.dtype) for k, spec in self.specs.items()})

    def logs(self, outputs: dict, replicas: int) -> dict[str, float]:
        return {}


def _none(_result: Any) -> None:
    return None


def apply_in_order(optimizer: Any, grads: list, variables: list, scale: tf.Tensor | None = None) -> None:
    """`optimizer.apply_gradients(zip(g * scale, variables))`, one variable (a level's shard) after another
    where that is the same update (a plain Keras optimizer, `_applies_level_by_level`). Unordered, TensorFlow
    runs every level's update at once, and the clipped copies and Adam's temporaries of all levels (several
    times the gradients' bytes) coexist. Each gradient is scaled inside its link of the chain; the step
    counter advances once, after the last variable, as in `apply`."""
    if not _applies_level_by_level(optimizer):  # e.g. a LossScaleOptimizer: one apply, unordered
        return _none(optimizer.apply_gradients(zip([g if scale is None else g * scale for g in grads], variables)))
    done: list = []
    for k, (grad, variable) in enumerate(zip(grads, variables)):
        # every op of this link waits for the previous variable's update
        with tf.name_scope(f"level_update_{k}"), tf.control_dependencies(done):
            optimizer._backend_apply_gradients([grad if scale is None else grad * scale], [variable])
            # A read of the variable after its update (automatic control dependencies order it after its
            # assignments, which read the updated moments): the end of this link.
            done = [tf.identity(variable.value)]
    with tf.control_dependencies(done):
        optimizer.iterations.assign_add(1)
    return None


def _applies_level_by_level(optimizer: Any) -> bool:
    """True when `optimizer.apply(grads, variables)` is Keras' own: `_backend_apply_gradients` (weight decay
    and update, each variable on its own) then the step counter, with nothing that couples the variables
    (a loss scale, EMA, gradient accumulation, a global clip norm). Then applying it a level at a time and
    counting the step once is the same update (`apply_in_order`)."""
    base = keras.optimizers.Optimizer
    return (type(optimizer).apply is base.apply
            and type(optimizer)._backend_apply_gradients is base._backend_apply_gradients
            and not getattr(optimizer, "gradient_accumulation_steps", None) and not getattr(optimizer, "use_ema", False)
            and getattr(optimizer, "loss_scale_factor", None) is None
            and getattr(optimizer, "global_clipnorm", None) is None)
