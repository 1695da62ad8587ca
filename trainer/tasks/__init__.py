"""Workloads by model kind: which task a model kind learns and which function builds it.

A new workload is one task module (trainer/tasks/), one model module (trainer/models/, plus its config
section in trainer/config.py) and one line in WORKLOADS. Nothing else compares task or model-kind names:
everything asks the task object (trainer/tasks/base.py) instead.

Importing this package does not import TensorFlow (config validation reads the tasks' metric names); the
model builders are imported when a model is built.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from trainer.tasks.base import Task
from trainer.tasks.classification import ClassificationTask
from trainer.tasks.lm import LanguageModelTask
from trainer.tasks.summarization import SummarizationTask


@dataclass(frozen=True)
class Workload:
    task: Task
    builder: str  # "module:function" building the model's LevelModel (imports TensorFlow)

    def build_fn(self) -> Callable:
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)


CLASSIFICATION, SUMMARIZATION, LANGUAGE_MODELING = ClassificationTask(), SummarizationTask(), LanguageModelTask()
WORKLOADS: dict[str, Workload] = {
    "classifier": Workload(CLASSIFICATION, "trainer.models.classifier:build_classifier"),
    "summarizer": Workload(SUMMARIZATION, "trainer.models.summarizer:build_summarizer"),
    "transformer": Workload(SUMMARIZATION, "trainer.models.transformer:build_transformer"),
    "lm": Workload(LANGUAGE_MODELING, "trainer.models.lm:build_lm"),
}
TASKS: dict[str, Task] = {w.task.name: w.task for w in WORKLOADS.values()}


def workload(kind: str) -> Workload:
    """The workload of model kind `kind`; ValueError naming the known kinds otherwise."""
    if kind not in WORKLOADS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(WORKLOADS)}")
    return WORKLOADS[kind]


def task_for(kind: str) -> Task:
    """The task model kind `kind` learns."""
    return workload(kind).task


def build_model(cfg_model: Any, *, vocab_size: int, max_len: int, summary_len: int, num_classes: int = 2):
    """The (unbuilt) `LevelModel` for a `cfg.model` section: its kind's builder, given the sizes its task says
    it takes. Variables are created under the global Keras dtype policy at the first call: set mixed
    precision before calling this, and build it inside the distribution scope. `num_classes` (labelled
    tasks only) comes from the training labels (trainer/data/splits.py `LabelSet`)."""
    work = workload(cfg_model.kind)  # ValueError naming the known kinds
    dims = work.task.model_dims(max_len=max_len, summary_len=summary_len, num_classes=num_classes)
    return work.build_fn()(cfg_model, vocab_size=vocab_size, **dims)


def resolve(task: str | Task) -> Task:
    """A task given as itself or by name (`"classification"`); ValueError for an unknown name."""
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {tuple(TASKS)}")
    return TASKS[task]


__all__ = ["CLASSIFICATION", "LANGUAGE_MODELING", "SUMMARIZATION", "TASKS", "WORKLOADS", "Task", "Workload",
           "build_model", "resolve",
           "task_for", "workload"]
