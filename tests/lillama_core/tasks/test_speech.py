"""Speech-to-text (Whisper): encoder and decoder stacks, audio calibration, transcript metrics, export."""

import dataclasses
import json
import wave

import numpy as np
import pytest
import soundfile
import torch
import transformers as T
from tiny import tiny_whisper

from lillama_core.cli import main
from lillama_core.compress import loop
from lillama_core.compress.capture import capture_block_inputs, run_block_over
from lillama_core.compress.loop import Compressor
from lillama_core.config import CalibrationConfig, DistillConfig, PlanConfig
from lillama_core.errors import CalibrationError
from lillama_core.export import export_student, load_compressed, load_feature_extractor
from lillama_core.modeling.discovery import find_blocks, stack_starts
from lillama_core.modeling.shipped import LowRankLinear
from lillama_core.planning.planner import make_plan
from lillama_core.tasks import speech
from lillama_core.tasks.speech import (
    audio_clips,
    corpus_wer,
    greedy_transcripts,
    read_audio,
    reference_transcripts,
    speech_calibration,
    speech_metrics,
    synthetic_clips,
    text_normalizer,
    to_mono,
    transcribed_clips,
    transcription_scores,
    word_edits,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def whisper():
    return tiny_whisper()


@pytest.fixture(scope="module")
def calibration(whisper):
    config = CalibrationConfig(source="synthetic", tokens=48 * 16, seq_len=16, batch_size=4)
    return speech_calibration(whisper.model, whisper.tokenizer, whisper.feature_extractor, config)


def test_encoder_and_decoder_blocks_run_in_order_as_two_stacks(whisper):
    blocks = find_blocks(whisper.model)
    assert [b.name for b in blocks] == ["model.encoder.layers.0", "model.encoder.layers.1",
                                        "model.decoder.layers.0", "model.decoder.layers.1"]
    assert [b.index for b in stack_starts(blocks)] == [0, 2]


def test_block_by_block_replay_reproduces_encoder_and_decoder(whisper, calibration):
    """The decoder's blocks get masks positionally and cross-attention states that differ per batch:
    replaying them from the recorded arguments must give the model's own outputs."""
    model, blocks = whisper.model, find_blocks(whisper.model)
    data = calibration.select(slice(0, 4))
    batches = [slice(0, 2), slice(2, 4)]  # equal sizes: per-size arguments alone would mix the batches up
    starts, recorded = capture_block_inputs(model, blocks, data, batches, CPU)
    assert set(starts) == {0, 2}
    outputs = {}
    for start, stack in ((0, blocks[:2]), (2, blocks[2:])):
        hidden = starts[start]
        for block in stack:
            run_block_over(block.module, hidden, hidden, recorded.kwargs_for(block.index), batches, CPU)
        outputs[start] = hidden
    with torch.no_grad():
        reference = model.model(**data.model_inputs(slice(0, 4), CPU), use_cache=False)
    torch.testing.assert_close(model.model.encoder.layer_norm(outputs[0]), reference.encoder_last_hidden_state,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.model.decoder.layer_norm(outputs[2]), reference.last_hidden_state,
                               rtol=1e-4, atol=1e-4)


def test_calibration_pairs_each_clip_with_the_teachers_transcript(whisper, calibration):
    assert calibration.inputs["input_features"].shape == (48, 16, 100) and calibration.sequences.shape == (48, 16)
    assert (calibration.sequences[:, 0] == whisper.model.config.decoder_start_token_id).all()
    assert len({tuple(row) for row in calibration.sequences.tolist()}) > 24  # transcripts follow the audio
    with torch.no_grad():  # each token is the teacher's greedy choice given the clip and the tokens before
        logits = whisper.model(**calibration.model_inputs(slice(0, 4), CPU)).logits
    assert torch.equal(logits[:, :-1].argmax(-1), calibration.sequences[:4, 1:])
    with pytest.raises(CalibrationError, match="seq_len"):
        speech_calibration(whisper.model, whisper.tokenizer, whisper.feature_extractor,
                           CalibrationConfig(source="synthetic", tokens=200, seq_len=100))


def test_compress_evaluate_export_reload(whisper, calibration, tmp_path):
    plan = make_plan(whisper, PlanConfig(strategy="uniform", rank=8, reduction=None))
    assert any(".encoder." in n for n in plan.ranks) and any(".encoder_attn." in n for n in plan.ranks)
    run = Compressor(whisper, calibration, plan, DistillConfig(lr=3e-3), batch_size=4).run()
    assert run.status == "completed" and [e.layer for e in run.layers] == [0, 1, 2, 3]
    assert all(e.best_loss < e.init_loss for e in run.layers)
    student = run.student
    assert sum(isinstance(m, LowRankLinear) for m in student.modules()) == len(plan.ranks)

    reference = reference_transcripts(whisper.model, whisper.tokenizer, whisper.feature_extractor,
                                      CalibrationConfig(seq_len=16, batch_size=4))
    teacher_metrics = speech_metrics(whisper.model, reference, whisper.tokenizer)
    student_metrics = speech_metrics(student, reference, whisper.tokenizer)
    # The teacher agrees with its own transcripts; a student that decodes differently does not.
    assert teacher_metrics["wer"] == 0 and student_metrics["wer"] > 0
    assert student_metrics["perplexity"] > teacher_metrics["perplexity"]
    crushed = Compressor(whisper, calibration, make_plan(whisper, PlanConfig(strategy="uniform", rank=1,
                                                                                reduction=None)),
                         DistillConfig(train=False), batch_size=4).run().student
    assert speech_metrics(crushed, reference, whisper.tokenizer)["perplexity"] > student_metrics["perplexity"]

    inputs = calibration.model_inputs(slice(0, 2), CPU)
    with torch.no_grad():
        expected = student(**inputs).logits
    folder = export_student(student, whisper.tokenizer, tmp_path / "compressed",
                            feature_extractor=whisper.feature_extractor)
    assert load_feature_extractor(folder).to_dict() == whisper.feature_extractor.to_dict()
    reloaded, _ = load_compressed(folder)
    remote = T.AutoModelForSpeechSeq2Seq.from_pretrained(folder, trust_remote_code=True)
    merged = T.AutoModelForSpeechSeq2Seq.from_pretrained(export_student(student, whisper.tokenizer,
                                                                        tmp_path / "dense", merge=True))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected)
        torch.testing.assert_close(remote(**inputs).logits, expected)
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-4, atol=1e-4)


