"""`strata plan`: what a job will do, before it spends GPU hours.

Prints ranks -> hosts -> devices -> stages -> levels, parameters and estimated activation memory per
stage, the micro-batch schedule, the theoretical bubble, global / per-replica / micro-batch sizes and
warnings. `--dry-run` also measures every level, chooses the `auto` split, builds the pipelined model
on this machine's devices and runs one forward/backward step (no optimizer update, nothing written).
"""
from __future__ import annotations

import time

import numpy as np

from trainer.config import ExperimentConfig
from trainer.errors import ConfigError
from trainer.parallel.layout import Layout, LayoutError, layout_for, stage_device_names
from trainer.parallel.report import format_report
from trainer.parallel.units import count, nbytes
from trainer.parallel.zero import ModelShape, format_zero_report, parse_memory, rank_bytes


def parse_ranks(text: str) -> list[tuple[str, int]]:
    """`host:local_rank,...` (from the launcher) -> [(host, local_rank), ...] in rank order."""
    out = []
    for item in text.split(","):
        host, _, local = item.rpartition(":")
        if not host or not local.isdigit():
            raise ConfigError(f"--ranks {text!r}: expected host:local_rank entries, e.g. localhost:0,localhost:1")
        out.append((host, int(local)))
    return out


def device_label(pipe, stage: int, local_rank: int, gpus_here: int) -> str:
    """The device a rank's stage will use: explicit, the local rank's block of GPUs, or a logical CPU."""
    name = stage_device_names(pipe.stages, local_rank, gpus_here, pipe.devices)[stage]
    return name if pipe.devices is not None or gpus_here else f"{name} (logical)"


def run_plan(cfg: ExperimentConfig, ranks: list[tuple[str, int]], *, dry_run: bool,
             device_memory: str | None = None) -> int:
    """Print the plan; with `dry_run`, measure and run one pipelined step. Raises ConfigError if it cannot run
    (with `device_memory`, e.g. `80GB`: if the run's training state and activations do not fit in it)."""
    try:
        layout = layout_for(cfg, len(ranks), "-np ({n})")
        memory = parse_memory(device_memory) if device_memory is not None else None
    except (LayoutError, ValueError) as err:
        raise ConfigError(f"{cfg.name}: {err}") from None
    from trainer.data.splits import load_splits

    splits = load_splits(cfg.data, cfg.task)
    import tensorflow as tf

    from trainer.strategy.pipeline.devices import split_cpu_for_stages

    pipe = cfg.distribution.pipeline
    if pipe is not None and pipe.devices is None:
        split_cpu_for_stages(pipe.stages)
    gpus_here = len(tf.config.list_physical_devices("GPU"))
    _print_ranks(cfg, layout, ranks, gpus_here)
    size = model_size(cfg)
    if size:
        print(size)
    if pipe is None:
        print("no pipeline (distribution.pipeline is not set): every replica holds the whole model")
        _print_zero(cfg, layout, splits, memory, device_memory)
        return 0
    _print_pipeline(cfg, layout, splits, gpus_here, dry_run=dry_run)
    return 0


def model_size(cfg: ExperimentConfig) -> str | None:
    """The model's parameter count and the float32 bytes of its weights, gradients and Adam moments, for
    models that count their parameters without being built (the lm kind, on prepared data)."""
    count = getattr(cfg.model, "parameter_count", None)
    if count is None or cfg.data.source != "prepared":
        return None
    from trainer.data.shards import read_index

    n = count(int(read_index(cfg.data.prepared_path)["vocab_size"]), cfg.data.seq_len)
    size = f"{n / 1e9:.2f} billion" if n >= 1e9 else f"{n / 1e6:.1f} million"
    memory = f"{16 * n / 2**30:.1f} GiB" if 16 * n >= 2**30 else f"{16 * n / 2**20:.1f} MiB"
    return (f"model: {cfg.model.kind}, {n:,} parameters ({size}); weights, gradients and Adam moments in float32: "
            f"{memory} per replica")


def _print_ranks(cfg: ExperimentConfig, layout: Layout, ranks: list[tuple[str, int]], gpus_here: int) -> None:
    """The header (replicas x stages, batch sizes) and one line per rank: host, local rank, device(s)."""
    pipe, replicas, stages = cfg.distribution.pipeline, layout.data_parallel, layout.pipeline_stages
    print(f"strata plan: {cfg.name} ({cfg.model.kind}) | {replicas} replica(s) x {stages} stage(s) = "
          f"{layout.devices} device(s) | global batch {layout.global_batch} = {replicas} x "
          f"{layout.per_replica_batch} per replica" + (f", micro-batch {layout.micro_batch_size}" if pipe else ""))
    print("ranks:")
    for rank, (host, local) in enumerate(ranks):
        if pipe is None:
            device = f"/gpu:{local}" if gpus_here else "/cpu:0"
            print(f"  rank {rank}  host {host}  local rank {local}  device {device}")
        else:
            shown = ", ".join(f"stage {s} {device_label(pipe, s, local, gpus_here)}" for s in range(stages))
            print(f"  rank {rank}  host {host}  local rank {local}  {shown}")


