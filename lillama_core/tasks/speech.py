"""Speech-to-text models (Whisper): audio calibration clips and the metrics that stand in for perplexity.

A speech model's calibration sequence is an audio clip's features plus decoder tokens. The tokens are
the teacher's own greedy transcript of the clip, so every block sees the activations it sees at
inference. Clips come from audio files (`.wav` or `.flac`, a file or a folder) or, offline and by default, from a
seeded synthesiser of speech-like sounds: voiced harmonics with gliding pitch, formant-like
resonances, syllable envelopes, fricative noise and pauses. Quality is measured on held-out clips: the
student's perplexity of the teacher's transcripts of them, and the word error rate of its own transcripts,
against the clips' true texts where recorded speech comes with them (a .txt beside each clip), else against
the teacher's transcripts (synthetic clips carry no words). Word error rates are corpus rates (jiwer: total
edits over total reference words) of texts put through Whisper's normaliser.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jiwer
import numpy as np
import soundfile
import soxr
import torch
import torch.nn.functional as F
from torch import nn

from ..chat import cache_argument
from ..config import CalibrationConfig
from ..data.calibration import CalibrationData
from ..errors import CalibrationError

SAMPLING_RATE = 16_000
CLIP_SECONDS = (2.0, 6.0)
EVAL_CLIPS = 8
EVAL_SEED_OFFSET = 10_000  # held-out clips never share a seed with calibration clips
SYNTHETIC_SOURCES = ("default", "synthetic")  # calibration sources that mean the built-in synthetic clips
AUDIO_SUFFIXES = (".wav", ".flac")
# Measured on Whisper-base at 20% (README): calibrated on synthetic clips the student transcribed nothing
# usable (word error rate 112%, a per-clip mean of the earlier scorer).
SYNTHETIC_AUDIO_WARNING = ("calibrating a speech model on synthetic clips: enough to try the workflow, not to keep "
                           "the student; give real speech (a .wav or .flac file, or a folder) for a usable one")


def synthetic_clip(seconds: float, rng: np.random.Generator, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """A speech-like clip: syllables of voiced harmonics (gliding pitch, two resonances) or noise, with pauses."""
    samples = int(seconds * sampling_rate)
    clip = np.zeros(samples, dtype=np.float64)
    position = int(rng.uniform(0.05, 0.3) * sampling_rate)
    pitch = rng.uniform(90, 260)  # a speaker's base pitch, Hz
    while position < samples:
        length = min(int(rng.uniform(0.08, 0.35) * sampling_rate), samples - position)
        t = np.arange(length) / sampling_rate
        envelope = np.sin(np.pi * np.arange(length) / max(length - 1, 1)) ** 2
        if rng.random() < 0.75:  # voiced: harmonics of a gliding pitch, weighted by two formant peaks
            glide = pitch * (1 + rng.uniform(-0.15, 0.15) * t / max(t[-1], 1e-3))
            phase = 2 * np.pi * np.cumsum(glide) / sampling_rate
            formants = rng.uniform(300, 900), rng.uniform(900, 2500)
            syllable = np.zeros(length)
            for harmonic in range(1, 30):
                frequency = harmonic * pitch
                if frequency > sampling_rate / 2 - 500:
                    break
                weight = sum(math.exp(-((frequency - f) / 150) ** 2) for f in formants) + 0.05 / harmonic
                syllable += weight * np.sin(harmonic * phase)
        else:  # unvoiced: high-passed noise, like a fricative
            noise = rng.standard_normal(length)
            syllable = np.diff(noise, prepend=0.0)
        syllable *= envelope / (np.abs(syllable).max() + 1e-9)
        clip[position: position + length] += syllable * rng.uniform(0.2, 0.8)
        position += length + int(rng.uniform(0.0, 0.25) * sampling_rate)
    clip += 0.003 * rng.standard_normal(samples)  # room noise
    return clip.astype(np.float32)


def synthetic_clips(count: int, seed: int, seconds: tuple[float, float] = CLIP_SECONDS) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [synthetic_clip(rng.uniform(*seconds), rng) for _ in range(count)]


def read_audio(path: Path, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """An audio file libsndfile reads (WAV of any sample format, FLAC, ...) as mono float32 at `sampling_rate`.

    Raises CalibrationError when the file is missing or unreadable."""
    if not Path(path).is_file():
        raise CalibrationError(f"audio file not found: {path}")
    try:
        audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except soundfile.SoundFileError as exc:
        raise CalibrationError(f"{path}: not a readable audio file ({exc})") from None
    return to_mono(audio, rate, sampling_rate)


def to_mono(audio: np.ndarray, rate: int, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Samples [n] or [n, channels], signed integer PCM or float in [-1, 1], at `rate` Hz, as mono float32
    [m] at `sampling_rate` Hz (soxr's band-limited resampling: nothing above the new Nyquist folds back)."""
    audio = np.asarray(audio)
    samples = audio.astype(np.float64)
    if np.issubdtype(audio.dtype, np.signedinteger):
        samples /= float(np.iinfo(audio.dtype).max)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if rate != sampling_rate and samples.size:
        samples = soxr.resample(samples, rate, sampling_rate, quality="HQ")
    return samples.astype(np.float32)


