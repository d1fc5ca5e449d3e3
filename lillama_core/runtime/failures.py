"""Stages of a run turn anything a model's forward raises into one clear `ModelForwardError`.

A model's own code (remote code, an architecture we do not know, a shape it cannot take) can raise anything
from deep inside a forward pass. The user needs one line saying where (stage, layer, model class); the full
traceback goes to a file for the bug report. Errors the user can already act on pass through untouched.
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from ..errors import LillamaError, ModelForwardError

TRACEBACK_FILE = "traceback.txt"
# Out of memory has its own advice (engine.out_of_memory); the others already say what to do.
PASSED_THROUGH = (LillamaError, torch.OutOfMemoryError, MemoryError)


@dataclass
class Where:
    """The layer a stage is working on, updated as it moves, for failures the traceback cannot place."""

    layer: int | None = None


def _modules_in(tb) -> list[nn.Module]:
    """The modules whose methods are on the traceback, outermost first."""
    found = []
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module):
            found.append(owner)
        tb = tb.tb_next
    return found


def _failing_layer(modules: list[nn.Module], models: list[nn.Module]) -> int | None:
    """Index of the innermost block on the traceback, among the blocks of any of `models`."""
    from ..modeling.discovery import find_blocks

    index = {id(block.module): block.index for model in models for block in find_blocks(model)}
    return next((index[id(m)] for m in reversed(modules) if id(m) in index), None)


def forward_error(exc: BaseException, name: str, model: nn.Module | None, where: Where) -> ModelForwardError:
    """The one-line error for `exc` raised during stage `name`; the layer is the innermost block on the
    traceback (of `model`, or of the outermost module there), else the one the stage last reported."""
    modules = _modules_in(exc.__traceback__)
    models = [m for m in (model, modules[0] if modules else None) if m is not None]
    layer = _failing_layer(modules, models)
    layer = where.layer if layer is None else layer
    model_class = type(models[0]).__name__ if models else "the model"
    place = f"at layer {layer}" if layer is not None else "outside its layers"
    detail = " ".join(str(exc).split()) or "(no message)"
    summary = f"{name} failed in {model_class} {place}: {type(exc).__name__}: {detail}"
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return ModelForwardError(summary, text, name, layer, model_class)


@contextlib.contextmanager
def stage(name: str, model: nn.Module | None = None, layer: int | None = None):
    """Run a stage ("capture", "planning", "distillation", "evaluation", ...): any exception raised inside
    that is not a user error becomes a `ModelForwardError`. Yields a `Where` whose `layer` the stage may
    update as it moves on. Also usable as a decorator (then the model is found on the traceback)."""
    where = Where(layer)
    try:
        yield where
    except PASSED_THROUGH:
        raise
    except Exception as exc:
        raise forward_error(exc, name, model, where) from exc


def keep_traceback(error: ModelForwardError, folder: Path | None = None) -> Path:
    """Write the error's traceback to `folder`/traceback.txt (a run folder), or without a folder to a new
    one under $LILLAMA_HOME/errors; the error's message then says where it is."""
    from .paths import lillama_home

    if folder is None:
        folder = lillama_home() / "errors" / f"{datetime.now():%Y-%m-%d_%H%M%S_%f}_{error.stage}"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / TRACEBACK_FILE
    path.write_text(error.traceback_text)
    error.traceback_file = path
    return path
