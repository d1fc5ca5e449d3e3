"""The offline copies feed lm-eval's own task configs: every split complete, every field where its yaml reads it."""

import pytest

from lillama_core.data.zeroshot import OFFLINE_TASKS, _source_records, package_folder
from lillama_core.metrics.zeroshot import task_manager, task_spec


@pytest.fixture(scope="module")
def loaded_tasks(tmp_path_factory):
    cache = tmp_path_factory.mktemp("zeroshot-data")
    names = list(OFFLINE_TASKS)
    loaded = task_manager(names).load([task_spec(name, "offline", cache) for name in names])["tasks"]
    return loaded


def test_every_split_is_complete_and_renders_through_lm_evals_prompts(loaded_tasks):
    assert sorted(loaded_tasks) == sorted(OFFLINE_TASKS)
    for name, task in loaded_tasks.items():
        docs = task.eval_docs
        assert len(docs) == OFFLINE_TASKS[name].docs, name
        for doc in (docs[0], docs[len(docs) - 1]):
            target = task.doc_to_target(doc)
            if task.OUTPUT_TYPE == "multiple_choice":
                choices = task.doc_to_choice(doc)
                assert len(choices) >= 2 and all(isinstance(c, str) and c for c in choices), name
                gold = target if isinstance(target, int) else choices.index(target) if target in choices else None
                if name != "winogrande":  # winogrande's choices are contexts, its target the shared ending
                    assert gold is not None and 0 <= gold < len(choices), name
            else:
                assert isinstance(target, str) and target.startswith(" ") and " " not in target[1:], name


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "openbookqa", "lambada_openai"])
def test_converted_documents_give_the_source_prompts_and_answers(loaded_tasks, name):
    """lm-eval's prompt and gold answer, built from our converted fields, equal the prompt and answer the
    source request log recorded (every 5th document, to stay fast)."""
    task = loaded_tasks[name]
    source = list(_source_records(package_folder() / OFFLINE_TASKS[name].file))
    docs = task.eval_docs
    assert len(docs) == len(source)
    for i in range(0, len(source), 5):
        doc, original = docs[i], source[i]
        if name == "lambada_openai":
            assert task.doc_to_text(doc) == original["query"]
            assert task.doc_to_target(doc) == " " + original["answers_text"][0]
        else:
            question = task.doc_to_text(doc)
            assert original["query"] in (question, f"Question: {question}\nAnswer:")
            assert task.doc_to_choice(doc) == original["choices"]
            assert task.doc_to_target(doc) == original["gold"]


def test_boolq_answers_become_lm_evals_labels(loaded_tasks):
    task = loaded_tasks["boolq"]
    source = list(_source_records(package_folder() / OFFLINE_TASKS["boolq"].file))
    docs = task.eval_docs
    assert [task.doc_to_choice(docs[0])[task.doc_to_target(docs[i])] for i in range(50)] == \
        ["yes" if s["answer"] else "no" for s in source[:50]]
    assert sum(docs["label"]) == sum(s["answer"] for s in source)
