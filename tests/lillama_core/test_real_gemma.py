"""The second real architecture: the built-in Gemma-3 270M (GGUF), compressed, evaluated, exported and
reloaded on CPU. Its 262k-token vocabulary makes the embeddings most of the model, so only blocks shrink."""

import math

import pytest
import torch

from lillama_core.compress.loop import Compressor
from lillama_core.config import CalibrationConfig, DistillConfig, PlanConfig
from lillama_core.data.calibration import load_calibration, read_eval_text
from lillama_core.export import export_student, load_compressed
from lillama_core.metrics.perplexity import eval_windows, perplexity
from lillama_core.modeling.loading import load_model
from lillama_core.planning.planner import make_plan
from lillama_core.planning.ranks import ModelShape

pytestmark = pytest.mark.real_model


def test_gemma3_compress_evaluate_export_reload(tmp_path):
    gemma = load_model(name="gemma3-270m", device="cpu")
    shape = ModelShape.of(gemma.model)
    assert gemma.model.config.model_type == "gemma3_text" and shape.num_layers == 18
    calibration = load_calibration(CalibrationConfig(tokens=2048, seq_len=128), gemma.tokenizer)
    plan = make_plan(gemma, PlanConfig(strategy="bottom", reduction=0.02))
    run = Compressor(gemma, calibration, plan, DistillConfig(), batch_size=4).run()
    assert run.status == "completed" and run.applied.layers(shape) == plan.layers(shape) == [0, 1]
    assert all(layer.best_loss <= layer.init_loss for layer in run.layers)

    windows = eval_windows(gemma.tokenizer, read_eval_text(), 1024, 256)
    teacher_ppl = perplexity(gemma.model, windows).perplexity
    student_ppl = perplexity(run.student, windows).perplexity
    assert math.isfinite(student_ppl) and teacher_ppl < student_ppl < 2 * teacher_ppl

    folder = export_student(run.student, gemma.tokenizer, tmp_path / "gemma-student")
    reloaded, tokenizer = load_compressed(folder)
    assert tokenizer.vocab_size == gemma.tokenizer.vocab_size
    ids = windows[:1, :64]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, run.student(input_ids=ids).logits)
