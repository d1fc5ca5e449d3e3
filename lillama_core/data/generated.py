"""Self-calibration: calibration sequences the teacher writes itself.

Real calibration text samples one domain (the built-in set: Wikipedia articles and instructions); the layers
then fit that domain. Text sampled from the teacher follows the teacher's own distribution, which stands in for
its training data (Williams, Chrysostomou and Aletras, "Self-calibration for Language Model Quantization and
Pruning", NAACL 2025; LLM-QAT's data-free distillation, Liu et al. 2023, samples its data the same way).

Each chosen row keeps its first `PROMPT_TOKENS` tokens of real text, which anchors topic and format (a chat row
stays a chat), and the teacher samples the rest: temperature 1 (the model's own distribution) with nucleus
sampling at `TOP_P`, which cuts the unreliable tail that turns pure sampling into gibberish over hundreds of
tokens (Holtzman et al., "The Curious Case of Neural Text Degeneration", ICLR 2020). An end-of-text token does
not end a row: the teacher goes on to a new document, as in the packed token stream of real calibration text.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import torch
from torch import nn

from ..chat import SamplingConfig, decode
from ..errors import ConfigError, RunStopped
from .calibration import CalibrationData

PROMPT_TOKENS = 8  # real tokens kept at the start of each generated row
TOP_P = 0.95
TEMPERATURE = 1.0
BATCH_ROWS = 32  # rows sampled together
# What else decides the rows besides the model, the data, the share and the seed (a stored entry's key).
SAMPLING_SETTINGS = {"prompt_tokens": PROMPT_TOKENS, "top_p": TOP_P, "temperature": TEMPERATURE,
                     "batch_rows": BATCH_ROWS}

Progress = Callable[[int, int], None]  # (rows written, rows to write)


def generated_rows(rows: int, share: float) -> int:
    """How many of `rows` calibration rows the teacher writes for a generated share in [0, 1].

    Raises:
        ConfigError: a share outside [0, 1].
    """
    if isinstance(share, bool) or not 0.0 <= share <= 1.0:
        raise ConfigError(f"the generated share of calibration data must lie between 0 and 1, not {share!r}")
    return round(rows * share)


@torch.no_grad()
def self_generate(model: nn.Module, data: CalibrationData, share: float, seed: int = 0,
                  on_progress: Progress | None = None, stop: threading.Event | None = None) -> CalibrationData:
    """The calibration data with its first `round(n * share)` rows continued by `model` after their first
    `PROMPT_TOKENS` tokens. The rows were drawn in a seeded random order, so the first rows are a random subset.

    Args:
        model: the teacher (a causal LM), on its device; left in eval mode.
        data: [n, seq_len] token rows (a causal LM's; rows with other inputs cannot be written this way).
        share: the share of rows to replace, in [0, 1].
        seed: seeds the sampling; the same data, share and seed give the same rows.
        on_progress: called with (rows written, rows to write) after each batch.
        stop: when set, generation ends before the next batch with RunStopped.

    Returns:
        A new CalibrationData of the same shape, source and warnings (the input is not changed).

    Raises:
        ConfigError: a share outside [0, 1], rows too short to keep a prompt, or data with other inputs.
        RunStopped: `stop` was set.
    """
    n, seq_len = data.sequences.shape
    count = generated_rows(n, share)
    if count == 0:
        return data
    if data.inputs:
        raise ConfigError("self-generated calibration data is for text models; this model reads "
                          f"{', '.join(sorted(data.inputs))} besides tokens")
    if seq_len <= PROMPT_TOKENS:
        raise ConfigError(f"self-generated calibration needs sequences longer than {PROMPT_TOKENS} tokens, "
                          f"not {seq_len}")
    sampling = SamplingConfig(max_new_tokens=seq_len - PROMPT_TOKENS, temperature=TEMPERATURE, top_p=TOP_P,
                              top_k=0, repetition_penalty=1.0)
    sequences = data.sequences.clone()
    was_training = model.training
    model.eval()
    try:
        for start in range(0, count, BATCH_ROWS):
            if stop is not None and stop.is_set():
                raise RunStopped("stopped by request while the teacher wrote calibration text")
            rows = slice(start, min(start + BATCH_ROWS, count))
            prompt = sequences[rows, :PROMPT_TOKENS]
            columns = list(decode(model, prompt, dataclasses.replace(sampling, seed=seed * 1_000_003 + start)))
            sequences[rows, PROMPT_TOKENS:] = torch.stack(columns, dim=1).cpu()
            if on_progress is not None:
                on_progress(rows.stop, count)
    finally:
        model.train(was_training)
    return CalibrationData(sequences, data.source, data.pool_tokens, sequence_input=data.sequence_input,
                           warnings=list(data.warnings))
