"""One adapter per modality (causal language models, speech-to-text): the Auto class, calibration, preview,
evaluation and the wiring each needs. `task_for` picks one from a model's config, as PEFT's auto.py maps a task
type to its model class: a table, not branches. A new modality is one module and one row of TASKS."""

from __future__ import annotations

from .base import Task
from .causal_lm import CausalLM
from .speech_seq2seq import SpeechSeq2Seq

# Checked in order; the last one also takes every config no Auto mapping claims (remote-code models).
TASKS: tuple[Task, ...] = (SpeechSeq2Seq(), CausalLM())
TASKS_BY_NAME = {task.name: task for task in TASKS}


def task_for(model_config) -> Task:
    """The task whose transformers Auto mapping builds this config; causal LM when none does."""
    return next((task for task in TASKS[:-1] if task.handles(model_config)), TASKS[-1])


def auto_class_for(model_config) -> tuple[str, object]:
    """(the transformers Auto class name that builds this config, its config -> model class mapping)."""
    task = task_for(model_config)
    return task.auto_class, task.model_mapping()


__all__ = ["TASKS", "TASKS_BY_NAME", "CausalLM", "SpeechSeq2Seq", "Task", "auto_class_for", "task_for"]
