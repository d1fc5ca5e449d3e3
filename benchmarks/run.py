"""Benchmark harness CLI (`make bench` runs it with no arguments: a small default suite).

  python -m benchmarks.run quality  --model smollm2-135m-instruct --reductions 0.1,0.2,0.3,0.4 \\
                                    --methods teacher,svd,whitened,paper,ours --tokens 16384 --eval-tokens 8192
  python -m benchmarks.run ablation --what allocation|init|loss|lr|schedule|epochs|tokens|method \\
                                    [--values ...] [--free] [--base tuned] [--reduction 0.2]
  python -m benchmarks.run speed    --model smollm2-135m-instruct --variants teacher,tuned@0.2
  python -m benchmarks.run speech   --reductions 0.1,0.2 --calibrations speech,synthetic  # Whisper-base, WER
  python -m benchmarks.run accuracy --reductions 0.2 --methods teacher,whitened,paper,ours,ours-heal --limit 40
                                    [--agreement]   # zero-shot accuracy (lm-eval) and generation quality
  python -m benchmarks.run profile  --tokens 8192   # SmolLM2 at 20% on the CPU: each layer's time by phase
  python -m benchmarks.run predict  # the quality/ablation runs' plans: predicted vs measured perplexity
  python -m benchmarks.run report   # docs/benchmarks.md + charts from every record in benchmarks/results/

Every command takes --device auto|cpu|cuda and --dtype auto|float32|bfloat16 (auto: bf16 on CUDA, fp32 on
CPU), so a GPU session reruns the same suites with bigger --tokens / --eval-tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lillama_core.config_args import add_field_flag, parse_assignment
from lillama_core.errors import ConfigError

from .methods import DEFAULT_METHODS, METHODS


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging

        logging.disable_progress_bar()
        logging.set_verbosity_error()
    except ImportError:
        pass


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _budget(args):
    from .bench import Budget

    return Budget(tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
                  eval_tokens=args.eval_tokens, eval_seq_len=args.eval_seq_len, generated=args.generated)


def _common(p: argparse.ArgumentParser, tokens: int = 16_384, eval_tokens: int = 8_192) -> None:
    add_field_flag(p, "model.device", "--device")
    add_field_flag(p, "model.dtype", "--dtype")
    add_field_flag(p, "calibration.tokens", "--tokens", default=tokens,
                   help="calibration tokens (same for every method)")
    add_field_flag(p, "calibration.seq_len", "--seq-len", help="calibration sequence length")
    add_field_flag(p, "calibration.batch_size", "--batch-size", help="distillation batch (sequences)")
    add_field_flag(p, "calibration.seed", "--seed")
    add_field_flag(p, "calibration.generated", "--generated")
    add_field_flag(p, "eval.tokens", "--eval-tokens", default=eval_tokens, help="WikiText-2 test tokens scored")
    add_field_flag(p, "eval.seq_len", "--eval-seq-len")
    p.add_argument("--tag", default=None, help="free-form label stored in each record")
    p.add_argument("--results", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("LILLAMA_BENCH_THREADS", 0)),
                   help="torch CPU threads (0: torch's default). On a shared CPU 1 thread avoids OpenMP "
                        "oversubscription, which can make float64 SVDs 100x slower")


def _parse_sets(items: list[str] | None) -> dict:
    """--set distill.lr=1e-3 --set plan.overrides='{"*.layers.0.*": null}' -> {"distill": {...}, "plan": {...}},
    each value typed as its config field is (an unknown field or a mistyped value stops here, not mid-suite)."""
    out: dict = {}
    for item in items or []:
        try:
            path, value = parse_assignment(item)
        except ConfigError as exc:
            raise SystemExit(f"--set: {exc}") from None
        part, _, name = path.partition(".")
        if part not in ("plan", "distill"):
            raise SystemExit(f"--set expects plan.NAME=VALUE or distill.NAME=VALUE, not {item!r}")
        out.setdefault(part, {})[name] = value
    return out


def _variant(item: str) -> tuple[str, float]:
    """method@reduction -> (method, reduction); no @: reduction 0."""
    method, _, reduction = item.partition("@")
    return method, float(reduction or 0.0)


def _throughput(args, results) -> None:
    from lillama_core.modeling.loading import resolve_device, resolve_dtype

    from .common import write_record
    from .suites import log
    from .throughput import run_throughput

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    for item in _names(args.shapes):
        shape, *rest = item.split(":")
        layers, init = (rest + ["3", args.init][len(rest):])[:2]  # shape[:layers[:init]]
        try:
            record = run_throughput(shape, int(layers), args.tokens, args.seq_len, args.batch_size, init,
                                    device, dtype, offload=args.offload, from_checkpoint=args.from_checkpoint)
        except Exception as exc:  # one shape that does not fit must not lose the others
            log(f"  {shape} failed: {type(exc).__name__}: {exc}")
            record = {"model": f"{shape} (random weights)", "error": f"{type(exc).__name__}: {exc}"}
        if args.tag:
            record["tag"] = args.tag
        write_record("throughput", record, results)


def _profile(args, results) -> None:
    from .common import write_record
    from .profile import run_profile

    record = run_profile(args.model, args.reduction, _budget(args), args.layers, args.distill)
    write_record("profile", {**record, **({"tag": args.tag} if args.tag else {})}, results)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")

    q = sub.add_parser("quality", help="perplexity of each method at each reduction")
    q.add_argument("--model", "--models", dest="models", default="smollm2-135m-instruct",
                   help="comma-separated: smollm2-135m-instruct, gemma3-270m, a hub id or folder")
    q.add_argument("--reductions", default="0.1,0.2,0.3,0.4")
    q.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated from {', '.join(METHODS)}, ours-r<N> (ranks a multiple of N)")
    _common(q)

    a = sub.add_parser("ablation", help="one knob at a time around a base recipe")
    a.add_argument("--model", default="smollm2-135m-instruct")
    a.add_argument("--what", required=True,
                   choices=["allocation", "init", "loss", "lr", "schedule", "epochs", "tokens", "heal", "method"])
    a.add_argument("--values", default=None, help="comma-separated values for the axis (defaults per axis)")
    a.add_argument("--reduction", type=float, default=0.2)
    a.add_argument("--base", default="tuned", help="recipe the variants start from")
    a.add_argument("--free", action="store_true", help="training-free variants (whitened/SVD init only)")
    a.add_argument("--set", action="append", dest="sets", help="override the base: distill.lr=1e-3, plan.strategy=...")
    _common(a)

    s = sub.add_parser("speed", help="generation/prefill tokens/s and memory, teacher vs students")
    s.add_argument("--model", "--models", dest="models", default="smollm2-135m-instruct",
                   help="registry models, or random-weight shapes (llama-1b, llama-7b), comma-separated")
    s.add_argument("--variants", default="teacher,tuned@0.2", help="method@reduction, comma-separated")
    s.add_argument("--new-tokens", type=int, default=64)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--graphs", action="store_true",
                   help="also time batch 1 and 16 decoding through a static KV cache with the decode step compiled "
                        "(CUDA graphs on a GPU; inductor's C++ kernels on a CPU)")
    s.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                   help="students' factors that read one input share one A matmul, as the pipeline's do")
    _common(s, tokens=8_192)

    w = sub.add_parser("_speed-worker", help=argparse.SUPPRESS)
    w.add_argument("--model", required=True)
    w.add_argument("--method", required=True)
    w.add_argument("--reduction", type=float, default=0.0)
    w.add_argument("--new-tokens", type=int, default=64)
    w.add_argument("--repeats", type=int, default=3)
    w.add_argument("--graphs", action="store_true")
    w.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True)
    w.add_argument("--out", required=True)
    _common(w, tokens=8_192)

    qz = sub.add_parser("quantize", help="int8 and int4 (torchao) on top of teacher and student: size, ppl, speed")
    qz.add_argument("--model", default="smollm2-135m-instruct")
    qz.add_argument("--method", default="ours")
    qz.add_argument("--reduction", type=float, default=0.2)
    _common(qz)

    t = sub.add_parser("throughput", help="distillation tokens/s, MFU and peak memory on random-weight Llamas")
    t.add_argument("--shapes", default="llama-1b:4,llama-7b:3",
                   help="shape:layers[:init], comma-separated (init defaults to --init)")
    t.add_argument("--tokens", type=int, default=65_536, help="calibration tokens per layer")
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--init", default="whitened")
    t.add_argument("--offload", action="store_true",
                   help="blocks in host memory, streamed to the GPU one at a time (peak VRAM vs model size)")
    t.add_argument("--from-checkpoint", action="store_true",
                   help="save the model as safetensors first and load it memory-mapped, as a local model loads "
                        "(host memory then holds only the blocks the run touches)")
    t.add_argument("--device", default="auto")
    t.add_argument("--dtype", default="auto")
    t.add_argument("--tag", default=None)
    t.add_argument("--results", default=None)

    pp = sub.add_parser("parallel", help="wall time with 1, 2, ... data-parallel processes (torchrun)")
    pp.add_argument("--model", default="smollm2-135m-instruct")
    pp.add_argument("--settings", default="1x1,2x1,1x2",
                    help="processes x CPU threads per process, comma-separated; the first is the baseline")
    pp.add_argument("--tokens", type=int, default=8_192)
    pp.add_argument("--seq-len", type=int, default=256)
    pp.add_argument("--batch-size", type=int, default=8)
    pp.add_argument("--reduction", type=float, default=0.2)
    pp.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (one GPU per process, NCCL)")
    pp.add_argument("--tag", default=None)
    pp.add_argument("--results", default=None)

    sp = sub.add_parser("speech", help="Whisper-base on speech read by espeak-ng: true word error rate")
    sp.add_argument("--reductions", default="0.1,0.2")
    sp.add_argument("--methods", default="whitened,ours",
                    help=f"comma-separated recipes from {', '.join(m for m in METHODS if m != 'teacher')}, ours-r<N>")
    sp.add_argument("--calibrations", default="speech,synthetic",
                    help="speech (espeak-ng reading calibration text) and/or synthetic (the built-in clips)")
    sp.add_argument("--clips", type=int, default=128, help="calibration clips")
    sp.add_argument("--eval-clips", type=int, default=32, help="held-out spoken sentences scored")
    sp.add_argument("--seq-len", type=int, default=64, help="transcript tokens per clip")
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument("--device", default="auto")
    sp.add_argument("--dtype", default="auto")
    sp.add_argument("--tag", default=None)
    sp.add_argument("--results", default=None)

    ac = sub.add_parser("accuracy", help="zero-shot accuracy (lm-eval) and generation quality of each method")
    ac.add_argument("--model", default="smollm2-135m-instruct")
    ac.add_argument("--reductions", default="0.2")
    ac.add_argument("--methods", default="teacher,whitened,paper,ours,ours-heal",
                    help="comma-separated recipes; <method>-heal adds healing on --tokens tokens")
    ac.add_argument("--tasks", default="zero-shot", help="suite or lm-eval task names, comma-separated")
    ac.add_argument("--limit", type=int, default=None, help="first N documents per task (default: whole splits)")
    ac.add_argument("--task-data", default="offline", choices=("offline", "hub"))
    ac.add_argument("--prompts", type=int, default=10, help="seed instructions answered greedily (0: none)")
    ac.add_argument("--max-new-tokens", type=int, default=64)
    ac.add_argument("--agreement", action="store_true",
                    help="instead: check our per-document answers against lm-eval run directly on the teacher")
    _common(ac)
    pf = sub.add_parser("profile", help="one layer's time phase by phase, tokens/s and MFU (SmolLM2 at 20%%, CPU)")
    pf.add_argument("--model", default="smollm2-135m-instruct")
    pf.add_argument("--reduction", type=float, default=0.2)
    pf.add_argument("--layers", type=int, default=None, help="profile only the plan's first N layers (default all)")
    pf.add_argument("--distill", default="defaults", choices=("defaults", "tuned"),
                    help="the engine's default distillation settings (joint loss) or the tuned recipe's (student loss)")
    _common(pf, tokens=8_192)

    pr = sub.add_parser("predict", help="predicted vs measured perplexity of the plans the quality and ablation "
                                        "suites ran (several strategies and levels)")
    pr.add_argument("--model", default="smollm2-135m-instruct")
    _common(pr)

    r = sub.add_parser("report", help="regenerate docs/benchmarks.md and the charts from all records")
    r.add_argument("--results", default=None)
    r.add_argument("--doc", default=None, help="markdown file to write (default docs/benchmarks.md)")

    d = sub.add_parser("default", help="the small suite `make bench` runs (also: no arguments)")
    _common(d, tokens=8_192, eval_tokens=4_096)
    d.add_argument("--model", default="smollm2-135m-instruct")
    return parser


def _run_quality(args, results: Path | None) -> None:
    from . import suites

    suites.run_quality(_names(args.models), _floats(args.reductions), _names(args.methods), _budget(args),
                       args.device, args.dtype, args.tag, results)


def _run_ablation(args, results: Path | None) -> None:
    from . import suites

    suites.run_ablation(args.model, args.what, args.reduction, args.base,
                        _names(args.values) if args.values else None, args.free, _budget(args), args.device,
                        args.dtype, _parse_sets(args.sets), args.tag, results)


def _run_speed(args, results: Path | None) -> None:
    from . import suites

    variants = [_variant(item) for item in _names(args.variants)]
    suites.run_speed(_names(args.models), variants, _budget(args), args.device, args.dtype, args.new_tokens,
                     args.repeats, args.tag, results, args.graphs, args.pack)


def _run_quantize(args, results: Path | None) -> None:
    from . import suites

    suites.run_quantize(args.model, args.method, args.reduction, _budget(args), args.tag, results,
                        args.device, args.dtype)


def _run_parallel(args, results: Path | None) -> None:
    from .common import write_record
    from .parallel import run_parallel

    settings = [tuple(int(n) for n in item.split("x")) for item in _names(args.settings)]
    for record in run_parallel(args.model, settings, args.tokens, args.seq_len, args.batch_size, args.reduction,
                               args.device):
        write_record("parallel", {**record, **({"tag": args.tag} if args.tag else {})}, results)


def _run_speech(args, results: Path | None) -> None:
    from .common import write_record
    from .speech import run_speech

    for record in run_speech(_floats(args.reductions), _names(args.methods), _names(args.calibrations),
                             args.clips, args.eval_clips, args.seq_len, args.batch_size, args.device,
                             args.dtype):
        write_record("speech", {**record, **({"tag": args.tag} if args.tag else {})}, results)


def _run_accuracy(args, results: Path | None) -> None:
    from .accuracy import run_accuracy, run_agreement

    if args.agreement:
        run_agreement(args.model, _budget(args), args.tasks, args.limit, args.task_data, args.device, args.dtype,
                      args.tag, results)
    else:
        run_accuracy(args.model, _floats(args.reductions), _names(args.methods), _budget(args), args.tasks,
                     args.limit, args.task_data, args.prompts, args.max_new_tokens, args.device, args.dtype,
                     args.tag, results)


def _run_predict(args, results: Path | None) -> None:
    from .common import write_record
    from .predict import run_predict

    for record in run_predict(args.model, _budget(args), args.device, args.dtype):
        write_record("predict", {**record, **({"tag": args.tag} if args.tag else {})}, results)


def _run_speed_worker(args, results: Path | None) -> None:
    from . import suites

    record = suites.speed_worker(args.model, args.method, args.reduction, _budget(args), args.device,
                                 args.dtype, args.new_tokens, args.repeats, args.graphs, args.pack)
    Path(args.out).write_text(json.dumps(record))


def _run_default(args, results: Path | None) -> None:
    from . import suites

    budget = _budget(args)
    tag = args.tag or "make-bench"
    suites.run_quality([args.model], [0.2], list(DEFAULT_METHODS) + ["tuned"], budget, args.device, args.dtype,
                       tag, results)
    suites.run_speed([args.model], [("teacher", 0.0), ("tuned", 0.2)], budget, args.device, args.dtype,
                     new_tokens=32, repeats=2, tag=tag, results_dir=results)
    from .report import write_report

    print(f"wrote {write_report(results)}")


RUNNERS = {
    "profile": _profile,
    "quality": _run_quality,
    "ablation": _run_ablation,
    "speed": _run_speed,
    "quantize": _run_quantize,
    "parallel": _run_parallel,
    "throughput": _throughput,
    "speech": _run_speech,
    "accuracy": _run_accuracy,
    "predict": _run_predict,
    "_speed-worker": _run_speed_worker,
    "default": _run_default,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv or ["default"])
    _quiet()
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)
    start = time.time()
    results = Path(args.results) if getattr(args, "results", None) else None

    if args.command == "report":
        from .report import write_report

        path = write_report(results, Path(args.doc) if args.doc else None)
        print(f"wrote {path}")
        return 0

    RUNNERS[args.command](args, results)
    print(f"done in {time.time() - start:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
