"""Speech-to-text encoder-decoder models (Whisper): calibrated on audio clips with the teacher's transcripts,
scored by perplexity of the teacher's transcripts of held-out clips and word error rate (tasks/speech.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..config import CalibrationConfig, RunConfig
from ..data.calibration import CalibrationData
from ..errors import ConfigError
from ..metrics.record import EvalRecord
from .base import Task
from .speech import (
    SAMPLING_RATE,
    SYNTHETIC_AUDIO_WARNING,
    SYNTHETIC_SOURCES,
    Reference,
    clip_features,
    reference_transcripts,
    speech_calibration,
    speech_metrics,
    text_normalizer,
    to_mono,
    transcribe,
    transcribed_clips,
    transcript_prompt,
    transcription_scores,
)

FEATURES = "input_features"
# Whisper's encoder halves the audio frames (a stride-2 convolution) before its blocks see them.
ENCODER_FRAME_STRIDE = 2
STANDALONE_NEEDS = ("scoring a speech model needs recorded speech with its true texts: --eval-audio FOLDER of .wav or "
                    ".flac clips, each with a .txt transcript of the same name")


@dataclass
class TrueTexts:
    """Held-out clips for a model scored alone: features [n, mel bins, frames], true texts, transcript length."""

    features: torch.Tensor
    texts: list[str]
    length: int


class SpeechSeq2Seq(Task):
    name = "speech-seq2seq"
    description = "speech to text (encoder + decoder)"
    auto_class = "AutoModelForSpeechSeq2Seq"
    auto_mapping = "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING"
    speed_batches = ()  # transcription speed is measured with the word error rate
    chats, transcribes = False, True
    load_note = ("a speech model: it calibrates on audio clips (built-in: synthetic speech-like clips; or a .wav/.flac "
                 "file or folder) with the teacher's transcripts; sequence length = transcript tokens")

    def load_preprocessor(self, source: str, **kwargs):
        from transformers import AutoFeatureExtractor

        return AutoFeatureExtractor.from_pretrained(source, **kwargs)

    def calibration_warnings(self, config: CalibrationConfig) -> list[str]:
        return [SYNTHETIC_AUDIO_WARNING] if config.source in SYNTHETIC_SOURCES else []

    def calibrate(self, loaded, config: CalibrationConfig) -> CalibrationData:
        """ceil(tokens / seq_len) clips, each with the teacher's transcript (its length checked there)."""
        return speech_calibration(loaded.model, loaded.tokenizer, loaded.feature_extractor, config)

    def preview(self, loaded, config: CalibrationConfig) -> str:
        """Count the clips and show the teacher's first transcripts."""
        data = self.calibrate(loaded, config)
        prompt = len(transcript_prompt(loaded.model, loaded.tokenizer))
        shown = "\n\n".join(f"> {loaded.tokenizer.decode(row[prompt:], skip_special_tokens=True).strip()[:300]}"
                             for row in data.sequences[:3].tolist())
        synthetic = config.source in SYNTHETIC_SOURCES
        where = "synthetic speech-like clips" if synthetic else config.source
        warning = f"\n\n⚠ {SYNTHETIC_AUDIO_WARNING}." if synthetic else ""
        return (f"**{data.sequences.shape[0]} audio clips × {config.seq_len} transcript tokens = {data.tokens:,} "
                f"tokens** from {where}. The teacher's transcripts of the first clips:\n\n{shown}{warning}")

    def held_out(self, loaded, config: RunConfig, standalone: bool = False) -> Reference | TrueTexts:
        """The teacher's transcripts of held-out clips (`config.eval.audio`); alone, a model has no teacher, so
        it is scored against true texts only, and the audio must have them (else ConfigError)."""
        if not standalone:
            return reference_transcripts(loaded.model, loaded.tokenizer, loaded.feature_extractor,
                                         config.calibration, config.eval.audio)
        if config.eval.audio in SYNTHETIC_SOURCES:
            raise ConfigError(STANDALONE_NEEDS)
        clips, texts = transcribed_clips(config.eval.audio)
        if texts is None:
            raise ConfigError(f"{config.eval.audio}: no transcripts beside the clips; {STANDALONE_NEEDS}")
        longest = getattr(loaded.model.config, "max_target_positions", CalibrationConfig.seq_len)
        return TrueTexts(clip_features(loaded.feature_extractor, clips), texts,
                         min(CalibrationConfig.seq_len, longest))

    def eval_batch_size(self, config: RunConfig) -> int:
        return config.calibration.batch_size

    def score(self, model: nn.Module, tokenizer, held_out: Reference | TrueTexts, batch_size: int) -> EvalRecord:
        if isinstance(held_out, TrueTexts):
            normalizer = text_normalizer(tokenizer)
            result = transcription_scores(model, tokenizer, held_out.features, transcript_prompt(model, tokenizer),
                                          held_out.length, [normalizer(t) for t in held_out.texts], normalizer)
            return EvalRecord(wer=result["wer"], wer_scorer=result["wer_scorer"], clips=result["clips"],
                              transcribe_tokens_per_s=result["transcribe_tokens_per_s"])
        result = speech_metrics(model, held_out, tokenizer, batch_size)
        return EvalRecord(perplexity=result["perplexity"], nll=result["nll"], tokens_scored=result["tokens_scored"],
                          wer=result["wer"], wer_reference=held_out.kind, wer_scorer=result["wer_scorer"],
                          clips=result["clips"],
                          transcribe_tokens_per_s=result["transcribe_tokens_per_s"])

    def transcribe(self, loaded, model: nn.Module, samples: np.ndarray, rate: int, max_tokens: int = 128) -> dict:
        """One clip (samples at `rate` Hz, any channels) transcribed by `model` with `loaded`'s preprocessors."""
        audio = to_mono(samples, rate, getattr(loaded.feature_extractor, "sampling_rate", SAMPLING_RATE))
        return transcribe(model, loaded.tokenizer, loaded.feature_extractor, audio, max_tokens)

    def activation_positions(self, calibration: CalibrationData) -> int:
        frames = calibration.inputs[FEATURES].shape[-1] // ENCODER_FRAME_STRIDE
        return max(calibration.sequences.shape[1], frames)

    @torch.no_grad()
    def student_encoder_states(self, student: nn.Module, calibration: CalibrationData, batches: list[slice],
                               store, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        if not hasattr(student, "get_encoder"):
            return None
        encoder, states = student.get_encoder(), None
        for rows in batches:
            if rows.stop == rows.start:
                continue
            features = calibration.inputs[FEATURES][rows].to(device, dtype)
            out = encoder(input_features=features).last_hidden_state
            if states is None:
                states = store.empty((calibration.sequences.shape[0], *out.shape[1:]), out.dtype)
            states[rows] = out.to(states.device)
        return states