def test_synthetic_clips_are_seeded_speech_like_audio():
    first, again, other = synthetic_clips(3, seed=1), synthetic_clips(3, seed=1), synthetic_clips(3, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0][:16000], other[0][:16000])
    for clip in first:
        assert clip.dtype == np.float32 and 2 * 16000 <= clip.size <= 6 * 16000
        assert 0.05 < np.abs(clip).max() <= 1.0
        frames = np.abs(clip[: clip.size // 800 * 800]).reshape(-1, 800).max(axis=1)
        assert (frames < 0.02).any() and (frames > 0.1).any()  # pauses between syllables


def _write_wav(path, samples: np.ndarray, rate: int, channels: int = 1):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.repeat(samples, channels) * 32767).astype("<i2").tobytes())


def test_wav_files_are_read_as_16khz_mono(tmp_path):
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)  # one second at 8 kHz, stereo
    _write_wav(tmp_path / "b.wav", tone, 8000, channels=2)
    audio = read_audio(tmp_path / "b.wav")
    assert audio.size == 16000 and abs(np.abs(audio[1000:-1000]).max() - 0.5) < 0.01
    _write_wav(tmp_path / "a.wav", np.zeros(100), 16000)  # silent files are skipped
    clips = audio_clips(str(tmp_path), 3, seed=0)
    assert len(clips) == 3 and all(np.array_equal(c, audio) for c in clips)


def test_bad_audio_sources_give_clear_errors(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        audio_clips(str(tmp_path / "missing"), 2, 0)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CalibrationError, match=r"\.wav or \.flac audio"):
        audio_clips(str(tmp_path / "notes.txt"), 2, 0)
    with pytest.raises(CalibrationError, match="no audio"):
        audio_clips(str(tmp_path), 2, 0)
    (tmp_path / "broken.flac").write_bytes(b"fLaCjunk")
    with pytest.raises(CalibrationError, match="broken.flac: not a readable audio file"):
        audio_clips(str(tmp_path), 2, 0)
    with pytest.raises(CalibrationError, match="audio file not found"):
        read_audio(tmp_path / "missing.wav")


