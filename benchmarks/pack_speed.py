"""Packed against unpacked factors in one process, timed in alternation so a shared CPU's load falls on both alike:
batch 1 and 16 decoding and prefill of a student with the shapes of the default 20% plan (sensitivity, multiples of
8), and of its teacher. Factor values do not change speed, so the student's factors stay as `apply_rank_map` makes
them (no calibration pass, no SVD): minutes, not an hour, on a loaded CPU. Kernels per decoder block: the mean over
blocks of the matrix multiplies and other operators one token runs (benchmarks/kernels.py).

    python -m benchmarks.pack_speed [--rounds 3] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from lillama_core.config import RunConfig
from lillama_core.metrics.speed import generation_speed
from lillama_core.modeling.loading import load_model
from lillama_core.modeling.packs import pack_low_rank, token_inputs
from lillama_core.modeling.shipped import apply_rank_map
from lillama_core.pipeline import planning_calibration
from lillama_core.planning.planner import make_plan
from lillama_core.planning.ranks import ModelShape, summarize

from .bench import log
from .common import environment, write_record
from .kernels import mean_kernels_per_block


def _timings(model, vocab: int, new_tokens: int) -> dict:
    b1, b16 = (generation_speed(model, vocab, batch, 64, new_tokens) for batch in (1, 16))
    return {"gen_b1_tokens_per_s": b1.generate_tokens_per_s, "gen_b16_tokens_per_s": b16.generate_tokens_per_s,
            "prefill_b16_tokens_per_s": b16.prefill_tokens_per_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    config = RunConfig()
    config.model.device = "cpu"
    loaded = load_model(config.model)
    teacher = loaded.model
    plan = make_plan(loaded, config.plan, planning_calibration(loaded, config), config.calibration.batch_size)
    unpacked = apply_rank_map(copy.deepcopy(teacher), plan.ranks)
    packed = copy.deepcopy(unpacked)
    packs = pack_low_rank(packed, token_inputs(packed))
    models = {"teacher": teacher, "unpacked": unpacked, "packed": packed}
    kernels = {label: mean_kernels_per_block(model) for label, model in models.items()}
    log(f"kernels per block: {kernels}; {len(packs)} packs")
    vocab = teacher.config.vocab_size
    runs = {label: [] for label in models}
    for round_ in range(args.rounds):
        for label, model in models.items():
            runs[label].append(_timings(model, vocab, args.new_tokens))
            log(f"round {round_}: {label} {runs[label][-1]}")
    for label in models:
        medians = {key: statistics.median(r[key] for r in runs[label]) for key in runs[label][0]}
        write_record("pack_speed", {"model": config.model.name, "variant": label, "device": "cpu",
                                    "torch_threads": torch.get_num_threads(), "rounds": args.rounds,
                                    "new_tokens": args.new_tokens, "prompt_tokens": 64, "packs": len(packs),
                                    "reduction": summarize(plan, ModelShape.of(teacher)).reduction if label != "teacher"
                                    else 0.0, "kernels_per_block": kernels[label], **medians, "runs": runs[label],
                                    "env": environment(torch.device("cpu"))})
        log(f"{label}: {medians}")


if __name__ == "__main__":
    main()
