import json
import os

import pytest
import torch
from tiny import tiny_sequences

from lillama_core.compress.loop import Compressor
from lillama_core.config import DistillConfig, PlanConfig
from lillama_core.data.calibration import CalibrationData
from lillama_core.errors import ExportError
from lillama_core.export import RECORD_FILE, export_student, load_compressed, rank_map_of
from lillama_core.modeling.shipped import LowRankLinear
from lillama_core.planning.ranks import ModelShape, build_plan


@pytest.fixture
def student(tiny):
    plan = build_plan(ModelShape.of(tiny.model), PlanConfig(strategy="uniform", rank=8, reduction=None))
    calibration = CalibrationData(tiny_sequences(16, 32), "random", 0)
    return Compressor(tiny, calibration, plan, DistillConfig(), batch_size=8).run().student


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_export_then_load_gives_the_same_logits(student, tiny, tmp_path):
    ids = tiny_sequences(2, 20, seed=7)
    folder = export_student(student, tiny.tokenizer, tmp_path / "student", record={"metrics": {"ppl": 1.0}})
    model, tokenizer = load_compressed(folder)
    torch.testing.assert_close(_logits(model, ids), _logits(student, ids))
    assert rank_map_of(model) == rank_map_of(student)
    assert json.loads((folder / RECORD_FILE).read_text())["metrics"] == {"ppl": 1.0}
    assert tokenizer("fox")["input_ids"] == tiny.tokenizer("fox")["input_ids"]
    # a reloaded student can be exported again and still loads
    again = export_student(model, tokenizer, tmp_path / "again")
    torch.testing.assert_close(_logits(load_compressed(again)[0], ids), _logits(student, ids))


def test_stock_transformers_loads_the_export_with_remote_code(student, tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = tiny_sequences(2, 20, seed=8)
    folder = export_student(student, tiny.tokenizer, tmp_path / "student")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert any(isinstance(m, torch.nn.Module) and type(m).__name__ == "LowRankLinear" for m in model.modules())
    torch.testing.assert_close(_logits(model, ids), _logits(student, ids))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in student.parameters())


def test_merged_export_is_a_plain_dense_checkpoint(student, tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = tiny_sequences(2, 20, seed=9)
    folder = export_student(student, tiny.tokenizer, tmp_path / "dense", merge=True)
    assert not (folder / "modeling_lillama.py").exists()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    torch.testing.assert_close(_logits(model, ids), _logits(student, ids), rtol=1e-4, atol=1e-4)


def test_existing_folder_is_never_silently_overwritten(student, tiny, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(ExportError, match="already exists"):
        export_student(student, tiny.tokenizer, target)
    assert (target / "keep.txt").read_text() == "precious"
    export_student(student, tiny.tokenizer, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / RECORD_FILE).exists()


def test_failed_export_leaves_no_partial_folder(student, tiny, tmp_path, monkeypatch):
    def broken_save(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(student), "save_pretrained", broken_save)
    with pytest.raises(ExportError, match="No space left"):
        export_student(student, tiny.tokenizer, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_unwritable_target_is_a_clear_error(student, tiny, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ExportError, match="cannot create"):
        export_student(student, tiny.tokenizer, blocker / "out")


def test_loading_a_folder_that_is_not_an_export_is_an_error(tmp_path):
    with pytest.raises(ExportError, match="not a Lillama export"):
        load_compressed(tmp_path)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("merge", [False, True])
def test_quantized_export_reloads_to_the_quantized_model_and_is_smaller(student, tiny, tmp_path, mode, merge):
    from transformers import AutoModelForCausalLM

    from lillama_core.modeling.quantize import quantize_weights
    from lillama_core.modeling.shipped import QuantizedLinear

    ids = tiny_sequences(2, 20, seed=10)
    plain = export_student(student, tiny.tokenizer, tmp_path / "plain", merge=merge)
    folder = export_student(student, tiny.tokenizer, tmp_path / mode, merge=merge, quantize=mode)
    expected = _logits(quantize_weights(export_student.__globals__["merged_copy"](student) if merge else student,
                                        mode), ids)
    for model in (load_compressed(folder)[0], AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)):
        assert any(isinstance(m, torch.nn.Module) and type(m).__name__ == "QuantizedLinear" for m in model.modules())
        torch.testing.assert_close(_logits(model, ids), expected)
    assert sum(isinstance(m, QuantizedLinear) for m in load_compressed(folder)[0].modules()) > 0
    weights = lambda f: (f / "model.safetensors").stat().st_size  # noqa: E731
    assert weights(folder) < 0.8 * weights(plain)
    assert json.loads((folder / RECORD_FILE).read_text())["quantize"] == mode