def _amplitude_near(audio: np.ndarray, rate: int, frequency: float, width: float = 100.0) -> float:
    """The largest sine amplitude in the band frequency ± width (Hz), from a Hann-windowed FFT."""
    window = np.hanning(audio.size)
    spectrum = np.abs(np.fft.rfft(audio * window)) * 2 / window.sum()
    frequencies = np.fft.rfftfreq(audio.size, 1 / rate)
    return float(spectrum[np.abs(frequencies - frequency) <= width].max())


def test_resampling_filters_out_what_the_new_rate_cannot_hold():
    """A 10 kHz tone at 22,050 Hz is above 16 kHz audio's 8 kHz Nyquist: resampled without an anti-alias filter
    it folds back to 16 - 10 = 6 kHz (linear interpolation left a 6 kHz tone of amplitude 0.48); it must be gone."""
    seconds = np.arange(22_050) / 22_050
    high = to_mono(np.sin(2 * np.pi * 10_000 * seconds), 22_050)
    assert high.size == 16_000 and _amplitude_near(high, 16_000, 6_000) < 0.01
    low = to_mono(np.sin(2 * np.pi * 1_000 * seconds), 22_050)  # a tone below Nyquist keeps its strength
    assert _amplitude_near(low, 16_000, 1_000) == pytest.approx(1.0, abs=0.02)


def test_float_wav_and_flac_are_read_at_any_rate(tmp_path):
    tone = 0.25 * np.sin(2 * np.pi * 440 * np.arange(44_100) / 44_100)
    soundfile.write(tmp_path / "float.wav", np.stack([tone, tone], axis=1), 44_100, subtype="FLOAT")
    soundfile.write(tmp_path / "speech.flac", tone, 44_100, subtype="PCM_16")
    expected = to_mono(tone, 44_100)
    for name in ("float.wav", "speech.flac"):
        audio = read_audio(tmp_path / name)
        assert audio.dtype == np.float32 and audio.size == 16_000
        np.testing.assert_allclose(audio, expected, atol=1e-3)
    for name in ("float", "speech"):
        (tmp_path / f"{name}.txt").write_text(f"{name} text\n")
    clips, texts = transcribed_clips(str(tmp_path))  # held-out folders take FLAC beside WAV
    assert len(clips) == 2 and texts == ["float text", "speech text"]
    assert len(audio_clips(str(tmp_path / "speech.flac"), 2, seed=0)) == 2


class WordTokenizer:
    """Token id t decodes to the word WORDS[t]; token 1 ends a transcript."""

    WORDS = ("<start>", "<end>", "a", "b", "c", "d", "e", "seven")
    eos_token_id = 1

    def decode(self, tokens, skip_special_tokens=True):
        return " ".join(self.WORDS[t] for t in tokens if not (skip_special_tokens and t < 2))


def test_word_error_rate_is_total_errors_over_total_reference_words():
    """Two clips: a long one transcribed right, a short one with 3 inserted words. Per-clip rates average
    to 0.50; the corpus rate is 3 errors over 16 reference words, 0.19."""
    references = [" ".join(["seven"] * 13), "seven seven seven"]
    # The scripted decoder writes "seven" until it would end: 13 words, then 6 words.
    scores = transcription_scores(Scripted([14, 7]), WordTokenizer(), torch.zeros(2, 1), [0], 16, references,
                                  text_normalizer(WordTokenizer()))
    assert scores["clips"] == 2 and scores["wer"] == pytest.approx(3 / 16) and round(scores["wer"], 2) == 0.19
    assert scores["wer_scorer"] == "jiwer corpus, whisper basic normaliser"
    # The errors are the short clip's run-on words, each transcript kept as scored.
    assert scores["wer_edits"] == {"hits": 16, "substitutions": 0, "deletions": 0, "insertions": 3}
    assert scores["hypotheses"] == [" ".join(["seven"] * 13), " ".join(["seven"] * 6)]
    assert corpus_wer(["a b c d", "e"], ["a x c", "e"]) == pytest.approx(2 / 5)  # a substitution and a deletion
    assert word_edits(["a b c d", "e"], ["a x c", "e"]) == {"hits": 3, "substitutions": 1, "deletions": 1,
                                                          "insertions": 0}


