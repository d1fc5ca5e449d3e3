import copy
import json
import os
from pathlib import Path

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


@pytest.fixture
def packed(student):
    from lillama_core.modeling.packs import pack_low_rank, token_inputs

    model = copy.deepcopy(student)
    pack_low_rank(model, token_inputs(model))
    return model


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
    from lillama_core.modeling.shipped import KernelLinear

    ids = tiny_sequences(2, 20, seed=10)
    plain = export_student(student, tiny.tokenizer, tmp_path / "plain", merge=merge)
    folder = export_student(student, tiny.tokenizer, tmp_path / mode, merge=merge, quantize=mode)
    expected = _logits(quantize_weights(export_student.__globals__["merged_copy"](student) if merge else student,
                                        mode), ids)
    for model in (load_compressed(folder)[0], AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)):
        assert any(type(m).__name__ == KernelLinear.__name__ for m in model.modules())  # packed for the kernels
        assert torch.equal(_logits(model, ids), expected)  # the same integers through the same kernels
    weights = lambda f: (f / "model.safetensors").stat().st_size  # noqa: E731
    assert weights(folder) < 0.8 * weights(plain)
    assert json.loads((folder / RECORD_FILE).read_text())["quantize"] == mode


RELOAD_IN_A_FRESH_PROCESS = """
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
with torch.no_grad():
    save_file({"logits": model(input_ids=load_file(sys.argv[2])["ids"]).logits}, sys.argv[3])
"""


