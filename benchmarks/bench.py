"""One model under test: loaded once, with calibration sets, whitened spectra, evaluation windows and
the teacher's perplexity cached, so many methods and reductions share the work."""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lillama_core.compress.heal import heal
from lillama_core.compress.loop import Compressor
from lillama_core.config import CalibrationConfig, ModelConfig, PlanConfig
from lillama_core.data.calibration import DEFAULT_EVAL_TEXT, CalibrationData, load_calibration, read_eval_text
from lillama_core.data.generated import self_generate
from lillama_core.events import LayerFinished, Step
from lillama_core.metrics.evaluate import evaluate
from lillama_core.metrics.perplexity import eval_windows
from lillama_core.metrics.record import EvalRecord
from lillama_core.modeling.loading import load_model
from lillama_core.planning.planner import compute_spectra
from lillama_core.planning.ranks import ModelShape, RankPlan, build_plan, reduction_target, summarize
from lillama_core.planning.strategies import SENSITIVITY_TOKENS, SPECTRA_TOKENS

from .common import PeakMemory, environment
from .methods import Recipe, describe_recipe, resolve_overrides


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Budget:
    tokens: int = 16_384  # calibration tokens, the same for every method
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    eval_tokens: int = 8_192  # WikiText-2 test tokens scored
    eval_seq_len: int = 512
    eval_batch: int = 4
    generated: float = 0.0  # share of calibration sequences the teacher writes (data/generated.py)

    def calibration(self, tokens: int | None = None) -> CalibrationConfig:
        return CalibrationConfig(tokens=tokens or self.tokens, seq_len=self.seq_len, batch_size=self.batch_size,
                                 seed=self.seed, generated=self.generated)


class LeakError(RuntimeError):
    pass


