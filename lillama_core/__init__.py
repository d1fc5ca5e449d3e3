"""Lillama Studio engine: low-rank feature distillation of language models.

    from lillama_core import RunConfig, run_pipeline, export_student, load_compressed
    result = run_pipeline(RunConfig())            # SmolLM2, built-in calibration, 20% fewer parameters
    export_student(result.run.student, result.loaded.tokenizer, "out/smollm2-20pct")
    model, tokenizer = load_compressed("out/smollm2-20pct")
"""

from .config import CalibrationConfig, DistillConfig, EvalConfig, ModelConfig, PlanConfig, RunConfig
from .errors import LillamaError
from .export import export_student, load_compressed
from .modeling.loading import BUILTIN_MODELS, load_model
from .pipeline import run_pipeline
from .planning.ranks import RankPlan

__all__ = [
    "BUILTIN_MODELS", "CalibrationConfig", "DistillConfig", "EvalConfig", "LillamaError", "ModelConfig",
    "PlanConfig", "RankPlan", "RunConfig", "export_student", "load_compressed", "load_model", "run_pipeline",
]