def _audio_files(source: str, role: str) -> list[Path]:
    path = Path(source).expanduser()
    if not path.exists():
        raise CalibrationError(f"{role} audio not found: {path} (give a .wav or .flac file, a folder of them, "
                               "or 'synthetic')")
    if path.is_file() and path.suffix.lower() not in AUDIO_SUFFIXES:
        raise CalibrationError(f"{path}: speech models take .wav or .flac audio, not {path.suffix or 'this file'}")
    if path.is_file():
        return [path]
    return sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES)


def _voiced_clips(source: str, role: str) -> list[tuple[Path, np.ndarray]]:
    """(file, clip) for every non-silent audio file of a file or folder, each read once."""
    read = ((f, read_audio(f)) for f in _audio_files(source, role))
    pairs = [(f, clip) for f, clip in read if clip.size and np.abs(clip).max() > 0]
    if not pairs:
        raise CalibrationError(f"{source}: no audio found (no non-silent .wav or .flac files)")
    return pairs


def audio_clips(source: str, count: int, seed: int) -> list[np.ndarray]:
    """`count` clips: synthetic ones for "default"/"synthetic", else from a .wav/.flac file or a folder of them
    (sorted, cycled if there are fewer files than clips wanted, skipped if silent)."""
    if source in SYNTHETIC_SOURCES:
        return synthetic_clips(count, seed)
    clips = [clip for _, clip in _voiced_clips(source, "calibration")]
    return [clips[i % len(clips)] for i in range(count)]


def transcribed_clips(source: str) -> tuple[list[np.ndarray], list[str] | None]:
    """Held-out speech: every non-silent clip of a .wav/.flac file or folder, and their true texts when each clip has
    one in a .txt file of the same name beside it (all or none, so a score never mixes two references)."""
    pairs = _voiced_clips(source, "evaluation")
    clips = [clip for _, clip in pairs]
    transcripts = [f.with_suffix(".txt") for f, _ in pairs]
    missing = [t.name for t in transcripts if not t.exists()]
    if len(missing) == len(pairs):
        return clips, None
    if missing:
        raise CalibrationError(f"{source}: {len(missing)} of {len(pairs)} clips have no transcript beside them "
                               f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); give every clip "
                               "its .txt or none")
    return clips, [t.read_text(encoding="utf-8").strip() for t in transcripts]


def transcript_prompt(model: nn.Module, tokenizer) -> list[int]:
    """The tokens a transcript starts with: the tokenizer's task prefix (Whisper's start-of-transcript,
    language and task tokens) when it has one, else the model's decoder start token."""
    prefix = list(getattr(tokenizer, "prefix_tokens", None) or [])
    return prefix or [model.config.decoder_start_token_id]