def calibration_overlap(calibration: CalibrationData, tokenizer, eval_text: str, samples: int = 64,
                        chars: int = 160) -> float:
    """Share of sampled calibration snippets found verbatim in the evaluation text (should be ~0)."""
    hits = total = 0
    for row in calibration.sequences[:samples]:
        text = tokenizer.decode(row.tolist())
        middle = text[len(text) // 4: len(text) // 4 + chars]
        if len(middle.strip()) < chars // 2:
            continue
        total += 1
        hits += middle in eval_text
    return hits / max(total, 1)


class Bench:
    def __init__(self, model: str, budget: Budget, device: str = "auto", dtype: str = "auto"):
        self.budget = budget
        start = time.time()
        log(f"loading {model}")
        self.loaded = load_model(ModelConfig(name=model, device=device, dtype=dtype))
        self.load_seconds = time.time() - start
        self.model_name = model
        self.device = self.loaded.device
        self.shape = ModelShape.of(self.loaded.model)
        self.eval_text = read_eval_text()
        self._calibration: dict[int, CalibrationData] = {}
        self._overlap: dict[int, float] = {}
        self._generated: dict[int, CalibrationData] = {}
        self._generation_seconds: dict[int, float] = {}
        self._spectra: dict[int, tuple[dict, float]] = {}
        self._damage: dict[tuple, tuple[dict, float]] = {}
        self._windows: dict[tuple[int, int], torch.Tensor] = {}
        self._teacher_ppl: dict[tuple[int, int], dict] = {}

    # ---- cached inputs ----

    def calibration(self, tokens: int | None = None) -> CalibrationData:
        tokens = tokens or self.budget.tokens
        if tokens not in self._calibration:
            config = self.budget.calibration(tokens)
            if config.source != "default" and Path(config.source).resolve() == Path(DEFAULT_EVAL_TEXT).resolve():
                raise LeakError("calibration source is the evaluation text")
            data = load_calibration(config, self.loaded.tokenizer)
            overlap = calibration_overlap(data, self.loaded.tokenizer, self.eval_text)
            if overlap > 0.05:
                raise LeakError(f"{overlap:.0%} of sampled calibration snippets appear in the test text")
            self._calibration[tokens], self._overlap[tokens] = data, overlap
        return self._calibration[tokens]

    def training_calibration(self, tokens: int | None = None) -> CalibrationData:
        """What the layers train on: `calibration(tokens)` with the budget's generated share written by the
        teacher, as the pipeline does (plans, like the pipeline's, measure the real text)."""
        tokens = tokens or self.budget.tokens
        if tokens not in self._generated:
            start = time.time()
            self._generated[tokens] = self_generate(self.loaded.model, self.calibration(tokens),
                                                    self.budget.generated, self.budget.seed)
            self._generation_seconds[tokens] = time.time() - start
        return self._generated[tokens]

    def windows(self) -> torch.Tensor:
        key = (self.budget.eval_tokens, self.budget.eval_seq_len)
        if key not in self._windows:
            self._windows[key] = eval_windows(self.loaded.tokenizer, self.eval_text, *key)
        return self._windows[key]

    def spectra(self, tokens: int | None = None) -> tuple[dict, float]:
        """Whitened spectra exactly as make_plan computes them (first SPECTRA_TOKENS of the calibration)."""
        tokens = tokens or self.budget.tokens
        if tokens not in self._spectra:
            calibration = self.calibration(tokens)
            subset = calibration.first_tokens(SPECTRA_TOKENS)
            start = time.time()
            spectra = compute_spectra(self.loaded, self.shape, subset, self.budget.batch_size, True)
            self._spectra[tokens] = (spectra, time.time() - start)
        return self._spectra[tokens]

    def damage(self, config: PlanConfig, tokens: int | None = None) -> tuple[dict, float]:
        """Per-layer sensitivity exactly as make_plan measures it (first SENSITIVITY_TOKENS, the same rungs)."""
        from lillama_core.planning.sensitivity import measure_sensitivity, probe_keeps

        keeps = probe_keeps(self.shape, config.groups, reduction_target(self.shape, config))
        key = (tokens or self.budget.tokens, tuple(config.groups), keeps)
        if key not in self._damage:
            calibration = self.calibration(key[0])
            subset = calibration.first_tokens(SENSITIVITY_TOKENS)
            start = time.time()
            damage = measure_sensitivity(self.loaded, subset, list(config.groups), keeps,
                                         batch_size=self.budget.batch_size)
            self._damage[key] = (damage, time.time() - start)
        return self._damage[key]

    # ---- plans ----

    def plan(self, config: PlanConfig, tokens: int | None = None, exact: bool = True) -> tuple[RankPlan, float, dict]:
        """The plan make_plan would build, from cached spectra; with `exact`, a plan whose overrides
        keep modules dense is re-targeted (bisection on the reduction asked of the strategy) so the
        real reduction is not below the target. Returns (plan, planning seconds, notes)."""
        spectra, damage, seconds = None, None, 0.0
        config = dataclasses.replace(config, overrides=resolve_overrides(config.overrides, self.shape.num_layers))
        if config.strategy == "energy" and config.rank is None:
            if config.whitened_energy:
                spectra, seconds = self.spectra(tokens)
            else:
                from lillama_core.factorize.svd import spectrum
                spectra = {m.name: spectrum(self.loaded.model.get_submodule(m.name).weight.detach())
                           for m in self.shape.modules}
        if config.strategy == "sensitivity" and config.rank is None:
            damage, seconds = self.damage(config, tokens)
        plan = build_plan(self.shape, config, spectra, damage)
        target = config.reduction
        notes = {"strategy_reduction": target, "overrides": dict(config.overrides)}
        if exact and target is not None and config.overrides:
            actual = summarize(plan, self.shape).reduction
            if actual < target - 1e-4:
                lo, hi = target, 0.95
                best = None
                for _ in range(40):
                    mid = (lo + hi) / 2
                    try:
                        candidate = build_plan(self.shape, dataclasses.replace(config, reduction=mid), spectra,
                                               damage)
                    except Exception:
                        hi = mid
                        continue
                    if summarize(candidate, self.shape).reduction >= target:
                        best, hi = (candidate, mid), mid
                    else:
                        lo = mid
                    if hi - lo < 1e-5:
                        break
                if best is None:
                    raise RuntimeError(f"cannot reach {target:.0%} with overrides {config.overrides}")
                plan, notes["strategy_reduction"] = best[0], best[1]
                plan.target_reduction = target
        return plan, seconds, notes

    # ---- measurements ----

    def evaluate(self, model) -> EvalRecord:
        """Quality on the cached evaluation windows (speed and size are measured by their own suites)."""
        return evaluate(model, self.loaded.tokenizer, self.loaded.task, self.windows(), self.budget.eval_batch,
                        size=False)

    def teacher_perplexity(self) -> dict:
        key = (self.budget.eval_tokens, self.budget.eval_seq_len)
        if key not in self._teacher_ppl:
            log(f"teacher perplexity on {key[0]} tokens (seq {key[1]})")
            result = self.evaluate(self.loaded.model)
            self._teacher_ppl[key] = {"ppl": result.perplexity, "nll": result.nll,
                                      "eval_tokens_scored": result.tokens_scored, "eval_seconds": result.eval_seconds}
        return self._teacher_ppl[key]

    def base_record(self) -> dict:
        b = self.budget
        return {
            "model": self.model_name,
            "device": str(self.device),
            "dtype": str(self.loaded.dtype).replace("torch.", ""),
            "params_total": self.shape.total_params,
            "eval": {"text": "wikitext-2 test (assets/eval/wikitext2_test.txt)", "tokens": b.eval_tokens,
                     "seq_len": b.eval_seq_len},
            "env": environment(self.device),
        }

    def run_teacher(self) -> dict:
        ppl = self.teacher_perplexity()
        return {**self.base_record(), "method": "teacher", "target_reduction": 0.0, "reduction": 0.0,
                "params_after": self.shape.total_params, "tokens": 0, **ppl, "compress_seconds": 0.0}

    def run_recipe(self, recipe: Recipe, reduction: float, tokens: int | None = None, label: str | None = None,
                   extra: dict | None = None, inspect=None) -> dict:
        """Plan, compress (then heal, if the recipe says so) and evaluate one recipe at one target reduction;
        returns the record. `inspect(student)` may add fields measured on the student before it is freed."""
        if recipe.teacher:
            record = self.run_teacher()
            record.update(extra or {})
            return record
        tokens = tokens or self.budget.tokens
        calibration = self.training_calibration(tokens)
        plan_config = recipe.plan_config(reduction)
        distill_config = recipe.distill_config()
        name = label or recipe.name
        log(f"{self.model_name} | {name} | target {reduction:.0%} | {calibration.tokens} calibration tokens")
        events = {"layers": [], "rates": []}

        def on_event(event):
            if isinstance(event, LayerFinished):
                events["layers"].append(event)
                log(f"  layer {event.layer:2d}: held-out loss {event.init_loss:.4f} -> {event.best_loss:.4f} "
                    f"(step {event.best_step}, {event.seconds:.1f}s)")
            elif isinstance(event, Step) and event.tokens_per_s > 0:
                events["rates"].append(event.tokens_per_s)

        gc.collect()
        with PeakMemory(self.device) as memory:
            plan_start = time.time()
            plan, spectra_seconds, notes = self.plan(plan_config, tokens, recipe.exact)
            plan_seconds = time.time() - plan_start + spectra_seconds  # cached spectra still cost their time once
            summary = summarize(plan, self.shape)
            compressor = Compressor(self.loaded, calibration, plan, distill_config, self.budget.batch_size,
                                    on_event, seed=self.budget.seed)
            result = compressor.run()
            heal_config = recipe.heal_config()
            heal_metrics, heal_seconds = {}, 0.0
            if heal_config.tokens and result.applied.ranks:
                log(f"  healing on {heal_config.tokens} tokens")
                heal_start = time.time()
                heal_metrics = heal(result.student, self.loaded.model, calibration, heal_config)
                heal_seconds = time.time() - heal_start
        applied = summarize(result.applied, self.shape)
        layers = [e.layer for e in events["layers"]]
        n = calibration.sequences.shape[0]
        from lillama_core.compress.loop import held_out_count
        train_tokens = (n - held_out_count(n)) * calibration.sequences.shape[1] * distill_config.epochs
        layer_tokens = train_tokens * len(layers) if distill_config.train else 0
        log(f"  compressed in {result.seconds:.1f}s; evaluating")
        ppl = self.evaluate(result.student)
        record = {
            **self.base_record(),
            "method": name,
            "recipe": recipe.name,
            "description": recipe.description,
            "target_reduction": reduction,
            "reduction": applied.reduction,
            "planned_reduction": summary.reduction,
            "params_after": applied.params_after,
            "weight_bytes_after": applied.weight_bytes_after,
            "strategy": plan.strategy,
            "strategy_reduction": notes["strategy_reduction"],
            "layers_compressed": layers,
            "modules_compressed": len(plan.ranks),
            "ranks": plan.ranks,
            "tokens": calibration.tokens,
            "calibration": {**dataclasses.asdict(self.budget.calibration(tokens)),
                            "sequences": n, "held_out_sequences": held_out_count(n),
                            "test_overlap": self._overlap.get(tokens),
                            "generation_seconds": self._generation_seconds.get(tokens)},
            **describe_recipe(recipe),
            "ppl": ppl.perplexity,
            "nll": ppl.nll,
            "eval_tokens_scored": ppl.tokens_scored,
            "eval_seconds": ppl.eval_seconds,
            "plan_seconds": plan_seconds,
            "compress_seconds": result.seconds,
            "heal_seconds": heal_seconds,
            "heal": heal_metrics,
            "total_seconds": plan_seconds + result.seconds + heal_seconds,
            "distill_tokens_per_s": layer_tokens / result.seconds if layer_tokens and result.seconds else None,
            "step_tokens_per_s_median": statistics.median(events["rates"]) if events["rates"] else None,
            **memory.as_dict("compress"),
            "layer_losses": [[e.layer, round(e.init_loss, 5), round(e.best_loss, 5), e.best_step,
                              round(e.seconds, 2)] for e in events["layers"]],
            "status": result.status,
        }
        # The plan config actually used (with the re-targeted reduction, when it was re-targeted).
        record["plan_config"] = {**record.get("plan_config", {}), "reduction": notes["strategy_reduction"],
                                 "overrides": notes["overrides"]}
        record.update(extra or {})
        if inspect is not None:
            record.update(inspect(result.student))
        log(f"  {name} @ {applied.reduction:.1%}: ppl {ppl.perplexity:.2f} "
            f"(compress {result.seconds:.0f}s, eval {ppl.eval_seconds:.0f}s)")
        del result, compressor
        gc.collect()
        if math.isnan(record["ppl"]):
            record["ppl"] = None
        return record

    def build_student(self, recipe: Recipe, reduction: float):
        """Training-free student with the recipe's plan: same architecture and speed as a distilled one."""
        plan_config = recipe.plan_config(reduction)
        plan, _, _ = self.plan(plan_config, exact=recipe.exact)
        distill = dataclasses.replace(recipe.distill_config(), train=False)
        result = Compressor(self.loaded, self.calibration(), plan, distill, self.budget.batch_size).run()
        return result.student, summarize(plan, self.shape)

