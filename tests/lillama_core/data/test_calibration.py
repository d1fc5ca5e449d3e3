import json

import pytest
import torch
from tiny import SAMPLE_TEXT, STRICT_CHAT_TEMPLATE, tiny_tokenizer

from lillama_core.config import CalibrationConfig
from lillama_core.data.calibration import (
    CalibrationData,
    TemplateTally,
    build_sequences,
    iter_texts,
    load_calibration,
    preview,
    raw_records,
    read_eval_text,
)
from lillama_core.errors import CalibrationError


@pytest.fixture(scope="module")
def tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    return tok


def _config(source, **kw):
    return CalibrationConfig(source=str(source), **{"tokens": 64, "seq_len": 16, **kw})


def test_built_in_set_mixes_wikitext_and_chat_formatted_instructions(tokenizer):
    texts = list(iter_texts(CalibrationConfig(), tokenizer))
    assert any("Homarus gammarus" in t for t in texts[:3])
    chats = [t for t in texts if t.startswith("<user>")]
    assert len(chats) == 175  # every Alpaca seed task, through the chat template
    assert "<assistant>" in chats[0]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json", ".csv", ".parquet"])
def test_local_files_of_every_format(tmp_path, tokenizer, suffix):
    rows = [{"text": f"{SAMPLE_TEXT} record {i}", "id": i} for i in range(4)]
    path = tmp_path / f"data{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(r["text"] for r in rows))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        import pandas as pd
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        import pandas as pd
        pd.DataFrame(rows).to_parquet(path)
    data = load_calibration(_config(path), tokenizer)
    assert data.sequences.shape == (4, 16)
    assert data.tokens == 64


def test_text_field_is_used_and_a_wrong_one_named(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "alpha " * 50, "title": "t"}) + "\n")
    assert list(iter_texts(_config(path, text_field="body"), tokenizer))[0].startswith("alpha")
    with pytest.raises(CalibrationError, match="field 'content' not found; records have: 'body', 'title'"):
        list(iter_texts(_config(path, text_field="content"), tokenizer))
    numbers = tmp_path / "n.jsonl"
    numbers.write_text(json.dumps({"id": 1, "scores": [0.5, 0.7]}) + "\n")
    with pytest.raises(CalibrationError, match="no text field in records with fields 'id', 'scores'; choose one"):
        list(iter_texts(_config(numbers), tokenizer))


def test_messages_records_go_through_the_chat_template(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}))
    assert list(iter_texts(_config(path), tokenizer)) == ["<user>hi<assistant>hello"]


BOM = "\ufeff"


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json", ".csv"])
def test_files_saved_with_a_byte_order_mark_read_as_without(tmp_path, tokenizer, suffix):
    rows = [{"text": f"{SAMPLE_TEXT} record {i}", "source": "web"} for i in range(4)]
    path = tmp_path / f"excel{suffix}"
    if suffix == ".txt":
        body = "\n".join(r["text"] for r in rows)
    elif suffix == ".jsonl":
        body = "\n".join(json.dumps(r) for r in rows)
    elif suffix == ".json":
        body = json.dumps(rows)
    else:
        import pandas as pd
        body = pd.DataFrame(rows).to_csv(index=False)
    path.write_text(BOM + body, encoding="utf-8")  # Excel's "CSV UTF-8", Notepad's "UTF-8 with BOM"
    field = None if suffix == ".txt" else "text"
    texts = list(iter_texts(_config(path, text_field=field), tokenizer))
    assert texts[0].startswith(SAMPLE_TEXT[:40])  # no mark glued to the first text or field name
    assert load_calibration(_config(path, text_field=field), tokenizer).sequences.shape == (4, 16)


def test_field_names_in_messages_show_hidden_characters(tmp_path, tokenizer):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"text ": "alpha " * 50, "source": "web"}) + "\n")
    with pytest.raises(CalibrationError, match=r"field 'text' not found; records have: 'text ', 'source'"):
        list(iter_texts(_config(path, text_field="text"), tokenizer))