def _print_zero(cfg: ExperimentConfig, layout: Layout, splits, memory: float | None, asked: str | None) -> None:
    """The per-rank memory of zero 0..3 (trainer/parallel/zero.py), measured on the built model's levels;
    refuses (ConfigError) a run whose chosen stage does not fit in `memory`."""
    from trainer.experiment import configure_runtime

    configure_runtime(cfg)
    shape = _model_shape(cfg, layout, splits)
    slots = {"sgd": 1 if cfg.optimizer.momentum else 0}.get(cfg.optimizer.name, 2)
    zero = cfg.distribution.zero
    print(format_zero_report(shape, layout.data_parallel, zero, slots=slots, memory=memory,
                             depth_of=" and ".join(_depth_fields(cfg))))
    if memory is not None:
        state, activations = rank_bytes(shape, layout.data_parallel, zero, slots=slots)
        if state.total + activations > memory:
            fits = [z for z in range(4) if _total(rank_bytes(shape, layout.data_parallel, z, slots=slots)) <= memory]
            fix = f"use distribution.zero={fits[0]}" if fits else "use more ranks or a smaller model"
            if zero == 3 and shape.level_bytes() > memory:  # more ranks cannot help: a level is whole while it runs
                fix = (f"its largest level, {shape.largest_level} ({count(shape.largest_level_params)} parameters), "
                       f"needs {nbytes(shape.level_bytes())} whole while it runs under zero 3; split it into more "
                       "levels or use a pipeline")
            raise ConfigError(
                f"{cfg.name}: needs {nbytes(state.total + activations)} per rank with distribution.zero={zero} over "
                f"{layout.data_parallel} rank(s): does not fit in {asked} (--device-memory); {fix}")


def _model_shape(cfg: ExperimentConfig, layout: Layout, splits) -> ModelShape:
    """Parameters and (traced, upper-bound) activation bytes of the model's fixed levels and repeated blocks.
    A model that counts its own parameters (lm, on prepared data) is built with ONE block at its real width,
    vocabulary and sequence length, and its blocks are scaled by depth: the plan of a 1B model must not need
    the memory of one."""
    import numpy as np
    import tensorflow as tf

    from trainer.data.splits import encode_splits, training_texts
    from trainer.data.tokenizer import Vocabulary
    from trainer.strategy.pipeline import profile
    from trainer.tasks import build_model

    depth, rows, per_row = 1, layout.micro_batch_size, 1
    if getattr(cfg.model, "parameter_count", None) is not None and cfg.data.source == "prepared":
        from trainer.data.shards import read_index

        vocab_size, depth = int(read_index(cfg.data.prepared_path)["vocab_size"]), cfg.model.layers
        model = build_model(cfg.model.model_copy(update={"layers": 1}), vocab_size=vocab_size,
                            max_len=cfg.data.model_len, summary_len=cfg.data.summary_len)
        # Building runs the levels once: one row, its activations scaled to the micro-batch (they are per row).
        arrays = {"tokens": np.zeros((1, cfg.data.model_len), np.int32)}
        rows, per_row = 1, layout.micro_batch_size
    else:
        vocab = Vocabulary.build(training_texts(splits, cfg.task), cfg.data.vocab_size)
        arrays = encode_splits(splits, vocab, cfg.data, cfg.task)["train"]
        model = build_model(cfg.model, vocab_size=vocab.size, max_len=cfg.data.max_len,
                            summary_len=cfg.data.summary_len,
                            num_classes=splits.labels.num_classes if splits.labels else 2)
    costs = profile.static_costs(model, {k: tf.constant(v[:rows]) for k, v in arrays.items()})
    blocks = [c for c in costs if "_block_" in c.name or c.name.startswith(("encoder_", "block_"))]  # repeated
    fixed = [c for c in costs if c not in blocks]
    largest = max(costs, key=lambda c: c.params)
    return ModelShape(sum(c.params for c in fixed), depth * sum(c.params for c in blocks),
                      per_row * sum(c.activation_bytes for c in fixed),
                      per_row * depth * sum(c.activation_bytes for c in blocks),
                      fixed_inputs=per_row * sum(c.input_bytes for c in fixed),
                      block_inputs=per_row * depth * sum(c.input_bytes for c in blocks),
                      largest_level=largest.name, largest_level_params=largest.params,
                      largest_level_activations=per_row * max(c.activation_bytes for c in costs))


