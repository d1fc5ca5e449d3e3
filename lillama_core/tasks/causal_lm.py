"""Causal language models: calibrated on token sequences of text, scored by perplexity of held-out text."""

from __future__ import annotations

import torch
from torch import nn

from ..config import CalibrationConfig, RunConfig
from ..data.calibration import CalibrationData, load_calibration, preview, read_eval_text
from ..data.generated import PROMPT_TOKENS, generated_rows
from ..metrics.perplexity import eval_windows, perplexity
from ..metrics.record import EvalRecord
from ..modeling.positions import check_positions, eval_window
from .base import Task


class CausalLM(Task):
    name = "causal-lm"
    description = "text generation"
    auto_class = "AutoModelForCausalLM"
    auto_mapping = "MODEL_FOR_CAUSAL_LM_MAPPING"
    teacher_is_perplexity = True

    def check(self, config: RunConfig, model: nn.Module) -> list[str]:
        return check_positions(config, model)

    def eval_notices(self, config: RunConfig, model: nn.Module) -> list[str]:
        notice = eval_window(config.eval.seq_len, model)[1]
        return [notice] if notice else []

    def eval_window(self, config: RunConfig, model: nn.Module) -> int:
        return eval_window(config.eval.seq_len, model)[0]

    def calibrate(self, loaded, config: CalibrationConfig) -> CalibrationData:
        return load_calibration(config, loaded.tokenizer)

    def preview(self, loaded, config: CalibrationConfig) -> str:
        """Count the sequences, warn about chat records the template refused, and show the first records."""
        data = self.calibrate(loaded, config)
        samples = preview(config, loaded.tokenizer, count=3, chars=300)
        shown = "\n\n".join(f"> {s.strip()[:300].replace(chr(10), ' ')}" for s in samples)
        warnings = "".join(f"\n\n⚠ {warning}." for warning in data.warnings)
        rows = generated_rows(data.sequences.shape[0], config.generated)
        generated = (f" When the run starts, the teacher writes {rows} of them after their first {PROMPT_TOKENS} "
                     "tokens." if rows else "")
        return (f"**{data.sequences.shape[0]} sequences × {config.seq_len} tokens = {data.tokens:,} tokens**, "
                f"sampled (seed {config.seed}) from the first {data.pool_tokens:,} tokens read.{generated}"
                f"{warnings}\n\n{shown}")

    def held_out(self, loaded, config: RunConfig, standalone: bool = False) -> torch.Tensor:
        """[n, seq_len] windows of the evaluation text, shortened to the model's positions where needed; the
        same whether or not a teacher is compared."""
        return eval_windows(loaded.tokenizer, read_eval_text(config.eval.text), config.eval.tokens,
                            self.eval_window(config, loaded.model))

    def score(self, model: nn.Module, tokenizer, held_out: torch.Tensor, batch_size: int = 4) -> EvalRecord:
        result = perplexity(model, held_out, batch_size)
        return EvalRecord(perplexity=result.perplexity, nll=result.nll, tokens_scored=result.tokens_scored,
                          eval_seconds=result.seconds)