@pytest.fixture
def strict_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = STRICT_CHAT_TEMPLATE
    return tok


def _chat(*turns):
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def test_chats_a_strict_template_refuses_are_folded_or_made_plain_and_counted(tmp_path, strict_tokenizer):
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        _chat(("user", "hi"), ("assistant", "hello")),
        _chat(("system", "Be brief."), ("user", "hi"), ("user", "again"), ("assistant", "hello")),
        _chat(("assistant", "I start."), ("user", "no")),  # cannot alternate from the user: plain text
    ]))
    tally = TemplateTally()
    texts = list(iter_texts(_config(path), strict_tokenizer, tally))
    assert texts == ["<user>hi<assistant>hello",
                     "<user>Be brief.\n\nhi\n\nagain<assistant>hello",
                     "assistant: I start.\n\nuser: no"]
    assert (tally.chats, tally.folded, tally.plain) == (3, 1, 1)
    assert tally.warning() == ("the chat template refused 2 of 3 chat records (first: record 2, 'System role not "
                               "supported'); used 1 with system turns folded into the first user turn and repeated "
                               "roles merged and 1 as plain 'role: content' text")


def test_load_calibration_reports_refused_chats(tmp_path, strict_tokenizer, tokenizer):
    path = tmp_path / "system.jsonl"
    path.write_text("\n".join(json.dumps(_chat(("system", "Be brief."), ("user", SAMPLE_TEXT[:100])))
                               for _ in range(3)))  # short: all three are read for the budget
    data = load_calibration(_config(path), strict_tokenizer)
    assert data.warnings == [("the chat template refused 3 of 3 chat records (first: record 1, 'System role not "
                              "supported'); used 3 with system turns folded into the first user turn and repeated "
                              "roles merged")]
    assert load_calibration(_config(path), tokenizer).warnings == []  # a lenient template takes them as they are


@pytest.mark.parametrize("content, message", [
    (b"", "fewer than one sequence"),
    (b"\x00\x01\x02binary\x00junk" * 100, "looks binary"),
    (b"\xff\xfe\xfa not utf-8 " * 100, "not UTF-8"),
])
def test_bad_files_give_clear_errors(tmp_path, tokenizer, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CalibrationError, match=message):
        load_calibration(_config(path), tokenizer)


def test_csv_must_be_text_and_big_json_is_refused_before_it_is_read(tmp_path, tokenizer, monkeypatch):
    import lillama_core.data.calibration as calibration

    junk = tmp_path / "junk.csv"
    junk.write_bytes(b"text\n" + bytes(range(256)) * 8)
    with pytest.raises(CalibrationError, match="looks binary"):
        load_calibration(_config(junk, text_field="text"), tokenizer)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"text\n" + "caf\u00e9 ".encode("latin-1") * 2000)
    with pytest.raises(CalibrationError, match="not UTF-8"):
        load_calibration(_config(latin, text_field="text"), tokenizer)
    big = tmp_path / "big.json"
    big.write_text(json.dumps([{"text": SAMPLE_TEXT}] * 50))
    monkeypatch.setattr(calibration, "JSON_MAX_BYTES", 1000)
    with pytest.raises(CalibrationError, match="convert it to .jsonl"):
        load_calibration(_config(big), tokenizer)


def test_missing_file_and_unknown_type(tmp_path, tokenizer):
    with pytest.raises(CalibrationError, match="not found"):
        load_calibration(_config(tmp_path / "nope.txt"), tokenizer)
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    with pytest.raises(CalibrationError, match="unsupported file type"):
        load_calibration(_config(odd), tokenizer)


def test_budget_larger_than_the_data_is_an_error(tmp_path, tokenizer):
    path = tmp_path / "small.txt"
    path.write_text(SAMPLE_TEXT)
    with pytest.raises(CalibrationError, match="budget asks for"):
        load_calibration(_config(path, tokens=100_000), tokenizer)


def test_unreachable_dataset_is_a_clear_error(tokenizer):
    with pytest.raises(CalibrationError, match="could not read dataset"):
        load_calibration(_config("someone/no-such-dataset-xyz"), tokenizer)


