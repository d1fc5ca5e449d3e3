"""The quality-prediction check: plans of several strategies and levels already compressed and evaluated by the
quality and ablation suites (their records keep each plan's ranks and perplexity), scored with the training-free
damage the Ranks step predicts (planning/predict.py) from a sensitivity ladder measured here, once, through the
planning cache as the app and the CLI measure it. The report (predict_report.py) then predicts each plan's
perplexity from the others (leave one out), as the app calibrates on the runs in its history, and compares.

Only runs comparable with one another are used: one model, device type, calibration and evaluation budget, and
one recipe per group: distilled with the default recipe, or the training-free whitened factorisation."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator

from lillama_core.config import PlanConfig
from lillama_core.planning.planner import measure_for_plan
from lillama_core.planning.predict import plan_damage
from lillama_core.planning.strategies import SENSITIVITY_TOKENS

from .bench import Bench, Budget, log
from .common import read_records

SOURCES = ("quality", "ablation", "quality_check")
DEEPEST = 0.4  # the ladder is probed at the kept shares this target needs, which cover every shallower one
DEFAULT_RECIPE = {"init": "whitened", "lr": 1e-3, "loss": "joint", "schedule": "cosine"}


def _trained(record: dict) -> bool | None:
    config = record.get("distill_config") or {}
    return config.get("train", config.get("distill"))


def recipe_group(record: dict) -> str | None:
    """"distilled" (the default recipe, no healing), "training-free" (whitened factorisation) or None."""
    config = record.get("distill_config") or {}
    if config.get("init") != "whitened" or (record.get("heal_config") or {}).get("tokens"):
        return None
    if _trained(record) is False:
        return "training-free"
    if _trained(record) and all(config.get(k) == v for k, v in DEFAULT_RECIPE.items()):
        return "distilled"
    return None


def comparable(records: list[dict], model: str, budget: Budget, device: str) -> list[tuple[str, dict]]:
    """(group, record) for each distinct plan of `model` on `device` measured with `budget`'s calibration and
    evaluation tokens; a plan measured again (same ranks, same group) counts once, its first record."""
    seen, out = set(), []
    for record in records:
        group = recipe_group(record)
        if (record.get("suite") not in SOURCES or group is None or record.get("model") != model
                or str(record.get("device", "")).split(":")[0] != device or record.get("tokens") != budget.tokens
                or (record.get("eval") or {}).get("tokens") != budget.eval_tokens
                or not record.get("ranks") or not record.get("ppl")):
            continue
        key = (group, hashlib.sha256(json.dumps(record["ranks"], sort_keys=True).encode()).hexdigest())
        if key not in seen:
            seen.add(key)
            out.append((group, record))
    return out


def run_predict(model: str, budget: Budget, device: str, dtype: str) -> Iterator[dict]:
    """One record per comparable plan: where it came from, its measured perplexity (and the teacher's) and the
    training-free damage predicted for it.

    Args:
        model: a registry model, hub id or folder.
        budget: the calibration and evaluation tokens of the runs to score (and the calibration measured on).
        device, dtype: as the model config takes them.
    """
    bench = Bench(model, budget, device, dtype)
    records = read_records()
    evaluation = {"tokens": budget.eval_tokens, "seq_len": budget.eval_seq_len}
    teacher = next((r for r in records if r.get("method") == "teacher" and r.get("model") == model and r.get("ppl")
                    and str(r.get("device", "")).split(":")[0] == bench.device.type
                    and {k: (r.get("eval") or {}).get(k) for k in evaluation} == evaluation), None)
    teacher_ppl = teacher["ppl"] if teacher else bench.teacher_perplexity()["ppl"]
    config = PlanConfig(strategy="sensitivity", reduction=DEEPEST)
    events = []
    start = time.time()
    ladder = measure_for_plan(bench.loaded, config, bench.calibration(), budget.batch_size, events.append).ladder
    seconds = time.time() - start
    cached = any("reusing the stored measurement" in getattr(e, "detail", "") for e in events)
    sweep = uuid.uuid4().hex[:12]  # names this run's records, which share one ladder
    log(f"sensitivity ladder in {seconds:.0f}s: kept shares {sorted(next(iter(ladder.values())), reverse=True)}")
    for group, record in comparable(records, model, budget, bench.device.type):
        damage = plan_damage(bench.shape, record["ranks"], ladder, config.groups)
        log(f"{group:13s} {record.get('method')} ({record.get('strategy')}) @ {record['reduction']:.1%}: "
            f"damage {damage.total:.3f} nats, ppl {record['ppl']:.1f}")
        source = {k: record.get(k) for k in ("suite", "id", "method", "tag", "device")}
        yield {**bench.base_record(), "sweep": sweep, "group": group, "source": source,
               "strategy": record.get("strategy"), "target_reduction": record.get("target_reduction"),
               "reduction": record["reduction"], "overrides": (record.get("plan_config") or {}).get("overrides"),
               "ppl": record["ppl"], "teacher_ppl": teacher_ppl, "predicted_damage": damage.total,
               "interpolation_log_error": damage.log_error, "layer_keeps": {str(k): v for k, v in damage.keeps.items()},
               "ladder": {str(layer): {repr(k): v for k, v in levels.items()} for layer, levels in ladder.items()},
               "ladder_seconds": seconds, "ladder_cached": cached,
               "ladder_calibration": {"tokens": budget.tokens, "seq_len": budget.seq_len, "seed": budget.seed,
                                      "measured_tokens": SENSITIVITY_TOKENS}}
