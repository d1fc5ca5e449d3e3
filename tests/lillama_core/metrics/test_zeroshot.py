"""Zero-shot scoring through lm-eval on a tiny random Llama: our runner's answers are lm-eval's own."""

import threading

import pytest

from lillama_core.errors import ConfigError, RunStopped
from lillama_core.metrics.retention import compare, compare_task
from lillama_core.metrics.zeroshot import TaskScore, score_pair, score_tasks, task_list, task_manager, task_spec

TASKS = ["arc_easy", "winogrande", "lambada_openai"]
LIMIT = 6


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("zeroshot-data")


@pytest.fixture(scope="module")
def scored(tiny_model_dir, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    progress = []
    scores = score_tasks(model, tokenizer, TASKS, limit=LIMIT, cache=cache,
                         on_progress=lambda what, share: progress.append((what, share)))
    return scores, progress


def test_suite_names_expand_and_bad_names_are_user_errors():
    assert task_list("zero-shot") == ["arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq",
                                      "openbookqa", "lambada_openai"]
    assert task_list("piqa, arc_easy,piqa") == ["piqa", "arc_easy"]
    assert task_list(["zero-shot", "piqa"])[-1] == "lambada_openai"
    with pytest.raises(ConfigError, match="no offline data for mmlu"):
        task_list("mmlu")
    with pytest.raises(ConfigError, match="no tasks"):
        task_list(" , ")
    with pytest.raises(ConfigError, match="offline, hub"):
        task_list("piqa", data="cloud")


def test_scores_match_lm_eval_run_directly_on_the_same_model_and_data(scored, tiny_model_dir, cache):
    """The agreement check in small: lm-eval's stock HFLM, loading the model from disk itself, through plain
    simple_evaluate, picks the same answer on every document and reports the same accuracies."""
    from lm_eval.evaluator import simple_evaluate

    scores, _ = scored
    direct = simple_evaluate(model="hf", model_args=f"pretrained={tiny_model_dir},dtype=float32", device="cpu",
                             tasks=[task_spec(t, "offline", cache) for t in TASKS], task_manager=task_manager(TASKS),
                             limit=LIMIT, log_samples=True, bootstrap_iters=0)
    for score in scores:
        samples = sorted(direct["samples"][score.task], key=lambda s: int(s["doc_id"]))
        if score.task == "lambada_openai":
            theirs = [int(s["filtered_resps"][0][1]) for s in samples]
        else:
            theirs = [max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0]) for s in samples]
        assert score.picks == theirs, score.task
        assert score.acc == pytest.approx(direct["results"][score.task]["acc,none"])
        assert score.acc == pytest.approx(sum(s["acc"] for s in samples) / len(samples))


def test_task_scores_carry_docs_chance_and_stderr(scored):
    scores, progress = scored
    by_task = {s.task: s for s in scores}
    assert [s.task for s in scores] == TASKS
    assert all(s.docs == LIMIT and len(s.picks) == LIMIT and s.seconds > 0 for s in scores)
    assert by_task["arc_easy"].docs_in_split == 2376
    assert 0.2 <= by_task["arc_easy"].chance <= 0.34  # mostly 4 choices, a few 3 or 5
    assert by_task["winogrande"].chance == 0.5 and by_task["lambada_openai"].chance == 0.0
    assert by_task["arc_easy"].metric == "acc_norm" and by_task["winogrande"].metric == "acc"
    arc = by_task["arc_easy"]
    assert arc.acc_stderr == pytest.approx((arc.acc * (1 - arc.acc) / (LIMIT - 1)) ** 0.5)
    assert TaskScore.from_dict(arc.to_dict(with_picks=True)) == arc
    shares = [share for _, share in progress]
    assert shares == sorted(shares) and shares[-1] == 1.0
    assert any("winogrande (2/3)" in what for what, _ in progress)


def test_a_stop_request_ends_scoring(tiny, cache):
    stop = threading.Event()
    stop.set()
    with pytest.raises(RunStopped):
        score_tasks(tiny.model, tiny.tokenizer, ["piqa"], limit=2, cache=cache, stop=stop)


