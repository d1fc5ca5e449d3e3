"""The methods compared: each is a PlanConfig + DistillConfig recipe applied at a target reduction.

- teacher:   the uncompressed model.
- svd:       plain truncated SVD of every weight, one rank everywhere (uniform), no training.
- whitened:  activation-whitened SVD (SVD-LLM style: truncation on W·L with L Lᵀ = XᵀX), uniform rank,
             no training.
- paper:     the published Lillama recipe: SVD init, AdamW lr 8.6e-5 (constant), batch 8,
             Teacher+Student ("joint") loss, bottom-first layer selection (engine's layer_keep 0.4).
- ours:      the engine's shipped defaults, PlanConfig() and DistillConfig() untouched, so this row tracks
             whatever the engine defaults are when the benchmark runs (sensitivity-aware ranks in multiples of 8,
             whitened init, AdamW 1e-3 cosine, joint loss). Records from before the multiple of 8 (stop 13)
             used exact ranks: their plan_config says so.
- ours-uniform: the defaults on a uniform-rank plan instead of the sensitivity one.
- ours-r<N>:  the defaults with every rank rounded to a multiple of N (ours-r8, ours-r64), for speed runs.
- tuned:     the best hand-made recipe of the CPU ablations (uniform ranks with the first and last layers
             dense); the sensitivity plan finds those fragile layers by itself and is now the default.

Overrides that keep modules dense (e.g. layer 0) would otherwise make a plan fall short of its target;
recipes with `exact=True` re-target the plan so the real reduction matches the one asked for.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from lillama_core.config import DistillConfig, HealConfig, PlanConfig


@dataclass
class Recipe:
    name: str
    plan: dict = field(default_factory=dict)  # PlanConfig fields except reduction
    distill: dict = field(default_factory=dict)  # DistillConfig fields
    description: str = ""
    exact: bool = True  # re-target so overrides do not lower the real reduction
    teacher: bool = False
    heal: dict = field(default_factory=dict)  # HealConfig fields; tokens 0 = no healing stage

    def plan_config(self, reduction: float) -> PlanConfig:
        return PlanConfig(reduction=reduction, **copy.deepcopy(self.plan))

    def distill_config(self) -> DistillConfig:
        return DistillConfig(**copy.deepcopy(self.distill))

    def heal_config(self) -> HealConfig:
        return HealConfig(**copy.deepcopy(self.heal))

    def with_changes(self, name: str, plan: dict | None = None, distill: dict | None = None,
                     description: str = "", heal: dict | None = None) -> Recipe:
        return Recipe(name, {**copy.deepcopy(self.plan), **(plan or {})},
                      {**copy.deepcopy(self.distill), **(distill or {})},
                      description or self.description, self.exact, self.teacher,
                      {**copy.deepcopy(self.heal), **(heal or {})})


# Layer 0 of SmolLM2 is by far the most sensitive block (alone at 30% kept weights: ppl 36 -> 214).
PROTECT_FIRST = {"*.layers.0.*": None}
# "{last}" is replaced by the index of the model's last block when the plan is built (see resolve_overrides).
PROTECT_LAST = {"*.layers.{last}.*": None}


def resolve_overrides(overrides: dict, num_layers: int) -> dict:
    return {k.replace("{last}", str(num_layers - 1)): v for k, v in overrides.items()}

METHODS: dict[str, Recipe] = {
    "teacher": Recipe("teacher", teacher=True, description="uncompressed model"),
    # The baselines keep exact ranks, as published; only "ours" follows the engine's rank multiple.
    "svd": Recipe("svd", {"strategy": "uniform", "rank_multiple": 1}, {"init": "svd", "train": False},
                  "plain truncated SVD, uniform rank, training-free"),
    "whitened": Recipe("whitened", {"strategy": "uniform", "rank_multiple": 1}, {"init": "whitened", "train": False},
                       "activation-whitened SVD (SVD-LLM style), uniform rank, training-free"),
    "paper": Recipe("paper", {"strategy": "bottom", "layer_keep": 0.4, "rank_multiple": 1},
                    {"init": "svd", "lr": 8.6e-5, "schedule": "constant", "warmup_steps": 0, "loss": "joint"},
                    "published Lillama recipe: SVD init, AdamW 8.6e-5, batch 8, Teacher+Student loss, bottom-first"),
    "ours": Recipe("ours", {}, {}, "the engine's shipped defaults (PlanConfig(), DistillConfig())"),
    # Whisper-base's sensitivity plan breaks free decoding before any training (README, speech): this row asks
    # what distillation gives on the plan the training-free baselines use.
    "ours-uniform": Recipe("ours-uniform", {"strategy": "uniform"}, {},
                           "the engine's defaults on a uniform-rank plan (ranks in multiples of 8)"),
    "tuned": Recipe("tuned", {"strategy": "uniform", "overrides": {**PROTECT_FIRST, **PROTECT_LAST}},
                    {"init": "whitened", "lr": 1e-3, "schedule": "constant", "loss": "student"},
                    "best hand-made CPU recipe: uniform rank with the first and last layers dense, whitened init, "
                    "distilled"),
}

DEFAULT_METHODS = ("teacher", "svd", "whitened", "paper", "ours")


ALIGNED = "ours-r"  # ours-r<N>: the defaults with every rank a multiple of N (matrix units favour aligned shapes)


def recipe(name: str) -> Recipe:
    multiple = name.removeprefix(ALIGNED)
    if name.startswith(ALIGNED) and multiple.isdigit() and int(multiple) >= 1:
        return METHODS["ours"].with_changes(name, plan={"rank_multiple": int(multiple)},
                                            description=f"the defaults with every rank a multiple of {multiple}")
    try:
        return METHODS[name]
    except KeyError:
        raise SystemExit(f"unknown method {name!r}; choose from {', '.join(METHODS)} or {ALIGNED}<N>") from None


def describe_recipe(r: Recipe) -> dict:
    """Full configs as recorded (defaults resolved), for the JSON record."""
    import dataclasses

    if r.teacher:
        return {}
    plan = dataclasses.asdict(r.plan_config(0.2))
    plan.pop("reduction")
    return {"plan_config": plan, "distill_config": dataclasses.asdict(r.distill_config()),
            "heal_config": dataclasses.asdict(r.heal_config())}
