"""Sequence lengths against the positions a text model was built for, checked before any work.

A model with learned positions (OPT, GPT-2) fails with an IndexError past its table, and a rotary one
degrades silently; either way hours of distillation must not end on it. Calibration sequences are the
data the student learns from, so a length the model cannot take is refused; the evaluation window only
measures, so it is shortened to fit and the user told.
"""

from __future__ import annotations

from torch import nn

from ..config import RunConfig
from ..errors import ConfigError

# Names configs give their position limit; decoders of encoder-decoder models use the last one.
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_target_positions")


def position_limit(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows, or None where it sets no limit (Mamba)."""
    config = getattr(model, "config", None)
    for name in POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def eval_window(seq_len: int, model: nn.Module) -> tuple[int, str]:
    """(the evaluation window that fits the model: `seq_len`, shortened to its positions; a notice saying
    so, empty when nothing was shortened)."""
    limit = position_limit(model)
    if limit is None or seq_len <= limit:
        return seq_len, ""
    return limit, (f"evaluation window shortened from {seq_len} to {limit} tokens, the positions "
                   f"{type(model).__name__} was built for")


def check_positions(config: RunConfig, model: nn.Module) -> list[str]:
    """Refuse (ConfigError) calibration sequences longer than a text model's positions; return a notice for
    each setting shortened to fit (the evaluation window). Speech models check their own transcript length."""
    limit = position_limit(model)
    if limit is not None and config.calibration.seq_len > limit:
        raise ConfigError(f"calibration seq_len {config.calibration.seq_len} is longer than the {limit} positions "
                          f"{type(model).__name__} was built for; use a seq_len of {limit} or less")
    notice = eval_window(config.eval.seq_len, model)[1]
    return [notice] if notice else []