def test_texts_are_normalised_the_way_whisper_is_scored():
    english = text_normalizer(type("Tokenizer", (), {"english_spelling_normalizer": {"colour": "color"}})())
    assert english.name == "whisper english normaliser"
    assert english("Mr. Smith's colour, it's twenty-five!") == english("mister smith's color it is 25")
    assert corpus_wer([english("It's twenty-five, the colour.")], [english("it is 25 the color")]) == 0
    unmapped = text_normalizer(type("Tokenizer", (), {"language": "english"})())
    assert unmapped.scorer == "jiwer corpus, whisper english normaliser without spelling map"
    assert unmapped("It's twenty-five.") == "it is 25"
    basic = text_normalizer(WordTokenizer())
    assert basic.name == "whisper basic normaliser" and basic(" The fox, [noise] QUICK!").split() == ["the", "fox",
                                                                                                   "quick"]


class Scripted(torch.nn.Module):
    """A decoder that prefers to end (token 1) from `ends[row]` tokens on, and token 7 after that."""

    def __init__(self, ends):
        super().__init__()
        self.ends, self.anchor = ends, torch.nn.Parameter(torch.zeros(1))

    def get_encoder(self):
        return lambda features: features

    def forward(self, encoder_outputs, decoder_input_ids, use_cache, cache=None):
        seen = (cache or 0) + decoder_input_ids.shape[1]  # the cache is the number of tokens seen so far
        logits = torch.zeros(decoder_input_ids.shape[0], decoder_input_ids.shape[1], 10)
        logits[:, -1, 7] = 0.5
        for row, end in enumerate(self.ends):
            if seen >= end:
                logits[row, -1, 1] = 1.0
        return type("Output", (), {"logits": logits, "cache": seen})


def test_transcripts_fill_their_length_and_report_where_they_would_have_ended():
    ids, ends = greedy_transcripts(Scripted([3, 99]), torch.zeros(2, 1), [0], 6, end_token=1, batch_size=2)
    assert ids.tolist() == [[0, 7, 7, 7, 7, 7], [0, 7, 7, 7, 7, 7]] and ends == [3, 6]
    ids, ends = greedy_transcripts(Scripted([2, 4]), torch.zeros(2, 1), [0], 8, end_token=1, until_end=True)
    assert ends == [2, 4] and ids[:, :4].tolist() == [[0, 7, 7, 7]] * 2
    assert (ids[:, 5:] == 1).all()  # decoding stopped once both had ended; the rest is the end token


