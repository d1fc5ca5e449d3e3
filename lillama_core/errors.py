"""Exceptions a user can cause. Each carries one sentence that the CLI and the app show as is."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, for a one-line error built on a library's error.

    Args:
        exc: any exception; its message may be empty or span many lines.

    Returns:
        That line, stripped, or the exception's type name when the message has no text.
    """
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


class LillamaError(Exception):
    """Base for every error caused by user input or the environment, never by a bug in the engine."""


class ConfigError(LillamaError):
    """A setting is out of range, of the wrong type, or unknown."""


class ModelLoadError(LillamaError):
    """The model could not be found, downloaded or understood."""


class CalibrationError(LillamaError):
    """The calibration source is missing, empty or unreadable."""


class RankPlanError(LillamaError):
    """A rank plan does not fit the model it is applied to."""


class ExportError(LillamaError):
    """A checkpoint could not be written or read back."""


class OutOfMemoryError(LillamaError):
    """The accelerator ran out of memory; the message says what to lower."""


class RunStopped(LillamaError):
    """A stop was requested; the layers finished so far are kept."""


class JobBusyError(LillamaError):
    """A second job was started on a device that already runs one."""


class NonFiniteError(LillamaError):
    """A weight or an activation is inf or NaN (float16 overflow, a broken checkpoint); the message names where."""

class ModelForwardError(LillamaError):
    """The model's own code (or a step around it) raised inside a stage of a run. The message is one line
    naming the stage, layer and model class; the full traceback travels with it (see failures.py)."""

    def __init__(self, summary: str, traceback_text: str, stage: str, layer: int | None, model_class: str):
        super().__init__(summary)
        self.traceback_text, self.stage, self.layer, self.model_class = traceback_text, stage, layer, model_class
        self.traceback_file = None  # set once the traceback is written to disk

    def __str__(self) -> str:
        kept = f" (full traceback in {self.traceback_file})" if self.traceback_file else ""
        return f"{self.args[0]}{kept}"
