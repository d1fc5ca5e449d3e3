"""Rank plans: which linear modules become low-rank, at what rank, and exact parameter accounting.

A plan is a map from module name to rank; modules not in it stay dense. Reductions are shares of
the model's total parameters, embeddings included, as the Lillama paper reports them.
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import PlanConfig
from ..errors import RankPlanError
from ..modeling.discovery import count_parameters, find_blocks, find_linears, module_group


@dataclass(frozen=True)
class ModuleShape:
    name: str  # full dotted name in the model
    layer: int
    local_name: str  # name inside its block, e.g. "self_attn.q_proj"
    group: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def dense_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)

    def lowrank_params(self, rank: int) -> int:
        return rank * (self.in_features + self.out_features) + (self.out_features if self.bias else 0)

    @property
    def full_rank(self) -> int:
        return min(self.in_features, self.out_features)

    @property
    def max_saving_rank(self) -> int:
        """Largest rank that still stores fewer weights than the dense matrix."""
        return (self.in_features * self.out_features - 1) // (self.in_features + self.out_features)

    def rank_for_keep(self, keep: float) -> int:
        """Rank that keeps about `keep` of the dense weights, at least 1."""
        return max(1, int(keep * self.in_features * self.out_features / (self.in_features + self.out_features)))


@dataclass
class ModelShape:
    modules: list[ModuleShape]
    num_layers: int
    total_params: int
    bytes_per_param: int = 4
    model_type: str = ""

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape:
        modules = []
        for block in find_blocks(model):
            for local, lin in find_linears(block.module).items():
                modules.append(
                    ModuleShape(f"{block.name}.{local}", block.index, local, module_group(local),
                                lin.in_features, lin.out_features, lin.bias is not None)
                )
        first = next(model.parameters())
        return cls(modules, len(find_blocks(model)), count_parameters(model), first.element_size(),
                   getattr(getattr(model, "config", None), "model_type", ""))

    def by_name(self) -> dict[str, ModuleShape]:
        return {m.name: m for m in self.modules}


@dataclass
class RankPlan:
    """Which linear modules become low-rank, at what rank; modules not named stay dense.

    Attributes:
        ranks: full dotted module name (e.g. "model.layers.3.self_attn.q_proj") -> rank r, so the module stores
            r * (in + out) weights instead of in * out.
        strategy: the strategy that made it ("custom" once edited by hand).
        target_reduction: the share of all parameters it was asked to remove, or None for a fixed rank.
        model_type: the config's model_type it was made for.
        notes: warnings from validation (ranks that save nothing).
    """

    ranks: dict[str, int]
    strategy: str = "custom"
    target_reduction: float | None = None
    model_type: str = ""
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> RankPlan:
        try:
            data = json.loads(text)
            plan = cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise RankPlanError(f"rank plan is not valid plan JSON: {exc}") from None
        if not isinstance(plan.ranks, dict):
            raise RankPlanError("rank plan JSON must hold a 'ranks' object of module name -> rank")
        return plan

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> RankPlan:
        try:
            return cls.from_json(Path(path).read_text())
        except OSError as exc:
            raise RankPlanError(f"cannot read rank plan {path}: {exc.strerror}") from None

    def layers(self, shape: ModelShape) -> list[int]:
        by_name = shape.by_name()
        return sorted({by_name[n].layer for n in self.ranks})


# ---- validation and accounting ----


def validate_plan(plan: RankPlan, shape: ModelShape) -> list[str]:
    """Raise on a plan that cannot be applied; return warnings for ranks that save nothing."""
    by_name = shape.by_name()
    warnings = []
    for name, rank in plan.ranks.items():
        if name not in by_name:
            raise RankPlanError(f"plan names module {name!r}, which this model does not have (plan for another model?)")
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise RankPlanError(f"rank of {name} must be a whole number, not {rank!r}")
        module = by_name[name]
        if rank < 1:
            raise RankPlanError(f"rank of {name} must be at least 1, not {rank}")
        if rank > module.full_rank:
            raise RankPlanError(f"rank {rank} of {name} exceeds the matrix's full rank {module.full_rank}")
        if rank > module.max_saving_rank:
            warnings.append(
                f"{name}: rank {rank} stores more weights than the dense matrix "
                f"(saves only below {module.max_saving_rank + 1})"
            )
    return warnings


@dataclass
class PlanSummary:
    params_before: int
    params_after: int
    bytes_per_param: int
    modules: list[dict]
    layers: list[dict]
    warnings: list[str]

    @property
    def reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before

    @property
    def weight_bytes_before(self) -> int:
        return self.params_before * self.bytes_per_param

    @property
    def weight_bytes_after(self) -> int:
        return self.params_after * self.bytes_per_param

    def totals(self) -> dict:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "reduction": self.reduction,
            "weight_bytes_before": self.weight_bytes_before,
            "weight_bytes_after": self.weight_bytes_after,
        }


def summarize(plan: RankPlan, shape: ModelShape) -> PlanSummary:
    """Exact parameter accounting of a plan on a model: totals, one row per module and per layer.

    Args:
        plan: module name -> rank.
        shape: the model's linear modules and total parameters (embeddings included).

    Returns:
        PlanSummary: parameters before and after (reduction = 1 - after / before), per-module and per-layer
        rows, and warnings for ranks that store more weights than the dense matrix.

    Raises:
        RankPlanError: a module the model lacks, or a rank below 1 or above the matrix's full rank.
    """
    warnings = validate_plan(plan, shape)
    rows, per_layer = [], {}
    saved_total = 0
    for m in shape.modules:
        rank = plan.ranks.get(m.name)
        after = m.dense_params if rank is None else m.lowrank_params(rank)
        saved_total += m.dense_params - after
        rows.append({
            "module": m.name, "layer": m.layer, "local_name": m.local_name, "group": m.group,
            "shape": f"{m.out_features}x{m.in_features}", "rank": rank, "full_rank": m.full_rank,
            "max_saving_rank": m.max_saving_rank, "params_before": m.dense_params, "params_after": after,
            "saves": rank is None or rank <= m.max_saving_rank,
        })
        layer = per_layer.setdefault(m.layer, {"layer": m.layer, "params_before": 0, "params_after": 0,
                                               "compressed": 0})
        layer["params_before"] += m.dense_params
        layer["params_after"] += after
        layer["compressed"] += rank is not None
    return PlanSummary(shape.total_params, shape.total_params - saved_total, shape.bytes_per_param,
                       rows, [per_layer[i] for i in sorted(per_layer)], warnings)


# ---- plan builders ----


def _selected(shape: ModelShape, groups: list[str]) -> list[ModuleShape]:
    return [m for m in shape.modules if m.group in groups]


def uniform_rank_plan(shape: ModelShape, rank: int, modules: list[ModuleShape]) -> dict[str, int]:
    """One rank for every module where that rank saves weights; the others stay dense."""
    return {m.name: rank for m in modules if rank <= m.max_saving_rank}


def _saving(shape: ModelShape, ranks: dict[str, int]) -> int:
    by_name = shape.by_name()
    return sum(by_name[n].dense_params - by_name[n].lowrank_params(r) for n, r in ranks.items())


def _largest_rank_meeting(shape: ModelShape, target_saving: int, make) -> dict[str, int]:
    """Binary search the largest rank r whose plan `make(r)` still saves at least `target_saving`."""
    lo, hi = 1, max(m.full_rank for m in shape.modules)
    if _saving(shape, make(lo)) < target_saving:
        raise RankPlanError("the target reduction cannot be reached with the modules selected")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _saving(shape, make(mid)) >= target_saving:
            lo = mid
        else:
            hi = mid - 1
    return make(lo)


def _keep_plan(modules: list[ModuleShape], keep: float) -> dict[str, int]:
    out = {}
    for m in modules:
        rank = m.rank_for_keep(keep)
        if rank <= m.max_saving_rank:
            out[m.name] = rank
    return out


def layer_order_plan(shape: ModelShape, target_saving: int, modules: list[ModuleShape], keep: float,
                     from_top: bool) -> dict[str, int]:
    """Compress whole layers from the bottom (or top) at `keep` until the target is met.

    The last layer added keeps more (a larger share, found by bisection) so the total lands on the
    target rather than past it.
    """
    ranks: dict[str, int] = {}
    for layer in sorted({m.layer for m in modules}, reverse=from_top):
        in_layer = [m for m in modules if m.layer == layer]
        if _saving(shape, {**ranks, **_keep_plan(in_layer, keep)}) < target_saving:
            ranks.update(_keep_plan(in_layer, keep))
            continue
        lo, hi = keep, 1.0  # the saving shrinks as the kept share grows
        for _ in range(50):
            mid = (lo + hi) / 2
            if _saving(shape, {**ranks, **_keep_plan(in_layer, mid)}) >= target_saving:
                lo = mid
            else:
                hi = mid
        ranks.update(_keep_plan(in_layer, lo))
        return ranks
    raise RankPlanError(
        f"compressing every selected layer at keep={keep:.2f} removes only "
        f"{_saving(shape, ranks) / shape.total_params:.1%}; lower layer_keep or the target"
    )


def energy_plan(shape: ModelShape, target_saving: int, modules: list[ModuleShape],
                spectra: dict[str, torch.Tensor]) -> dict[str, int]:
    """Spend the budget on the singular directions that carry the most energy per parameter.

    Each module's squared singular values are normalised to sum to one, so the score of keeping
    direction i is the share of that module's (whitened) energy it holds, divided by its cost
    (in + out weights). A module is kept dense when its chosen rank would not save weights.
    """
    scores = []
    for m in modules:
        energy = spectra[m.name].double() ** 2
        energy = energy / energy.sum().clamp_min(1e-30)
        scores.append((energy / (m.in_features + m.out_features)).tolist())

    def ranks_at(threshold: float) -> dict[str, int]:
        out = {}
        for m, s in zip(modules, scores, strict=True):
            r = max(1, sum(1 for v in s if v >= threshold))
            if r <= m.max_saving_rank:
                out[m.name] = r
        return out

    lo, hi = 0.0, max(max(s) for s in scores)
    if _saving(shape, ranks_at(hi * 1.0001)) < target_saving:
        raise RankPlanError("the target reduction cannot be reached with the modules selected")
    for _ in range(80):  # bisection on the score threshold; the saving grows with it
        mid = (lo + hi) / 2
        if _saving(shape, ranks_at(mid)) >= target_saving:
            hi = mid
        else:
            lo = mid
    return ranks_at(hi)


def _damage_ladder(points: dict[float, float | None]) -> list[tuple[float, float]]:
    """(kept share, damage) rungs from dense down, damage never shrinking as less is kept (measurements are noisy);
    a probe that gave NaN or None counts as unbounded damage."""
    rungs, worst = [(1.0, 0.0)], 0.0
    for keep in sorted(points, reverse=True):
        measured = points[keep]
        if measured is None or math.isnan(measured):
            measured = math.inf
        worst = max(worst, measured)
        rungs.append((keep, worst))
    return rungs


def sensitivity_plan(shape: ModelShape, target_saving: int, modules: list[ModuleShape],
                     damage: dict[int, dict[float, float]]) -> dict[str, int]:
    """Spend the budget where compression hurts least, by measured damage per weight saved.

    `damage[layer][keep]` is how far the model's output moves with that layer alone compressed to
    `keep` (KL from the teacher); a probe that gave NaN or None (its output was not finite) counts as
    unbounded damage, never as none. Every layer starts dense and steps down its ladder of kept shares;
    each step goes to the layer whose next step costs the least damage per weight saved. The last
    step is refined by bisection so the total lands on the target rather than past it.
    """
    by_layer = {layer: [m for m in modules if m.layer == layer] for layer in damage}
    ladders = {layer: _damage_ladder(points) for layer, points in damage.items()}
    position = {layer: 0 for layer in ladders}

    def ranks_now(overrides: dict[int, float] | None = None) -> dict[str, int]:
        out = {}
        for layer, index in position.items():
            keep = (overrides or {}).get(layer, ladders[layer][index][0])
            if keep < 1.0:
                out.update(_keep_plan(by_layer[layer], keep))
        return out

    while _saving(shape, ranks_now()) < target_saving:
        best = None
        for layer, index in position.items():
            if index + 1 >= len(ladders[layer]):
                continue
            (keep_now, hurt_now), (keep_next, hurt_next) = ladders[layer][index], ladders[layer][index + 1]
            gained = (_saving(shape, _keep_plan(by_layer[layer], keep_next))
                      - (_saving(shape, _keep_plan(by_layer[layer], keep_now)) if keep_now < 1 else 0))
            if gained <= 0:
                continue
            cost = math.inf if math.isinf(hurt_next) else (hurt_next - hurt_now + 1e-12) / gained
            if best is None or cost < best[0]:
                best = (cost, layer)
        if best is None:
            raise RankPlanError("the target reduction cannot be reached at the kept shares measured")
        layer = best[1]
        position[layer] += 1
        if _saving(shape, ranks_now()) >= target_saving:  # refine this last step to land on the target
            lo, hi = ladders[layer][position[layer]][0], ladders[layer][position[layer] - 1][0]
            for _ in range(50):
                mid = (lo + hi) / 2
                if _saving(shape, ranks_now({layer: mid})) >= target_saving:
                    lo = mid
                else:
                    hi = mid
            return ranks_now({layer: lo})
    return ranks_now()


def align_ranks(shape: ModelShape, ranks: dict[str, int], target_saving: int, multiple: int) -> dict[str, int]:
    """Every rank rounded down to a multiple of `multiple`, then, while the saving stays at or above the
    target, the modules that lost most to rounding step back up by one multiple, so the plan keeps its
    allocation and lands just past the target. Ranks below one multiple stay as they are: raising them
    would give back weights the target needs removed."""
    if multiple <= 1:
        return dict(ranks)
    by_name = shape.by_name()
    aligned = {name: rank - rank % multiple if rank >= multiple else rank for name, rank in ranks.items()}
    aligned = {name: rank for name, rank in aligned.items() if rank <= by_name[name].max_saving_rank}
    saving = _saving(shape, aligned)
    lost = sorted(aligned, key=lambda name: (aligned[name] - ranks[name], name))  # most rounded away first
    for name in lost:
        step = multiple * (by_name[name].in_features + by_name[name].out_features)  # weights one step adds
        grown = aligned[name] + multiple
        if grown <= min(ranks[name] + multiple - 1, by_name[name].max_saving_rank) and saving - step >= target_saving:
            aligned[name], saving = grown, saving - step
    return aligned


def apply_overrides(ranks: dict[str, int], shape: ModelShape, overrides: dict[str, int | None]) -> dict[str, int]:
    ranks = dict(ranks)
    for pattern, rank in overrides.items():
        matched = [m.name for m in shape.modules if fnmatch.fnmatchcase(m.name, pattern)]
        if not matched:
            raise RankPlanError(f"override {pattern!r} matches no module of this model")
        for name in matched:
            if rank is None:
                ranks.pop(name, None)
            else:
                ranks[name] = rank
    return ranks


def reduction_target(shape: ModelShape, config: PlanConfig) -> int:
    """Weights the plan must save, checked against what the selected modules can give at all; cheap, so
    planners that measure the model first call it before minutes of measuring."""
    modules = _selected(shape, config.groups)
    if not modules:
        raise RankPlanError(f"the model has no linear modules in groups {config.groups}")
    target = math.ceil(config.reduction * shape.total_params)
    compressible = sum(m.dense_params - m.lowrank_params(1) for m in modules)
    if target > compressible:
        raise RankPlanError(
            f"a {config.reduction:.0%} reduction is more than the selected modules can give "
            f"(at most {compressible / shape.total_params:.0%})"
        )
    return target


def build_plan(shape: ModelShape, config: PlanConfig, spectra: dict[str, torch.Tensor] | None = None,
               damage: dict[int, dict[float, float]] | None = None) -> RankPlan:
    """Turn a PlanConfig into a validated RankPlan for this model, allocating with the registered strategy.

    Args:
        shape: the model's linears and parameter counts.
        config: the strategy, target or fixed rank, groups and overrides.
        spectra: module name -> singular values, for strategies measuring spectra (energy).
        damage: layer -> kept share -> KL, for strategies measuring sensitivity.
    Returns:
        The plan, with notes on modules that save nothing.
    Raises:
        ConfigError: an invalid config or unknown strategy.
        RankPlanError: an unreachable target, a fixed rank where the strategy takes none, a missing measurement.
    """
    from .strategies import Allocation, strategy_named  # the registry imports the allocators above

    config.validate()
    strategy = strategy_named(config.strategy)
    modules = _selected(shape, config.groups)
    if not modules:
        raise RankPlanError(f"the model has no linear modules in groups {config.groups}")
    if config.rank is not None:
        if config.rank > max(m.full_rank for m in modules):
            raise RankPlanError(f"rank {config.rank} exceeds every selected matrix's full rank")
        ranks = uniform_rank_plan(shape, config.rank, modules)
        if not ranks:
            raise RankPlanError(f"rank {config.rank} saves no weights on any selected module; choose a smaller rank")
        if not strategy.fixed_rank:
            raise RankPlanError(f"a fixed rank applies to every layer; use a reduction target with {config.strategy}")
    else:
        target = reduction_target(shape, config)
        ranks = strategy.allocate(Allocation(shape, target, modules, config, spectra, damage))
        ranks = align_ranks(shape, ranks, target, config.rank_multiple)
    ranks = apply_overrides(ranks, shape, config.overrides)
    plan = RankPlan(ranks, config.strategy, config.reduction if config.rank is None else None, shape.model_type)
    plan.notes = validate_plan(plan, shape)
    return plan
