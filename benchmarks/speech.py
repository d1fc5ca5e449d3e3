"""Whisper-base compressed, scored on real speech with a true word error rate, offline.

Speech comes from espeak-ng (Debian's `espeak-ng`), reading WikiText-2 sentences aloud in two accents
and two speeds: held-out clips from the test split (scored against the sentence text) and calibration
clips from the built-in calibration text. Calibration is either that synthesised speech or the
engine's built-in synthetic speech-like clips (no words at all), so the table also says whether a user
without recordings loses anything. Every method gets the same clips, and the student's transcripts are
scored against the true text; the teacher's word error rate is the floor.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from lillama_core.compress.loop import Compressor
from lillama_core.config import CalibrationConfig, ModelConfig
from lillama_core.data.calibration import DEFAULT_SOURCES, read_eval_text
from lillama_core.modeling.discovery import count_parameters
from lillama_core.modeling.loading import LoadedModel, load_model
from lillama_core.planning.planner import make_plan
from lillama_core.planning.ranks import ModelShape, summarize
from lillama_core.runtime.paths import lillama_home
from lillama_core.tasks.speech import (
    read_audio,
    speech_calibration,
    speech_metrics,
    synthetic_clips,
    transcribe_reference,
)

from .bench import log
from .common import environment
from .methods import recipe
from .whisper_base import whisper_base_folder

VOICES = (("en-us", 165), ("en", 150), ("en-us", 140), ("en", 175))  # (espeak-ng voice, words per minute)


def sentences(text: str, count: int, seed: int, words: tuple[int, int] = (8, 24)) -> list[str]:
    """`count` clean sentences of WikiText (no headings, no <unk>, no digits, its @-@ spacing undone), seeded."""
    text = re.sub(r" @(.)@ ", r"\1", text)
    found = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("=") or "<unk>" in line:
            continue
        for sentence in re.split(r"(?<=\.) ", line):
            sentence = re.sub(r" ([,.;:!?')])", r"\1", sentence).replace("( ", "(").replace(" n't", "n't")
            # Digits are left out: espeak reads "1998" as words that Whisper writes back as digits.
            if (words[0] <= len(sentence.split()) <= words[1] and sentence.endswith(".") and '"' not in sentence
                    and not any(c.isdigit() for c in sentence)):
                found.append(sentence)
    random.Random(seed).shuffle(found)
    return found[:count]


def spoken(texts: list[str], folder: Path) -> list:
    """Each text read by espeak-ng (voices and speeds in turn), as 16 kHz clips; cached by content."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("the speech benchmark needs espeak-ng (apt-get install espeak-ng)")
    folder.mkdir(parents=True, exist_ok=True)
    clips = []
    for i, text in enumerate(texts):
        voice, speed = VOICES[i % len(VOICES)]
        key = hashlib.sha256(f"{voice}|{speed}|{text}".encode()).hexdigest()[:16]
        path = folder / f"{key}.wav"
        if not path.exists():
            partial = path.with_suffix(".partial.wav")
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(partial), text], check=True)
            partial.rename(path)
        clips.append(read_audio(path))
    return clips


EXAMPLES = 4  # transcripts kept in each record beside their reference texts


def _evaluate(model, loaded: LoadedModel, reference, batch_size: int) -> dict:
    """Transcript perplexity, word error rate with its edits (insertions: transcripts that run on past the
    speech; deletions: ones that stop early) and the first clips' transcripts beside their true texts."""
    scores = speech_metrics(model, reference, loaded.tokenizer, batch_size)
    examples = [{"reference": ref, "hypothesis": hyp}
                for ref, hyp in zip(scores["references"][:EXAMPLES], scores["hypotheses"][:EXAMPLES], strict=True)]
    return {"wer": scores["wer"], "wer_scorer": scores["wer_scorer"], "wer_edits": scores["wer_edits"],
            "transcript_ppl": scores["perplexity"], "transcribe_tokens_per_s": scores["transcribe_tokens_per_s"],
            "params": count_parameters(model), "examples": examples}


def _edits(record: dict) -> str:
    edits = record["wer_edits"]
    return ", ".join(f"{edits[k]} {k}" for k in ("substitutions", "deletions", "insertions"))


def run_speech(reductions: list[float], methods: list[str], calibrations: list[str], clips: int, eval_clips: int,
               seq_len: int, batch_size: int, device: str, dtype: str) -> Iterator[dict]:
    """The teacher's record, then one per calibration, reduction and method, each as soon as it is measured
    (a long run that stops early keeps what it finished)."""
    loaded = load_model(ModelConfig(name=str(whisper_base_folder()), device=device, dtype=dtype))
    cache = lillama_home() / "speech-clips"
    eval_texts = sentences(read_eval_text(), eval_clips, seed=1)
    calibration_texts = sentences(DEFAULT_SOURCES[0].read_text(encoding="utf-8"), clips, seed=0)
    reference = transcribe_reference(loaded.model, loaded.tokenizer, loaded.feature_extractor,
                                     spoken(eval_texts, cache), seq_len, batch_size, texts=eval_texts)
    base = {"model": "whisper-base", "device": str(loaded.device), "dtype": str(loaded.dtype).replace("torch.", ""),
            "env": environment(loaded.device), "eval_clips": eval_clips, "seq_len": seq_len,
            "params_total": count_parameters(loaded.model)}
    teacher = {**base, "method": "teacher", "reduction": 0.0, **_evaluate(loaded.model, loaded, reference,
                                                                            batch_size)}
    log(f"teacher: WER {teacher['wer']:.1%} ({_edits(teacher)}) on {eval_clips} spoken WikiText-2 test sentences")
    yield teacher
    shape = ModelShape.of(loaded.model)
    for source in calibrations:
        audio = spoken(calibration_texts, cache) if source == "speech" else synthetic_clips(clips, seed=0)
        config = CalibrationConfig(source=source, tokens=clips * seq_len, seq_len=seq_len, batch_size=batch_size)
        calibration = speech_calibration(loaded.model, loaded.tokenizer, loaded.feature_extractor, config, audio)
        for reduction in reductions:
            for method in methods:
                start = time.time()
                plan = make_plan(loaded, recipe(method).plan_config(reduction), calibration, batch_size)
                run = Compressor(loaded, calibration, plan, recipe(method).distill_config(), batch_size).run()
                seconds = time.time() - start
                record = {**base, "method": method, "calibration": source, "calibration_clips": clips,
                          "target_reduction": reduction, "reduction": summarize(run.applied, shape).reduction,
                          "compress_seconds": seconds, "ranks": run.applied.ranks,
                          **_evaluate(run.student, loaded, reference, batch_size)}
                log(f"{method} @ {reduction:.0%} ({source} calibration): WER {record['wer']:.1%} ({_edits(record)}), "
                    f"transcript ppl {record['transcript_ppl']:.2f}, {seconds:.0f}s")
                yield record
                del run
                if loaded.device.type == "cuda":
                    torch.cuda.empty_cache()