def test_speech_models_and_bad_limits_are_refused(tiny, cache):
    from tiny import tiny_whisper

    whisper = tiny_whisper()
    with pytest.raises(ConfigError, match="causal"):
        score_tasks(whisper.model, whisper.tokenizer, ["piqa"], limit=2, cache=cache)
    with pytest.raises(ConfigError, match="at least 1"):
        score_tasks(tiny.model, tiny.tokenizer, ["piqa"], limit=0, cache=cache)


def _score(task="piqa", acc=0.7, acc_norm=0.8, stderr=0.02, chance=0.5, picks=(0, 1, 1, 0)):
    return TaskScore(task, len(picks), 100, acc, stderr, acc_norm, None if acc_norm is None else stderr, chance,
                     1.0, list(picks))


def test_retention_counts_only_tasks_clearly_above_chance():
    teacher = [_score("piqa", acc_norm=0.70), _score("boolq", acc=0.52, acc_norm=None, stderr=0.03),
               _score("arc_easy", acc_norm=0.45, chance=0.25)]
    student = [_score("piqa", acc_norm=0.665, picks=(0, 1, 0, 0)), _score("boolq", acc=0.60, acc_norm=None),
               _score("arc_easy", acc_norm=0.40, chance=0.25)]
    result = compare(teacher, student)
    piqa = result["tasks"][0]
    assert piqa["metric"] == "acc_norm" and piqa["retention"] == pytest.approx(0.95)
    assert piqa["retention_above_chance"] == pytest.approx(0.165 / 0.2) and piqa["same_answer"] == 0.75
    assert not result["tasks"][1]["teacher_clearly_above_chance"]  # 0.52 vs chance 0.5 at stderr 0.03
    summary = result["summary"]
    assert summary["tasks"] == ["piqa", "arc_easy"]  # boolq's near-chance 115% "retention" is left out
    assert summary["teacher_mean"] == pytest.approx(0.575) and summary["student_mean"] == pytest.approx(0.5325)
    assert summary["retention"] == pytest.approx(0.5325 / 0.575)
    assert summary["retention_above_chance"] == pytest.approx((0.5325 - 0.375) / (0.575 - 0.375))
    with pytest.raises(ConfigError, match="different documents"):
        compare_task(_score(picks=(0, 1)), _score(picks=(0, 1, 1)))


def test_score_pair_records_both_models_and_flat_keys(tiny, cache):
    from tiny import tiny_llama

    other = tiny_llama(layers=3, seed=1)
    record = score_pair(tiny.model, other.model, tiny.tokenizer, ["piqa"], limit=3)
    zero_shot = record["zero_shot"]
    assert [s["task"] for s in zero_shot["teacher"]] == ["piqa"] == [s["task"] for s in zero_shot["student"]]
    assert "picks" not in zero_shot["teacher"][0] and zero_shot["limit"] == 3
    row = zero_shot["tasks"][0]
    assert row["teacher"] == zero_shot["teacher"][0]["acc_norm"]
    assert row["student"] == zero_shot["student"][0]["acc_norm"]
    assert record["accuracy_retention"] == zero_shot["summary"]["retention"]


def test_eval_config_checks_tasks_and_limit_and_round_trips():
    from lillama_core.config import EvalConfig, RunConfig

    config = RunConfig()
    assert config.eval.tasks == [] and config.eval.limit is None  # no accuracy unless asked
    config.eval.tasks, config.eval.limit = ["zero-shot"], 50
    assert RunConfig.from_json(config.validate().to_json()).eval == config.eval
    with pytest.raises(ConfigError, match="no offline data for mmlu"):
        EvalConfig(tasks=["mmlu"]).validate()
    with pytest.raises(ConfigError, match="at least 1"):
        EvalConfig(tasks=["piqa"], limit=0).validate()
    EvalConfig(tasks=["mmlu"], task_data="hub").validate()  # any name with lm-eval's own data


def test_groups_and_generation_tasks_are_refused(cache):
    from lillama_core.metrics.zeroshot import _check_scorable

    loaded = task_manager(["piqa"]).load([task_spec("piqa", "offline", cache)])["tasks"]
    _check_scorable("piqa", loaded)
    with pytest.raises(ConfigError, match="group of lm-eval tasks"):
        _check_scorable("physical_commonsense", loaded)
    loaded["piqa"].config.output_type = "generate_until"
    with pytest.raises(ConfigError, match="generate_until task"):
        _check_scorable("piqa", loaded)