def _depth_fields(cfg: ExperimentConfig) -> list[str]:
    return [f for f in ("encoder_layers", "decoder_layers", "layers") if hasattr(cfg.model, f)]


def _total(bytes_and_activations) -> float:
    state, activations = bytes_and_activations
    return state.total + activations


def _print_pipeline(cfg: ExperimentConfig, layout: Layout, splits, gpus_here: int, *, dry_run: bool) -> None:
    """Stages, levels, memory and schedule of the first replica; `dry_run`: measured, with one step run."""
    import tensorflow as tf

    from trainer.data.splits import encode_splits
    from trainer.experiment import configure_runtime, model_len, new_vocabulary
    from trainer.tasks import build_model
    from trainer.strategy.pipeline import devices as pd, profile, setup

    pipe = cfg.distribution.pipeline
    configure_runtime(cfg)
    if cfg.data.source == "prepared":  # the first batch's rows of the token stream, the data's tokenizer
        from trainer.data.prepared import PreparedInput

        prepared = PreparedInput(cfg.data, seed=cfg.seed)
        arrays, vocab_size = prepared.example_arrays(), prepared.data.vocab_size
    else:
        vocab = new_vocabulary(cfg, splits)
        arrays, vocab_size = encode_splits(splits, vocab, cfg.data, cfg.task)["train"], vocab.size

    def new_model():
        return build_model(cfg.model, vocab_size=vocab_size, max_len=model_len(cfg), summary_len=cfg.data.summary_len,
                           num_classes=splits.labels.num_classes if splits.labels else 2)

    devices = pd.stage_devices(pipe, 0)
    example = {k: tf.constant(v[:layout.micro_batch_size]) for k, v in arrays.items()}
    memory = pd.device_memory_bytes(pipe, devices)
    names = cfg.model.level_names()
    if dry_run:
        costs = profile.profile_levels(new_model(), example, cfg.task, devices[0], repeats=pipe.profile_steps)
        print(profile.describe_costs(costs))
    else:
        costs = profile.static_costs(new_model(), example)  # parameters and activation estimates, no timing
    if pipe.partition == "auto" and not dry_run:
        print("partition: auto - chosen from measured level times at the start of training "
              "(--dry-run measures them now); shown: the split balancing parameters")
        partition = profile.balanced_by_params(costs, pipe.stages)
    else:
        partition = setup.choose_partition(cfg, names, costs if dry_run else None, memory)
    labels = [device_label(pipe, s, 0, gpus_here) for s in range(pipe.stages)]
    print(format_report(setup.make_report(cfg, names, partition, labels, layout.data_parallel, costs, memory,
                                       timed=dry_run)))
    if dry_run:
        _dry_run_step(cfg, new_model, partition, devices, arrays, layout.per_replica_batch)


def _dry_run_step(cfg, new_model, partition, devices, arrays, per_replica) -> None:
    """Build the pipelined model and time one forward/backward step (traced, then run twice)."""
    import keras
    import tensorflow as tf

    from trainer.strategy.pipeline import PipelineEngine

    pipe = cfg.distribution.pipeline
    keras.utils.set_random_seed(cfg.seed)
    model = new_model()
    engine = PipelineEngine(model, cfg.task, partition, devices, micro_batches=pipe.micro_batches,
                            schedule=pipe.schedule, recompute=pipe.recompute, global_batch=cfg.data.batch_size)
    engine.build(cfg.task.model_inputs({k: v[:2] for k, v in arrays.items()}))
    batch = {k: tf.constant(v[:per_replica]) for k, v in arrays.items()}
    step = tf.function(engine.gradients)
    began = time.perf_counter()
    loss, _, timing = step(batch)
    traced = time.perf_counter() - began
    began = time.perf_counter()
    loss, _, timing = step(batch)
    ran = time.perf_counter() - began
    busy = np.asarray(timing["stage_busy_s"])
    span = float(timing["step_span_s"])
    stages = ", ".join(f"stage {s} {1e3 * t:.1f} ms busy / {1 - t / span:.0%} idle" for s, t in enumerate(busy))
    print(f"dry run: one pipelined step (forward+backward, no update) traced+ran in {traced:.1f} s, then ran in "
          f"{1e3 * ran:.1f} ms; loss {float(loss):.4f}; {stages}")