@torch.no_grad()
def greedy_transcripts(model: nn.Module, features: torch.Tensor, prompt: list[int], length: int,
                       end_token: int | None = None, batch_size: int = 16,
                       until_end: bool = False) -> tuple[torch.Tensor, list[int]]:
    """([n, length] token ids: the prompt, then greedy tokens; where each transcript would have ended).

    The end token is never chosen, so every transcript fills its length the way the model would go on
    (fixed-length calibration sequences); the first position where the model preferred to end is reported,
    so a transcript's words can be cut there. With `until_end`, decoding stops once every transcript of a
    batch has ended, and the rest is filled with the end token."""
    device = next(model.parameters()).device
    cache_name = cache_argument(model)
    rows, ends = [], []
    for i in range(0, features.shape[0], batch_size):
        batch = features[i: i + batch_size].to(device, next(model.parameters()).dtype)
        encoded = model.get_encoder()(batch)
        ids = torch.tensor([prompt] * batch.shape[0], device=device)
        batch_ends = [length] * batch.shape[0]
        step, cache = ids, None
        while ids.shape[1] < length and not (until_end and max(batch_ends) < length):
            out = model(encoder_outputs=encoded, decoder_input_ids=step, use_cache=True, **{cache_name: cache})
            cache, logits = getattr(out, cache_name), out.logits[:, -1].float()
            if end_token is not None:
                for row in (logits.argmax(-1) == end_token).nonzero().flatten().tolist():
                    batch_ends[row] = min(batch_ends[row], ids.shape[1])
                logits[:, end_token] = -math.inf
            step = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, step], dim=1)
        if ids.shape[1] < length:
            ids = torch.cat([ids, ids.new_full((ids.shape[0], length - ids.shape[1]), end_token)], dim=1)
        rows.append(ids[:, :length].cpu())
        ends += batch_ends
    return torch.cat(rows), ends


def transcribe(model: nn.Module, tokenizer, feature_extractor, clip: np.ndarray, max_tokens: int = 128) -> dict:
    """One clip's greedy transcript (cut where the model ends it) and the decoding speed."""
    prompt = transcript_prompt(model, tokenizer)
    length = min(len(prompt) + max_tokens, getattr(model.config, "max_target_positions", 448))
    start = time.perf_counter()
    ids, ends = greedy_transcripts(model, clip_features(feature_extractor, [clip]), prompt, length,
                                   tokenizer.eos_token_id, until_end=True)
    seconds = time.perf_counter() - start
    tokens = ids[0, len(prompt): ends[0]].tolist()
    return {"text": tokenizer.decode(tokens, skip_special_tokens=True).strip(), "tokens": len(tokens),
            "seconds": seconds, "tokens_per_s": len(tokens) / seconds if seconds else 0.0}


def clip_features(feature_extractor, clips: list[np.ndarray]) -> torch.Tensor:
    """[n, mel bins, frames] log-mel features, padded or cut to the extractor's fixed window."""
    rate = getattr(feature_extractor, "sampling_rate", SAMPLING_RATE)
    return feature_extractor(clips, sampling_rate=rate, return_tensors="pt")["input_features"]