def test_cli_compresses_a_whisper_folder_and_reports_word_error_rate(whisper, tmp_path, capsys):
    folder = tmp_path / "tiny-whisper"
    for part in (whisper.model, whisper.tokenizer, whisper.feature_extractor):
        part.save_pretrained(folder)
    out = tmp_path / "student"
    assert main(["compress", "--model", str(folder), "--device", "cpu", "--calibration", "synthetic",
                 "--tokens", "256", "--seq-len", "16", "--batch-size", "4", "--reduction", "0.1",
                 "--eval-audio", str(_recorded_speech(tmp_path / "recorded", 2, ["zzz", "zzz"])),
                 "--runs-dir", str(tmp_path / "runs"), "--out", str(out), "--json"]) == 0
    printed = capsys.readouterr()
    summary = json.loads(printed.out.strip().splitlines()[-1])
    assert summary["reduction"] >= 0.1 and summary["wer_reference"] == "true transcripts"
    assert summary["wer_scorer"] == "jiwer corpus, whisper basic normaliser"
    assert summary["teacher_wer"] >= 1.0 and summary["student_wer"] >= 0
    assert "synthetic clips: enough to try the workflow" in printed.err
    assert summary["student_ppl"] > 0 and summary["teacher_ppl"] > 0
    assert (out / "preprocessor_config.json").exists()
    model, _ = load_compressed(out)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    assert main(["export", str(out), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    assert isinstance(T.AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path / "merged"),
                      T.WhisperForConditionalGeneration)
    assert load_feature_extractor(tmp_path / "merged") is not None

    soundfile.write(tmp_path / "clip.flac", synthetic_clips(1, seed=5)[0], 16000)
    capsys.readouterr()
    assert main(["transcribe", "--model", str(out), "--device", "cpu", str(tmp_path / "clip.flac")]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith(f"{tmp_path / 'clip.flac'}: ") and "tokens/s" in printed.err
    assert main(["transcribe", "--model", str(out), str(tmp_path / "missing.wav")]) == 2
    assert "audio file not found" in capsys.readouterr().err


def test_the_decoders_student_path_reads_the_student_encoders_states(whisper, calibration):
    """With encoder blocks compressed, the first decoder block's two loss paths differ (same decoder input,
    different cross-attention states); with the encoder left dense they coincide."""
    shape = make_plan(whisper, PlanConfig(strategy="uniform", rank=8, reduction=None))
    decoder_only = {n: r for n, r in shape.ranks.items() if ".decoder.layers.0." in n}
    with_encoder = {**decoder_only, **{n: r for n, r in shape.ranks.items() if ".encoder.layers.1." in n}}
    reports = {}
    for label, ranks in (("decoder only", decoder_only), ("with encoder", with_encoder)):
        plan = type(shape)(ranks, "custom", None, shape.model_type)
        run = Compressor(whisper, calibration, plan, DistillConfig(lr=3e-3), batch_size=4).run()
        reports[label] = run.layers[-1]
        assert reports[label].layer == 2
    dense = reports["decoder only"]
    assert dense.final_loss_student_input == pytest.approx(dense.final_loss_teacher_input)
    compressed = reports["with encoder"]
    assert abs(compressed.final_loss_student_input - compressed.final_loss_teacher_input) > 1e-4


def test_every_block_trains_on_the_inputs_the_finished_student_gives_it(whisper, calibration, monkeypatch):
    """The student path each block is distilled on (its hidden input and, in the decoder, the cross-attention
    states) is what the finished student itself feeds that block, teacher-forced on the same clips: the
    compressed encoder's output in the decoder, not the teacher's, nor an encoder output of another state."""
    trained_on = {}

    class Recording(loop.LayerDistiller):
        def __init__(self, student, data, *args, **kwargs):
            super().__init__(student, data, *args, **kwargs)
            rows = slice(0, 4)
            hidden = data.teacher_in if data.student_in is None else data.student_in
            states = (data.student_kwargs_for or data.kwargs_for)(rows).get("encoder_hidden_states")
            trained_on[len(trained_on)] = (hidden[rows].clone(), states)

    monkeypatch.setattr(loop, "LayerDistiller", Recording)
    plan = make_plan(whisper, PlanConfig(strategy="uniform", rank=8, reduction=None))
    student = Compressor(whisper, calibration, plan, DistillConfig(lr=3e-3), batch_size=4).run().student
    fed = {}
    hooks = [block.module.register_forward_pre_hook(
        lambda module, args, kwargs, index=block.index: fed.setdefault(index, (args, kwargs)), with_kwargs=True)
        for block in find_blocks(student)]
    with torch.no_grad():
        encoder_states = student.get_encoder()(calibration.inputs["input_features"][:4]).last_hidden_state
        student(**calibration.model_inputs(slice(0, 4), CPU), use_cache=False)
    for hook in hooks:
        hook.remove()
    assert sorted(trained_on) == sorted(fed) == [0, 1, 2, 3]
    for index, (hidden, states) in trained_on.items():
        args, kwargs = fed[index]
        torch.testing.assert_close(hidden, args[0] if args else kwargs["hidden_states"])
        if index >= 2:  # decoder blocks read the compressed encoder's output
            torch.testing.assert_close(states, encoder_states)
        else:
            assert states is None


def test_transcribing_with_a_text_model_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    _write_wav(tmp_path / "clip.wav", synthetic_clips(1, seed=5)[0], 16000)
    assert main(["transcribe", "--model", str(tiny_model_dir), "--device", "cpu", str(tmp_path / "clip.wav")]) == 2
    assert "needs a speech model" in capsys.readouterr().err


def test_a_bf16_whisper_is_calibrated_and_distilled_on_the_cpu():
    """A bf16 Whisper (the default on a GPU) gets bf16 features, so the capture's own forward accepts them;
    without autocast (the CPU) its float32 student blocks get their bf16 inputs and cross-attention states
    cast to float32 (Whisper's LayerNorm refuses mixed dtypes)."""
    whisper = tiny_whisper()
    whisper.model.to(torch.bfloat16)
    whisper = dataclasses.replace(whisper, dtype=torch.bfloat16)
    data = speech_calibration(whisper.model, whisper.tokenizer, whisper.feature_extractor,
                              CalibrationConfig(tokens=32 * 16, seq_len=16, batch_size=4))
    assert data.inputs["input_features"].dtype == torch.bfloat16
    starts, _ = capture_block_inputs(whisper.model, find_blocks(whisper.model), data, [slice(0, 4)], CPU)
    assert starts[0].dtype == starts[2].dtype == torch.bfloat16
    plan = make_plan(whisper, PlanConfig(strategy="uniform", rank=8, reduction=None))
    run = Compressor(whisper, data, plan, DistillConfig(lr=3e-3), batch_size=4).run()
    assert run.status == "completed" and [e.layer for e in run.layers] == [0, 1, 2, 3]
    assert all(e.best_loss < e.init_loss for e in run.layers)


def _recorded_speech(folder, count: int, texts: list[str] | None):
    folder.mkdir()
    for i, clip in enumerate(synthetic_clips(count, seed=7)):
        _write_wav(folder / f"clip{i}.wav", clip, 16000)
        if texts is not None:
            (folder / f"clip{i}.txt").write_text(texts[i] + "\n")
    return folder


def test_held_out_speech_is_scored_against_its_true_texts(whisper, tmp_path):
    recorded = _recorded_speech(tmp_path / "recorded", 3, ["zzz qqq", "zzz qqq", "zzz qqq"])
    clips, texts = transcribed_clips(str(recorded))
    assert len(clips) == 3 and texts == ["zzz qqq"] * 3
    config = CalibrationConfig(seq_len=16, batch_size=4)
    true = reference_transcripts(whisper.model, whisper.tokenizer, whisper.feature_extractor, config, str(recorded))
    assert true.kind == "true transcripts" and len(true.ends) == 3
    # Against its own transcripts the teacher is perfect; against texts it never wrote, it is not.
    assert speech_metrics(whisper.model, true, whisper.tokenizer)["wer"] >= 1.0
    untranscribed = _recorded_speech(tmp_path / "untranscribed", 2, None)
    own = reference_transcripts(whisper.model, whisper.tokenizer, whisper.feature_extractor, config, str(untranscribed))
    assert own.kind == "teacher transcripts" and speech_metrics(whisper.model, own, whisper.tokenizer)["wer"] == 0

    (recorded / "clip1.txt").unlink()
    with pytest.raises(CalibrationError, match="1 of 3 clips have no transcript"):
        transcribed_clips(str(recorded))
    with pytest.raises(CalibrationError, match="evaluation audio not found"):
        transcribed_clips(str(tmp_path / "missing"))


def test_cli_scores_a_speech_model_on_recorded_speech_only(whisper, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "tiny-whisper"
    for part in (whisper.model, whisper.tokenizer, whisper.feature_extractor):
        part.save_pretrained(folder)
    recorded = _recorded_speech(tmp_path / "recorded", 2, ["zzz", "zzz"])
    decoded = []

    def counted(model, features, *args, **kwargs):
        decoded.append(len(features))
        return greedy_transcripts(model, features, *args, **kwargs)

    monkeypatch.setattr(speech, "greedy_transcripts", counted)
    assert main(["eval", "--model", str(folder), "--device", "cpu", "--eval-audio", str(recorded), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["wer"] >= 1.0 and summary["eval_clips"] == 2 and summary["parameters"] > 0
    assert summary["wer_scorer"] == "jiwer corpus, whisper basic normaliser"
    assert decoded == [2]  # each clip is transcribed once: a lone model has no teacher transcripts to make
    assert main(["eval", "--model", str(folder), "--device", "cpu"]) == 2
    assert "needs recorded speech with its true texts" in capsys.readouterr().err
