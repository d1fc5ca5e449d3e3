import json
from dataclasses import replace

from tiny import SAMPLE_TEXT, STRICT_CHAT_TEMPLATE, tiny_llama

from components.model_data import calibration_preview
from components.studio import Studio
from lillama_core.config import CalibrationConfig
from lillama_core.jobs import JobManager


def test_preview_warns_about_chats_the_template_refused(tmp_path):
    loaded = tiny_llama()
    loaded.tokenizer.chat_template = STRICT_CHAT_TEMPLATE  # Gemma's style: a system turn raises
    studio = Studio(JobManager(tmp_path / "runs"), tmp_path / "exports")
    studio.loaded = loaded
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                        {"role": "user", "content": SAMPLE_TEXT[:100]}]})
                               for _ in range(3)))
    config = CalibrationConfig(source=str(chats), tokens=64, seq_len=16)
    shown = calibration_preview(studio, loaded, config)
    assert ("⚠ the chat template refused 3 of 3 chat records (first: record 1, 'System role not supported'); used 3 "
            "with system turns folded into the first user turn and repeated roles merged.") in shown
    assert "> <user>Be brief.  The quick brown fox" in shown  # the system turn leads the first user turn
    assert studio.calibration == config  # a preview that worked keeps its settings
    assert "⚠" not in calibration_preview(studio, loaded, replace(config, chat_template=False))


def test_the_teacher_written_share_is_a_setting_the_preview_explains(tmp_path):
    from components.model_data import SOURCE_KINDS, calibration_from_inputs, form_values

    studio = Studio(JobManager(tmp_path / "runs"), tmp_path / "exports")
    studio.loaded = loaded = tiny_llama()
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 4)
    config = calibration_from_inputs(studio, SOURCE_KINDS[1], str(text), "", "", "train", 160, 16, 4, 0.25)
    assert config.generated == 0.25
    shown = calibration_preview(studio, loaded, config)
    assert "**10 sequences × 16 tokens" in shown
    assert "the teacher writes 2 of them after their first 8 tokens" in shown  # round(10 * 0.25)
    assert form_values(studio)[-2] == 0.25  # a recipe's share shows in the slider
    assert "teacher writes" not in calibration_preview(studio, loaded, replace(config, generated=0.0))
