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
