"""Zero-shot accuracy suite: teacher and students (methods x reductions) on lm-eval's standard tasks, with the
generation-quality measures of greedy answers, plus the agreement check of our scoring against lm-eval run
directly on the same model and data.

Every student is built by `Bench.run_recipe` on the same calibration tokens as the quality suite, so its
record also carries WikiText-2 perplexity; accuracy is measured on the student before it is freed. Records go
to `benchmarks/results/accuracy.jsonl`, one per (model, method, reduction), each with every task's per-document
answers, so retention and the teacher/student agreement are computed from the records alone.
"""

from __future__ import annotations

import gc
import tempfile
import time

from lillama_core.metrics.generation import generation_quality
from lillama_core.metrics.retention import compare
from lillama_core.metrics.zeroshot import (
    TaskScore,
    answers_of,
    data_cache,
    score_tasks,
    task_list,
    task_manager,
    task_spec,
)

from .bench import Bench, Budget, log
from .common import read_records, write_record
from .methods import recipe

HEALED = "-heal"  # <method>-heal: the recipe, then end-to-end healing on as many tokens as it was calibrated on


def suite_recipe(name: str, budget: Budget):
    if name.endswith(HEALED):
        base = recipe(name.removesuffix(HEALED))
        return base.with_changes(name, heal={"tokens": budget.tokens},
                                 description=f"{base.description}, then {budget.tokens} tokens of healing")
    return recipe(name)


def measure(model, tokenizer, tasks: list[str], limit: int | None, data: str, prompts: int,
            max_new_tokens: int) -> dict:
    """Accuracy on every task (with per-document answers) and, when prompts > 0, generation quality."""
    start = time.time()
    scores = score_tasks(model, tokenizer, tasks, limit, data,
                         on_progress=lambda what, share: log(f"    {what}") if what.endswith("loading") else None)
    record = {"zero_shot": [s.to_dict(with_picks=True) for s in scores], "accuracy_seconds": time.time() - start}
    for s in scores:
        log(f"    {s.task}: {s.metric} {s.score:.3f} ±{s.stderr:.3f} (chance {s.chance:.2f}, {s.seconds:.0f}s)")
    if prompts:
        start = time.time()
        record["generation"] = generation_quality(model, tokenizer, prompts, max_new_tokens)
        record["generation_seconds"] = time.time() - start
    return record


def retention(teacher: dict, student: dict) -> dict:
    """The comparison summary (see zeroshot_compare.compare) of two records of this suite."""
    scores = [[TaskScore.from_dict(s) for s in r["zero_shot"]] for r in (teacher, student)]
    return compare(*scores)["summary"]


def run_accuracy(model: str, reductions: list[float], methods: list[str], budget: Budget, tasks: str,
                 limit: int | None, data: str = "offline", prompts: int = 10, max_new_tokens: int = 64,
                 device: str = "auto", dtype: str = "auto", tag: str | None = None, results_dir=None) -> list[dict]:
    tasks = task_list(tasks, data)
    bench = Bench(model, budget, device, dtype)
    settings = {"tasks": tasks, "limit": limit, "task_data": data, "generation_prompts": prompts,
                "max_new_tokens": max_new_tokens, **({"tag": tag} if tag else {})}
    records, teacher = [], None

    tokenizer = bench.loaded.tokenizer

    def inspect(model_under_test) -> dict:
        return measure(model_under_test, tokenizer, tasks, limit, data, prompts, max_new_tokens)

    for method in methods:
        r = suite_recipe(method, budget)
        for reduction in ([0.0] if r.teacher else reductions):
            try:
                if r.teacher:
                    record = {**bench.run_recipe(r, reduction, extra=settings), **inspect(bench.loaded.model)}
                else:  # measured on the student before run_recipe frees it
                    record = bench.run_recipe(r, reduction, extra=settings, inspect=inspect)
            except Exception as exc:  # one infeasible point must not end the suite
                log(f"  {model} {method} @ {reduction:.0%} failed: {type(exc).__name__}: {exc}")
                record = {**bench.base_record(), **settings, "method": method, "target_reduction": reduction,
                          "error": f"{type(exc).__name__}: {exc}"}
            if r.teacher:
                teacher = record
            elif teacher is not None and "zero_shot" in record:
                record["retention"] = retention(teacher, record)
                log(f"  {method} @ {reduction:.0%}: retention {record['retention']['retention']} of the teacher's "
                    f"mean accuracy on {record['retention']['tasks']}")
            write_record("accuracy", record, results_dir)
            records.append(record)
    del bench
    gc.collect()
    return records


def run_agreement(model: str, budget: Budget, tasks: str, limit: int | None, data: str = "offline",
                  device: str = "auto", dtype: str = "auto", tag: str | None = None, results_dir=None) -> dict:
    """Our scoring (the in-memory model in our HFLM subclass, restricted task index, lm-eval's `evaluate`)
    against lm-eval run directly: `simple_evaluate(model="hf")` loading the same weights from disk itself,
    stock HFLM, on the same data; per task, the share of documents where both pick the same answer. Our answers
    come from this setting's teacher record of the accuracy suite when there is one, else are scored here."""
    from lm_eval.evaluator import simple_evaluate

    tasks = task_list(tasks, data)
    bench = Bench(model, budget, device, dtype)
    loaded = bench.loaded
    scored = [r for r in read_records(results_dir) if r.get("suite") == "accuracy" and r.get("method") == "teacher"
              and "zero_shot" in r and (r["model"], r.get("limit"), r.get("task_data"), r.get("tasks"))
              == (model, limit, data, tasks) and r.get("device") == str(loaded.device)]
    if scored:
        log(f"our answers: the teacher record of {scored[-1]['timestamp']}")
        ours = {s["task"]: TaskScore.from_dict(s) for s in scored[-1]["zero_shot"]}
    else:
        ours = {s.task: s for s in score_tasks(loaded.model, loaded.tokenizer, tasks, limit, data)}
    with tempfile.TemporaryDirectory(prefix="lillama-agreement-") as folder:
        loaded.model.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
        dtype_name = str(loaded.dtype).removeprefix("torch.")
        start = time.time()
        direct = simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype={dtype_name}",
                                 device=str(loaded.device), tasks=[task_spec(t, data, data_cache()) for t in tasks],
                                 task_manager=task_manager(tasks), limit=limit, log_samples=True, bootstrap_iters=0)
        direct_seconds = time.time() - start
    per_task = {}
    for task, score in ours.items():
        theirs, _ = answers_of(direct["samples"][task], direct["configs"][task]["output_type"])
        same = sum(a == b for a, b in zip(score.picks, theirs, strict=True))
        per_task[task] = {"docs": score.docs, "same": same, "ours_acc": score.acc,
                          "direct_acc": direct["results"][task]["acc,none"]}
        log(f"  {task}: {same}/{score.docs} same answers")
    docs = sum(t["docs"] for t in per_task.values())
    record = {**bench.base_record(), "method": "teacher", "check": "agreement", "tasks": tasks, "limit": limit,
              "task_data": data, "per_task": per_task, "docs": docs,
              "same": sum(t["same"] for t in per_task.values()),
              "ours_seconds": sum(s.seconds for s in ours.values()), "direct_seconds": direct_seconds,
              **({"tag": tag} if tag else {})}
    log(f"agreement: {record['same']}/{docs} documents get the same answer")
    write_record("accuracy", record, results_dir)
    return record
