"""Do equal ranks within a pack cost quality? SmolLM2 at 20% (the default sensitivity plan, ranks in multiples of 8),
whitened SVD init without training: WikiText-2 perplexity of the plan as made, and of the same plan with the members
of each q/k/v or gate/up pack given one rank per layer (the pack's weights kept: the rank, rounded to the plan's
multiple, whose weights match the members' total).

    python -m benchmarks.pack_ranks [--tokens 16384] [--eval-tokens 16384]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from lillama_core.compress.loop import Compressor
from lillama_core.config import RunConfig
from lillama_core.metrics.perplexity import perplexity
from lillama_core.modeling.loading import load_model
from lillama_core.pipeline import calibrate, planning_calibration
from lillama_core.planning.planner import make_plan
from lillama_core.planning.ranks import ModelShape, RankPlan, summarize

from .bench import log
from .common import environment, write_record

PACKS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "gate_up": ("mlp.gate_proj",
                                                                                           "mlp.up_proj")}


def equal_ranks(plan: RankPlan, shape: ModelShape, members: tuple[str, ...], multiple: int) -> dict[str, int]:
    """The plan's ranks with `members` of each layer (where all are compressed) at one rank of the same weights."""
    ranks, by_name = dict(plan.ranks), shape.by_name()
    for layer in {m.layer for m in shape.modules}:
        names = [next((m.name for m in shape.modules if m.layer == layer and m.local_name == local), None)
                 for local in members]
        if not all(name in ranks for name in names):
            continue
        widths = [by_name[n].in_features + by_name[n].out_features for n in names]
        rank = sum(ranks[n] * w for n, w in zip(names, widths, strict=True)) / sum(widths)
        rank = max(multiple, multiple * round(rank / multiple))
        for name in names:
            if rank <= by_name[name].max_saving_rank:
                ranks[name] = rank
            else:
                ranks.pop(name)  # at that rank it would save nothing: dense
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16_384, help="calibration tokens of the whitened init")
    parser.add_argument("--eval-tokens", type=int, default=16_384)
    args = parser.parse_args()
    config = RunConfig()
    config.model.device = "cpu"
    config.eval.tokens = args.eval_tokens
    loaded = load_model(config.model)
    shape = ModelShape.of(loaded.model)
    plan = make_plan(loaded, config.plan, planning_calibration(loaded, config), config.calibration.batch_size)
    calibration = calibrate(loaded, dataclasses.replace(config.calibration, tokens=args.tokens))
    windows = loaded.task.held_out(loaded, config)
    variants = {"as planned": plan.ranks}
    for label, members in PACKS.items():
        variants[f"equal {label}"] = equal_ranks(plan, shape, members, config.plan.rank_multiple)
    distill = dataclasses.replace(config.distill, train=False)
    with torch.no_grad():
        teacher_ppl = perplexity(loaded.model, windows).perplexity
    log(f"teacher perplexity {teacher_ppl:.2f}")
    for label, ranks in variants.items():
        variant = RankPlan(ranks, plan.strategy, plan.target_reduction, plan.model_type)
        student = Compressor(loaded, calibration, variant, distill, config.calibration.batch_size).run().student
        with torch.no_grad():
            ppl = perplexity(student, windows).perplexity
        reduction = summarize(variant, shape).reduction
        log(f"{label}: perplexity {ppl:.2f} at {reduction:.2%} fewer parameters")
        write_record("pack_ranks", {"model": config.model.name, "variant": label, "init": "whitened", "trained": False,
                                    "calibration_tokens": args.tokens, "eval_tokens": args.eval_tokens,
                                    "reduction": reduction, "student_ppl": ppl, "teacher_ppl": teacher_ppl,
                                    "ranks": ranks, "env": environment(loaded.device)})
        del student


if __name__ == "__main__":
    main()