def test_sampling_is_seeded(tokenizer):
    texts = [SAMPLE_TEXT] * 4
    a = build_sequences(texts, tokenizer, 64, 16, seed=1)
    b = build_sequences(texts, tokenizer, 64, 16, seed=1)
    c = build_sequences(texts, tokenizer, 64, 16, seed=2)
    assert (a.sequences == b.sequences).all()
    assert not (a.sequences == c.sequences).all()


def test_huge_files_are_read_only_as_far_as_the_budget_needs(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "huge.txt"
    with path.open("w") as handle:
        for _ in range(2000):
            handle.write(SAMPLE_TEXT + "\n")  # ~3 MB
    chunks = []
    import lillama_core.data.calibration as calibration

    real = calibration._text_file

    def counting(p):
        for chunk in real(p):
            chunks.append(len(chunk))
            yield chunk

    monkeypatch.setitem(calibration.FILE_READERS, ".txt", counting)
    load_calibration(_config(path), tokenizer)
    assert sum(chunks) < path.stat().st_size / 10


def test_preview_selection_and_model_inputs(tokenizer):
    shown = preview(CalibrationConfig(), tokenizer, count=2, chars=50)
    assert len(shown) == 2 and all(len(s) <= 50 for s in shown)
    data = CalibrationData(build_sequences([SAMPLE_TEXT] * 4, tokenizer, 64, 16, 0).sequences, "x", 0)
    assert data.first_tokens(40).sequences.shape == (2, 16) and data.first_tokens(1).sequences.shape[0] == 2
    assert torch.equal(data.select(torch.tensor([3, 1])).sequences, data.sequences[[3, 1]])
    assert data.model_inputs(slice(1, 3), torch.device("cpu")).keys() == {"input_ids"}
    # Speech models get their audio features with the decoder's token ids, row for row.
    features = torch.arange(4.0).view(4, 1, 1).expand(4, 2, 3)
    speech = CalibrationData(data.sequences, "clips", 0, {"input_features": features},
                             sequence_input="decoder_input_ids")
    inputs = speech.select(slice(2, 4)).model_inputs(slice(0, 2), torch.device("cpu"))
    assert torch.equal(inputs["decoder_input_ids"], data.sequences[2:4])
    assert inputs["input_features"][:, 0, 0].tolist() == [2.0, 3.0]


def test_eval_text_is_wikitext_test():
    text = read_eval_text()
    assert text.startswith(" \n = Robert <unk> = ") and len(text) > 1_000_000


def test_raw_records_streams_jsonl_lazily(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n{broken\n")
    records = raw_records(_config(path))
    assert next(records) == {"text": "a"}
    with pytest.raises(CalibrationError, match="line 2"):
        next(records)


def test_sequences_and_eval_windows_start_with_the_tokenizers_bos(tokenizer):
    """Models whose tokenizer adds <bos> (Gemma, Llama) see it first in every calibration and evaluation
    sequence; tokenizers that add none (SmolLM2) get plain windows of text."""
    from tiny import tiny_tokenizer
    from tokenizers.processors import TemplateProcessing

    from lillama_core.data.calibration import leading_tokens
    from lillama_core.metrics.perplexity import eval_windows

    with_bos = tiny_tokenizer()
    bos = with_bos.convert_tokens_to_ids("<eos>")
    with_bos.backend_tokenizer.post_processor = TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", bos)])
    assert leading_tokens(with_bos) == [bos] and leading_tokens(tokenizer) == []
    data = build_sequences([SAMPLE_TEXT] * 4, with_bos, 64, 16, 0)
    assert data.sequences.shape == (4, 16) and (data.sequences[:, 0] == bos).all()
    text = with_bos(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    windows = eval_windows(with_bos, SAMPLE_TEXT, 45, 16)
    assert windows.tolist() == [[bos] + text[0:15], [bos] + text[15:30], [bos] + text[30:45]]
    plain = eval_windows(tokenizer, SAMPLE_TEXT, 48, 16)
    assert plain.flatten().tolist() == tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"][:48]