def test_an_int4_export_gives_the_in_memory_logits_in_a_fresh_process(student, tiny, tmp_path):
    # A fresh interpreter imports only the export's shipped code and torchao, never lillama_core.
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    from lillama_core.modeling.quantize import quantize_weights

    ids = tiny_sequences(2, 20, seed=11)
    folder = export_student(student, tiny.tokenizer, tmp_path / "int4", quantize="int4")
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-c", RELOAD_IN_A_FRESH_PROCESS, str(folder), str(tmp_path / "ids.safetensors"),
                    str(tmp_path / "logits.safetensors")], check=True, env=env, cwd=tmp_path, capture_output=True)
    assert torch.equal(load_file(tmp_path / "logits.safetensors")["logits"],
                       _logits(quantize_weights(student, "int4"), ids))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_exports_of_the_hand_written_format_load_as_float_with_their_logits(mode):
    from safetensors.torch import load_file

    reference = load_file(FIXTURES / "legacy_quantized_reference.safetensors")
    model, _ = load_compressed(FIXTURES / f"legacy_{mode}_export")
    assert rank_map_of(model) == {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.mlp.down_proj": 8}
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    torch.testing.assert_close(_logits(model, reference["input_ids"]), reference[f"{mode}_logits"])


FIXTURES = Path(__file__).parents[1] / "fixtures"


def test_stock_transformers_refuses_a_compressed_export_without_remote_code(student, tiny, tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    folder = export_student(student, tiny.tokenizer, tmp_path / "student")
    for auto in (AutoConfig, AutoModel, AutoModelForCausalLM):
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            auto.from_pretrained(folder, trust_remote_code=False)
    # each Auto class the config names builds the student: the backbone gives the student's hidden states
    ids = tiny_sequences(2, 20, seed=11)
    backbone = AutoModel.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(backbone(input_ids=ids).last_hidden_state,
                                   student.model(input_ids=ids).last_hidden_state)


def test_exports_in_the_format_before_their_own_model_type_still_load():
    from safetensors.torch import load_file

    reference = load_file(FIXTURES / "v1_reference.safetensors")
    model, _ = load_compressed(FIXTURES / "v1_export")
    assert rank_map_of(model) == {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.mlp.down_proj": 8}
    torch.testing.assert_close(_logits(model, reference["input_ids"]), reference["logits"])


def test_exports_in_the_format_before_packed_factors_still_load():
    from safetensors.torch import load_file

    reference = load_file(FIXTURES / "v2_reference.safetensors")
    model, _ = load_compressed(FIXTURES / "v2_export")
    assert set(rank_map_of(model)) == {f"model.layers.0.{name}" for name in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    torch.testing.assert_close(_logits(model, reference["input_ids"]), reference["logits"])


def test_a_packed_students_export_keeps_its_packs(packed, student, tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from lillama_core.modeling.packs import packs_of

    ids = tiny_sequences(2, 20, seed=13)
    folder = export_student(packed, tiny.tokenizer, tmp_path / "packed")
    packs = packs_of(packed)
    assert len(packs) == 6 and json.loads((folder / "config.json").read_text())["lillama_packs"] == packs
    assert rank_map_of(packed) == rank_map_of(student)
    reloaded, remote = load_compressed(folder)[0], AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert packs_of(reloaded) == packs
    # the shipped file's own classes: same names, another module
    assert sum(type(m).__name__ == "PackedLowRankLinear" for m in remote.modules()) == 15
    for model in (reloaded, remote):
        torch.testing.assert_close(_logits(model, ids), _logits(student, ids))
    assert packs_of(load_compressed(export_student(reloaded, tiny.tokenizer, tmp_path / "again"))[0]) == packs
    # merged, the packs are undone: the teacher's dense layout
    dense = export_student(packed, tiny.tokenizer, tmp_path / "dense", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(dense)
    torch.testing.assert_close(_logits(merged, ids), _logits(student, ids), rtol=1e-4, atol=1e-4)
    assert packs_of(packed) == packs  # the student itself is left packed


def test_a_packed_students_quantized_export_quantizes_the_packed_factor(packed, tiny, tmp_path):
    from lillama_core.modeling.packs import packs_of
    from lillama_core.modeling.quantize import quantize_weights

    ids = tiny_sequences(2, 20, seed=14)
    folder = export_student(packed, tiny.tokenizer, tmp_path / "int8", quantize="int8")
    reloaded = load_compressed(folder)[0]
    assert packs_of(reloaded) == packs_of(packed)
    assert type(reloaded.model.layers[0].self_attn.q_proj.pack.A).__name__ == "KernelLinear"  # torchao int8 kernel
    torch.testing.assert_close(_logits(reloaded, ids), _logits(quantize_weights(packed, "int8"), ids))


def test_merged_export_of_a_reloaded_student_names_the_base_class(student, tiny, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    reloaded, tokenizer = load_compressed(export_student(student, tiny.tokenizer, tmp_path / "student"))
    folder = export_student(reloaded, tokenizer, tmp_path / "dense", merge=True)
    config = json.loads((folder / "config.json").read_text())
    assert (config["architectures"], config["model_type"], "auto_map" in config) == (["LlamaForCausalLM"], "llama",
                                                                                    False)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model) is LlamaForCausalLM
    ids = tiny_sequences(2, 20, seed=12)
    torch.testing.assert_close(_logits(model, ids), _logits(student, ids), rtol=1e-4, atol=1e-4)
    assert "teacher-sized" in (folder / "README.md").read_text()


REMOTE_CONFIG = '''
from transformers import LlamaConfig


class DoubledConfig(LlamaConfig):
    model_type = "doubled_llama"
'''
REMOTE_MODELING = '''
from transformers import LlamaForCausalLM

from .configuration_doubled import DoubledConfig


class DoubledForCausalLM(LlamaForCausalLM):
    """Llama with doubled logits: an export that loses this code loads visibly wrong."""

    config_class = DoubledConfig

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 2 * out.logits
        return out
'''


@pytest.fixture
def remote_student(tmp_path):
    """A student of a teacher whose modeling code ships in its folder, loaded with trust_remote_code."""
    from tiny import tiny_llama
    from transformers import AutoModelForCausalLM

    from lillama_core.modeling.loading import LoadedModel

    loaded = tiny_llama()
    teacher = tmp_path / "doubled-teacher"
    loaded.model.save_pretrained(teacher)
    loaded.tokenizer.save_pretrained(teacher)
    (teacher / "configuration_doubled.py").write_text(REMOTE_CONFIG)
    (teacher / "modeling_doubled.py").write_text(REMOTE_MODELING)
    config = json.loads((teacher / "config.json").read_text())
    config.update(model_type="doubled_llama", architectures=["DoubledForCausalLM"],
                  auto_map={"AutoConfig": "configuration_doubled.DoubledConfig",
                            "AutoModelForCausalLM": "modeling_doubled.DoubledForCausalLM"})
    (teacher / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(teacher, trust_remote_code=True).eval()
    plan = build_plan(ModelShape.of(model), PlanConfig(strategy="uniform", rank=8, reduction=None))
    teacher_model = LoadedModel(model, loaded.tokenizer, str(teacher), str(teacher), torch.device("cpu"), torch.float32)
    calibration = CalibrationData(tiny_sequences(8, 16), "random", 0)
    return Compressor(teacher_model, calibration, plan, DistillConfig(), batch_size=8).run().student, loaded.tokenizer


def _logits_in_a_fresh_process(folder, ids, cache):
    """Logits and low-rank module count of `folder` loaded by stock transformers in a new interpreter whose
    modules cache is empty, as on another machine."""
    import subprocess
    import sys

    code = (f"import torch, transformers\n"
            f"m = transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
            f"n = sum(type(x).__name__ == 'LowRankLinear' for x in m.modules())\n"
            f"with torch.no_grad():\n"
            f"    torch.save((m(input_ids=torch.tensor({ids.tolist()})).logits, n), {str(cache / 'out.pt')!r})\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(cache / "out.pt")


def test_export_of_a_remote_code_teacher_carries_its_code_and_reloads_in_a_fresh_process(remote_student, tmp_path):
    student, tokenizer = remote_student
    ids = tiny_sequences(2, 12, seed=13)
    folder = export_student(student, tokenizer, tmp_path / "export")
    assert {"modeling_doubled.py", "configuration_doubled.py"} <= set(os.listdir(folder))
    assert "transformers_modules" not in (folder / "modeling_lillama.py").read_text()
    logits, low_rank = _logits_in_a_fresh_process(folder, ids, tmp_path / "fresh-cache")
    assert low_rank == len(rank_map_of(student)) > 0
    torch.testing.assert_close(logits, _logits(student, ids))
    # lillama_core reloads it only with remote code allowed, and re-exports it
    with pytest.raises(ExportError, match="trust_remote_code"):
        load_compressed(folder)
    reloaded, _ = load_compressed(folder, trust_remote_code=True)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(student, ids))
    again = export_student(reloaded, tokenizer, tmp_path / "again")
    assert {"modeling_doubled.py", "configuration_doubled.py"} <= set(os.listdir(again))
    torch.testing.assert_close(_logits(load_compressed(again, trust_remote_code=True)[0], ids), _logits(student, ids))


def test_cli_opens_a_remote_code_export_with_trust_remote_code(remote_student, tmp_path, capsys):
    from lillama_core.cli import main

    student, tokenizer = remote_student
    folder = export_student(student, tokenizer, tmp_path / "export")
    assert main(["export", str(folder), "--out", str(tmp_path / "refused")]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    assert main(["export", str(folder), "--out", str(tmp_path / "again"), "--trust-remote-code"]) == 0
    ids = tiny_sequences(2, 12, seed=14)
    torch.testing.assert_close(_logits(load_compressed(tmp_path / "again", trust_remote_code=True)[0], ids),
                               _logits(student, ids))
    assert main(["chat", "--model", str(folder), "--trust-remote-code", "--prompt", "fox", "--max-new-tokens", "2",
                 "--device", "cpu"]) == 0


def test_a_class_whose_code_an_export_cannot_carry_is_refused_at_export(student, tiny, tmp_path):
    student.__class__ = type("LocalLlamaForCausalLM", (type(student),), {})  # defined here, not in a model folder
    with pytest.raises(ExportError, match="cannot carry"):
        export_student(student, tiny.tokenizer, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_every_export_has_a_model_card_with_metrics_plan_loading_and_the_teachers_licence(student, tiny, tmp_path):
    from huggingface_hub import ModelCard

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "README.md").write_text("---\nlicense: gemma\n---\n# A Gemma teacher\n")
    (teacher / "LICENSE").write_text("the teacher's terms")
    record = {"config": {"model": {"name": str(teacher)}, "plan": {"strategy": "uniform"}},
              "metrics": {"teacher_ppl": 36.9, "student_ppl": 48.25, "params_before": 1000, "params_after": 800,
                          "reduction": 0.2}}
    folder = export_student(student, tiny.tokenizer, tmp_path / "student", record=record)
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "gemma"
    assert "| perplexity (held-out text) | 36.90 | 48.25 |" in card.text
    assert "1,000 -> 800 (20.0% fewer" in card.text and "`uniform` strategy" in card.text
    assert f"{len(rank_map_of(student))} linear modules factorised, ranks 8 to 8" in card.text
    assert 'AutoModelForCausalLM.from_pretrained("student", trust_remote_code=True)' in card.text
    assert "Remote code" in card.text
    assert (folder / "LICENSE").read_text() == "the teacher's terms"
    assert "subject to the Gemma Terms of Use" in (folder / "NOTICE").read_text()
    merged = ModelCard.load(export_student(student, tiny.tokenizer, tmp_path / "dense", merge=True, record=record)
                            / "README.md")
    assert "teacher-sized" in merged.text and "trust_remote_code" not in merged.text


def test_scores_measured_after_export_reach_the_record_and_the_card(student, tiny, tmp_path):
    import shutil

    from huggingface_hub import ModelCard

    from lillama_core.export import read_record, update_export_metrics

    folder = export_student(student, tiny.tokenizer, tmp_path / "student", record={"metrics": {"tokens": 512}})
    assert "No evaluation was recorded" in ModelCard.load(folder / "README.md").text
    update_export_metrics(folder, {"tokens": 512, "teacher_ppl": 30.0, "student_ppl": 41.5})
    assert read_record(folder)["metrics"]["student_ppl"] == 41.5
    card = ModelCard.load(folder / "README.md").text
    assert "| perplexity (held-out text) | 30.00 | 41.50 |" in card
    assert 'AutoModelForCausalLM.from_pretrained("student", trust_remote_code=True)' in card
    old = shutil.copytree(FIXTURES / "v2_export", tmp_path / "v2")  # its record lacks what the card needs
    before = read_record(old)
    with pytest.raises(ExportError, match="older version"):
        update_export_metrics(old, {"student_ppl": 1.0})
    assert read_record(old) == before


def test_built_in_teachers_terms_come_from_their_packages():
    from lillama_core.model_card import teacher_terms

    gemma = teacher_terms("gemma3-270m")
    assert gemma.licence == "gemma" and "ai.google.dev/gemma/terms" in gemma.notice
    assert "GEMMA_TERMS.html" in {p.name for p in gemma.files}
    smollm = teacher_terms("smollm2-135m-instruct")
    assert smollm.licence == "apache-2.0" and smollm.notice is None and smollm.files


def test_merged_export_of_a_reloaded_remote_code_student_carries_the_teachers_code(remote_student, tmp_path):
    student, tokenizer = remote_student
    reloaded, _ = load_compressed(export_student(student, tokenizer, tmp_path / "export"), trust_remote_code=True)
    folder = export_student(reloaded, tokenizer, tmp_path / "dense", merge=True)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["DoubledForCausalLM"] and config["model_type"] == "doubled_llama"
    ids = tiny_sequences(2, 12, seed=15)
    logits, low_rank = _logits_in_a_fresh_process(folder, ids, tmp_path / "fresh-cache")
    assert low_rank == 0
    torch.testing.assert_close(logits, _logits(student, ids), rtol=1e-4, atol=1e-4)


def test_a_reloaded_speech_export_generates_as_the_student_does(tmp_path):
    """transformers branches on config.model_type (Whisper keeps a decoder prompt as given only for "whisper"):
    the export's own model_type must not change how the student generates."""
    import copy

    from tiny import tiny_whisper

    from lillama_core.modeling.shipped import apply_rank_map

    whisper = tiny_whisper()
    student = apply_rank_map(copy.deepcopy(whisper.model), {"model.decoder.layers.0.fc1": 8})
    for factor in (student.model.decoder.layers[0].fc1.A, student.model.decoder.layers[0].fc1.B):
        torch.nn.init.normal_(factor.weight, std=0.3, generator=torch.Generator().manual_seed(0))
    folder = export_student(student, whisper.tokenizer, tmp_path / "whisper",
                            feature_extractor=whisper.feature_extractor)
    reloaded, _ = load_compressed(folder)
    features = torch.randn(2, 16, 100, generator=torch.Generator().manual_seed(1))
    prompt = torch.tensor([[7, 5, 6]] * 2)  # a decoder prompt that does not start with the start token
    expected, got = (m.generate(input_features=features, decoder_input_ids=prompt, max_new_tokens=6, do_sample=False)
                     for m in (student, reloaded))
    assert torch.equal(got, expected)