def speech_calibration(model: nn.Module, tokenizer, feature_extractor, config: CalibrationConfig,
                       clips: list[np.ndarray] | None = None) -> CalibrationData:
    """Calibration for a speech model: ceil(tokens / seq_len) clips, each with the teacher's transcript."""
    config.validate()
    count = -(-config.tokens // config.seq_len)
    clips = clips if clips is not None else audio_clips(config.source, count, config.seed)
    prompt = transcript_prompt(model, tokenizer)
    limit = getattr(model.config, "max_target_positions", config.seq_len)
    if not len(prompt) < config.seq_len <= limit:
        raise CalibrationError(f"speech calibration seq_len must be between {len(prompt) + 1} and {limit} "
                               f"decoder tokens, not {config.seq_len}")
    reference = transcribe_reference(model, tokenizer, feature_extractor, clips, config.seq_len, config.batch_size)
    return dataclasses.replace(reference.data, source=f"{config.source} audio ({len(clips)} clips)")


@dataclass(frozen=True)
class TextNormalizer:
    """How transcripts and true texts are normalised before words are compared; `name` says which way."""

    name: str
    normalize: Callable[[str], str]

    def __call__(self, text: str) -> str:
        return self.normalize(text)

    @property
    def scorer(self) -> str:
        """The word error rate's provenance, kept with every score so rates of other scorers are not mixed in."""
        return f"jiwer corpus, {self.name}"


def text_normalizer(tokenizer) -> TextNormalizer:
    """Whisper's English normaliser with the spelling map the tokenizer carries (`english_spelling_normalizer`,
    from a checkpoint's normalizer.json); without a map, the English normaliser still standardises numbers,
    contractions and titles for a tokenizer set to English, and any other tokenizer gets Whisper's basic
    (language-neutral) normaliser."""
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

    spelling = getattr(tokenizer, "english_spelling_normalizer", None)
    if spelling:
        return TextNormalizer("whisper english normaliser", EnglishTextNormalizer(spelling))
    if getattr(tokenizer, "language", None) == "english":
        return TextNormalizer("whisper english normaliser without spelling map", EnglishTextNormalizer({}))
    return TextNormalizer("whisper basic normaliser", BasicTextNormalizer())


def corpus_wer(references: list[str], hypotheses: list[str]) -> float:
    """Word error rate over all clips at once: total edits (substitutions, deletions, insertions) over total
    reference words, so a short clip weighs by its words, not as much as a long one. Texts are normalised
    already; an all-empty reference gives the number of inserted words."""
    return float(jiwer.wer(references, hypotheses))


def word_edits(references: list[str], hypotheses: list[str]) -> dict[str, int]:
    """The word alignment behind the corpus rate (jiwer): counts of hits, substitutions, deletions and
    insertions over all clips. A model that runs on past the end of the speech shows as insertions, one
    that stops early as deletions. Texts are normalised already."""
    out = jiwer.process_words(references, hypotheses)
    return {"hits": out.hits, "substitutions": out.substitutions, "deletions": out.deletions,
            "insertions": out.insertions}


@dataclass
class Reference:
    """Held-out clips with the teacher's transcripts (fixed length, as calibration sequences are), where each
    transcript ends, and, for recorded or synthesised speech, the true text."""

    data: CalibrationData
    ends: list[int]
    prompt_length: int
    texts: list[str] | None = None

    @property
    def kind(self) -> str:
        return "true transcripts" if self.texts is not None else "teacher transcripts"

    def text(self, tokenizer, normalizer: TextNormalizer, row: int) -> str:
        """Clip `row`'s reference text, normalised."""
        if self.texts is not None:
            return normalizer(self.texts[row])
        return _transcript_text(tokenizer, normalizer, self.data.sequences[row], self.prompt_length, self.ends[row])


def _transcript_text(tokenizer, normalizer: TextNormalizer, ids: torch.Tensor, start: int, end: int) -> str:
    """A transcript's normalised text, or its token ids as words when it has no text (e.g. a random model)."""
    tokens = ids[start:end].tolist()
    # Token ids skip the normaliser: the English one would read a run of numbers as one number.
    return normalizer(tokenizer.decode(tokens, skip_special_tokens=True)).strip() or " ".join(map(str, tokens))


def transcribe_reference(teacher: nn.Module, tokenizer, feature_extractor, clips: list[np.ndarray], seq_len: int,
                         batch_size: int = 8, texts: list[str] | None = None) -> Reference:
    """The clips' features and the teacher's fixed-length greedy transcripts of them."""
    prompt = transcript_prompt(teacher, tokenizer)
    # In the model's dtype: capture, probes and healing pass the features to the model as they are.
    features = clip_features(feature_extractor, clips).to(next(teacher.parameters()).dtype)
    ids, ends = greedy_transcripts(teacher, features, prompt, seq_len, tokenizer.eos_token_id, batch_size)
    data = CalibrationData(ids, f"{len(clips)} held-out clips", ids.numel(), {"input_features": features},
                           sequence_input="decoder_input_ids")
    return Reference(data, ends, len(prompt), texts)


def reference_transcripts(teacher: nn.Module, tokenizer, feature_extractor, config: CalibrationConfig,
                          audio: str = "synthetic", clips: int = EVAL_CLIPS) -> Reference:
    """Held-out clips and the teacher's transcripts of them: synthetic ones (a seed calibration never uses), or
    recorded speech from a .wav/.flac file or folder, with its true texts when they are given (transcribed_clips)."""
    if audio in SYNTHETIC_SOURCES:
        sounds, texts = synthetic_clips(clips, config.seed + EVAL_SEED_OFFSET), None
    else:
        sounds, texts = transcribed_clips(audio)
    return transcribe_reference(teacher, tokenizer, feature_extractor, sounds, config.seq_len, config.batch_size,
                                texts)


@torch.no_grad()
def speech_metrics(model: nn.Module, reference: Reference, tokenizer, batch_size: int = 8) -> dict:
    """The model's perplexity of the teacher's transcripts (teacher-forced), and its transcription scores
    (`transcription_scores`) against the true texts when the reference has them, else against the teacher's
    transcripts; `references` holds those normalised texts, one per clip."""
    device = next(model.parameters()).device
    data, start_at = reference.data, reference.prompt_length
    total, count = 0.0, 0
    for i in range(0, data.sequences.shape[0], batch_size):
        rows = slice(i, i + batch_size)
        inputs = data.model_inputs(rows, device)
        inputs["input_features"] = inputs["input_features"].to(next(model.parameters()).dtype)
        logits = model(**inputs, use_cache=False).logits[:, start_at - 1: -1].float()
        targets = inputs["decoder_input_ids"][:, start_at:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    normalizer = text_normalizer(tokenizer)
    references = [reference.text(tokenizer, normalizer, row) for row in range(data.sequences.shape[0])]
    features, prompt = data.inputs["input_features"], data.sequences[0, :start_at].tolist()
    scores = transcription_scores(model, tokenizer, features, prompt, data.sequences.shape[1], references, normalizer,
                                  batch_size)
    nll = total / max(count, 1)
    return {"perplexity": math.exp(min(nll, 700)), "nll": nll, "tokens_scored": count, "references": references,
            **scores}


def transcription_scores(model: nn.Module, tokenizer, features: torch.Tensor, prompt: list[int], length: int,
                         references: list[str], normalizer: TextNormalizer, batch_size: int = 8) -> dict:
    """The corpus word error rate of the model's own greedy transcripts (normalised by `normalizer`) against
    the clips' normalised reference texts, which scorer gave it, its word edits (`word_edits`), the normalised
    transcripts themselves (`hypotheses`, one per clip), and how fast the model wrote them (greedy decoding
    with a cache, batched: relative speeds, not a serving benchmark)."""
    start = time.perf_counter()
    own, ends = greedy_transcripts(model, features, prompt, length, tokenizer.eos_token_id, batch_size)
    seconds = time.perf_counter() - start
    hypotheses = [_transcript_text(tokenizer, normalizer, own[row], len(prompt), end) for row, end in enumerate(ends)]
    return {"wer": corpus_wer(references, hypotheses), "wer_scorer": normalizer.scorer, "clips": len(references),
            "wer_edits": word_edits(references, hypotheses), "hypotheses": hypotheses,
            "transcribe_tokens_per_s": (own.shape[1] - len(prompt)) * own.shape[0] / seconds}
