"""Glue shared by the panels: user errors become one clear message, never a traceback."""

from __future__ import annotations

import functools
import inspect
import json

import gradio as gr
import torch

from lillama_core.errors import LillamaError, ModelForwardError
from lillama_core.runtime.failures import keep_traceback


def friendly(exc: BaseException) -> str:
    if isinstance(exc, ModelForwardError) and exc.traceback_file is None:  # a panel's own call: no run folder
        keep_traceback(exc)
    if isinstance(exc, LillamaError):
        return str(exc)
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return "out of memory: lower the token budget, sequence length or batch size"
    return f"{type(exc).__name__}: {exc}"


# torch.OutOfMemoryError is a RuntimeError: without it here an out-of-memory in a panel would surface as a bug.
USER_ERRORS = (LillamaError, MemoryError, torch.OutOfMemoryError, ValueError, OSError)


def user_errors(fn):
    """Show engine errors as a gradio error toast; the app and its state stay as they were."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except USER_ERRORS as exc:
                raise gr.Error(friendly(exc)) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as exc:
            raise gr.Error(friendly(exc)) from None
    return wrapper


def announce_failure(job, seen: tuple) -> None:
    """A warning toast with the job's one-line message when a job this tab last saw running (`seen`: its
    (id, events, status) at the previous poll) has failed since; a reopened page is not toasted again."""
    if job.status == "failed" and seen[0] == job.id and seen[-1] in ("queued", "running"):
        gr.Warning(job.message)


def facts_table(facts: dict) -> str:
    rows = "".join(f"<tr><th>{k.replace('_', ' ')}</th><td>{v}</td></tr>" for k, v in facts.items())
    return f"<table class='facts'>{rows}</table>"


def plot(fig: dict):
    """A figure dict from charts.py, in the form gr.Plot sends to the browser, without go.Figure."""
    from gradio.components.plot import PlotData

    return PlotData(type="plotly", plot=json.dumps(fig))
