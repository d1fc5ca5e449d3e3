import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import SAMPLE_TEXT, STRICT_CHAT_TEMPLATE, fail_in, overflowing_float16_llama, tiny_opt

from lillama_core.cli import COMMANDS, ProgressPrinter, _run_config, build_parser, compress_command, main
from lillama_core.config import RunConfig
from lillama_core.config_args import ALIASES
from lillama_core.errors import ConfigError
from lillama_core.events import LayerFinished, Step, read_events
from lillama_core.export import load_compressed, read_record


@pytest.fixture
def texts(tmp_path):
    calibration = tmp_path / "calib.txt"
    calibration.write_text(SAMPLE_TEXT * 20)
    evaluation = tmp_path / "eval.txt"
    evaluation.write_text(SAMPLE_TEXT * 4)
    return calibration, evaluation


def _compress_args(model_dir, texts, out, *extra):
    calibration, evaluation = texts
    return ["compress", "--runs-dir", str(out.parent / "runs"), "--model", str(model_dir),
            "--calibration", str(calibration), "--tokens", "512",
            "--seq-len", "32", "--batch-size", "4", "--eval-text", str(evaluation), "--eval-tokens", "256",
            "--eval-seq-len", "32", "--out", str(out), "--reduction", "0.1", "--strategy", "bottom", *extra]


def test_compress_json_summary_and_export(tiny_model_dir, texts, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(_compress_args(tiny_model_dir, texts, out, "--json", "--heal-tokens", "256", "--activations",
                               "disk")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("params_before", "params_after", "teacher_ppl", "student_ppl", "seconds", "out"):
        assert key in summary
    assert summary["params_after"] < summary["params_before"]
    assert 0.1 <= 1 - summary["params_after"] / summary["params_before"] < 0.12
    assert summary["out"] == str(out)
    record = read_record(out)
    config = RunConfig.from_dict(record["config"])  # the run config travels with it
    assert config.plan.strategy == "bottom" and config.distill.activations == "disk"
    metrics = record["metrics"]
    assert metrics["heal_tokens"] > 0 and metrics["heal_kl_after"] <= metrics["heal_kl_before"]
    card = (out / "README.md").read_text()  # written at export, before evaluation, then again with the scores
    assert f"| perplexity (held-out text) | {summary['teacher_ppl']:.2f} | {summary['student_ppl']:.2f} |" in card
    model, _ = load_compressed(out)
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_config_file_reproduces_a_run_and_flags_override_it(tiny_model_dir, texts, tmp_path, capsys):
    config = RunConfig()
    config.model.name = str(tiny_model_dir)
    config.calibration.source, config.calibration.tokens, config.calibration.seq_len = str(texts[0]), 256, 32
    config.eval.text, config.eval.tokens, config.eval.seq_len = str(texts[1]), 128, 32
    config.plan.strategy, config.plan.reduction = "uniform", 0.1
    path = tmp_path / "run.json"
    config.save(path)
    out = tmp_path / "from-config"
    assert main(["compress", "--config", str(path), "--lr", "0.001", "--out", str(out), "--json",
                 "--runs-dir", str(tmp_path / "runs")]) == 0
    saved = RunConfig.from_dict(read_record(out)["config"])
    assert saved.plan.strategy == "uniform" and saved.calibration.tokens == 256
    assert saved.distill.lr == 0.001


# Every flag `lillama` had before its flags were generated from the configs, and the values it set then.
OLD_FLAGS = [
    (["--model", "m"], {"model.name": "m"}),
    (["--device", "cpu"], {"model.device": "cpu"}),
    (["--dtype", "float16"], {"model.dtype": "float16"}),
    (["--trust-remote-code"], {"model.trust_remote_code": True}),
    (["--offload"], {"model.offload": True}),
    (["--calibration", "c.jsonl"], {"calibration.source": "c.jsonl"}),
    (["--text-field", "body"], {"calibration.text_field": "body"}),
    (["--dataset-config", "wikitext-2-raw-v1"], {"calibration.dataset_config": "wikitext-2-raw-v1"}),
    (["--split", "validation"], {"calibration.split": "validation"}),
    (["--tokens", "4096"], {"calibration.tokens": 4096}),
    (["--seq-len", "128"], {"calibration.seq_len": 128}),
    (["--batch-size", "2"], {"calibration.batch_size": 2}),
    (["--reduction", "0.3"], {"plan.reduction": 0.3}),
    (["--rank", "64"], {"plan.rank": 64, "plan.reduction": None}),
    (["--rank", "64", "--reduction", "0.3"], {"plan.rank": 64, "plan.reduction": None}),
    (["--strategy", "energy"], {"plan.strategy": "energy"}),
    (["--layer-keep", "0.5"], {"plan.layer_keep": 0.5}),
    (["--rank-multiple", "1"], {"plan.rank_multiple": 1}),
    (["--groups", "attention, mlp,"], {"plan.groups": ["attention", "mlp"]}),
    (["--init", "svd"], {"distill.init": "svd"}),
    (["--lr", "3e-4"], {"distill.lr": 3e-4}),
    (["--epochs", "2"], {"distill.epochs": 2}),
    (["--loss", "teacher"], {"distill.loss": "teacher"}),
    (["--no-distill"], {"distill.train": False}),
    (["--activations", "disk"], {"distill.activations": "disk"}),
    (["--heal-tokens", "256"], {"heal.tokens": 256}),
    (["--heal-lr", "1e-5"], {"heal.lr": 1e-5}),
    (["--seed", "7"], {"seed": 7, "calibration.seed": 7}),
    (["--eval-text", "e.txt"], {"eval.text": "e.txt"}),
    (["--eval-tokens", "128"], {"eval.tokens": 128}),
    (["--eval-seq-len", "64"], {"eval.seq_len": 64}),
    (["--eval-audio", "clips"], {"eval.audio": "clips"}),
]
MODEL_FLAGS = {"--model", "--device", "--dtype", "--trust-remote-code", "--offload"}
EVAL_FLAGS = {"--eval-text", "--eval-tokens", "--eval-seq-len", "--eval-audio"}
PLAN_FLAGS = {"--reduction", "--rank", "--strategy", "--layer-keep", "--rank-multiple", "--groups", "--calibration",
              "--text-field"}
OLD_FLAGS_OF = {"compress": {words[0] for words, _ in OLD_FLAGS}, "plan": MODEL_FLAGS | PLAN_FLAGS,
                "eval": MODEL_FLAGS | EVAL_FLAGS, "chat": MODEL_FLAGS, "transcribe": MODEL_FLAGS}


def _with(values: dict) -> RunConfig:
    config = RunConfig()
    for path, value in values.items():
        *sections, name = path.split(".")
        target = config
        for section in sections:
            target = getattr(target, section)
        setattr(target, name, value)
    return config


def test_the_old_flag_table_covers_every_alias():
    assert OLD_FLAGS_OF["compress"] == {flag for flag in ALIASES if flag != "--distill"} | {"--no-distill"}


@pytest.mark.parametrize("command, words, expected", [
    (command, words, expected) for command, flags in OLD_FLAGS_OF.items()
    for words, expected in OLD_FLAGS if words[0] in flags])
def test_every_old_flag_sets_the_config_value_it_set_before(command, words, expected, capsys):
    extra = ["audio.wav"] if command == "transcribe" else []
    assert main([command, *extra, *words, "--print-config"]) == 0
    assert RunConfig.from_yaml(capsys.readouterr().out) == _with(expected)  # and nothing else moved


def test_a_yaml_recipe_loads_and_a_flag_given_overrides_it_even_at_its_default(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  name: my-model\nplan:\n  strategy: uniform\n  reduction: 0.3\n"
                      "distill:\n  lr: 3e-4\n  schedule: constant\n  keep_best: false\n")
    assert main(["compress", "--config", str(recipe), "--lr", "0.001", "--keep-best", "--print-config"]) == 0
    config = RunConfig.from_yaml(capsys.readouterr().out)
    assert config.distill.lr == 0.001 == RunConfig().distill.lr and config.distill.keep_best  # defaults, given
    assert (config.model.name, config.plan.strategy, config.plan.reduction, config.distill.schedule) == (
        "my-model", "uniform", 0.3, "constant")
    assert config.calibration == RunConfig().calibration  # what the recipe leaves out keeps its default


def test_print_config_parses_back_to_the_same_recipe_and_loads_no_model(tmp_path, capsys):
    expected = _with({"model.name": "/no/such/model", "distill.weight_decay": 0.01, "heal.temperature": 2.0,
                      "plan.overrides": {"*.layers.0.*": None}, "calibration.chat_template": False,
                      "distill.warmup_steps": 0, "heal.warmup_steps": 8})
    args = ["compress", "--model", "/no/such/model", "--weight-decay", "0.01", "--heal.temperature", "2",
            "--overrides", '{"*.layers.0.*": null}', "--no-chat-template", "--distill.warmup-steps", "0",
            "--heal.warmup-steps", "8", "--print-config"]
    assert main(args) == 0  # no --out needed, and the missing model is never loaded
    printed = capsys.readouterr().out
    assert RunConfig.from_yaml(printed) == expected
    (tmp_path / "again.yaml").write_text(printed)
    assert main(["compress", "--config", str(tmp_path / "again.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed


RECIPES = {
    "defaults": {},
    "lists, dicts, None, enums and bools": {
        "model.name": "HuggingFaceTB/SmolLM2-360M", "model.dtype": "bfloat16", "model.offload": True,
        "calibration.text_field": "content", "calibration.tokens": 2048, "calibration.chat_template": False,
        "plan.strategy": "energy", "plan.reduction": 0.35, "plan.groups": ["mlp", "attention"],
        "plan.overrides": {"*.layers.0.*": None, "*.mlp.*": 16}, "plan.whitened_energy": False,
        "distill.init": "svd", "distill.lr": 3e-4, "distill.grad_clip": None, "distill.loss": "teacher",
        "distill.train": False, "distill.activations": "disk", "eval.text": "held out.txt", "seed": 3},
    "fixed rank, both seeds": {
        "plan.strategy": "uniform", "plan.rank": 64, "plan.reduction": None, "plan.rank_multiple": 1,
        "distill.weight_decay": 0.01, "distill.warmup_steps": 0, "seed": 5, "calibration.seed": 5,
        "heal.tokens": 4096, "heal.temperature": 2.0},
    "calibration seed alone": {"calibration.seed": 7, "distill.schedule": "constant", "distill.keep_best": False},
}


@pytest.mark.parametrize("values", RECIPES.values(), ids=RECIPES)
def test_the_compress_command_of_a_recipe_parses_back_to_the_same_recipe(values):
    config = _with(values).validate()
    words = compress_command(config, "OUT")
    assert words[:2] == ["lillama", "compress"] and words[-2:] == ["--out", "OUT"]
    assert len(words) - 4 <= 2 * len(values) + 1  # flags only for what differs (seed carries calibration.seed)
    args = build_parser().parse_args(words[1:])  # after "lillama"
    assert _run_config(args) == config and args.out == "OUT"


def test_the_compress_command_uses_the_short_names_and_spells_every_kind():
    words = compress_command(_with(RECIPES["lists, dicts, None, enums and bools"]), "OUT", plan="plan.json")
    line = " ".join(words)
    for part in ("--model HuggingFaceTB/SmolLM2-360M", "--offload", "--no-chat-template", "--groups mlp,attention",
                 '--overrides {"*.layers.0.*": null, "*.mlp.*": 16}', "--grad-clip none", "--no-distill",
                 "--activations disk", "--seed 3 ", "--calibration.seed 0", "--plan plan.json --out OUT"):
        assert part in line
    assert "--rank" not in line and "--strategy energy" in line
    fixed = " ".join(compress_command(_with(RECIPES["fixed rank, both seeds"]), "OUT"))
    assert "--rank 64" in fixed and "--seed 5" in fixed and "calibration.seed" not in fixed and "reduction" not in fixed


def test_a_setting_the_command_line_cannot_spell_is_one_config_error():
    with pytest.raises(ConfigError, match="calibration.text_field.*recipe file"):
        compress_command(_with({"calibration.text_field": "none"}), "OUT")  # would read back as None


def test_the_printed_compress_command_runs_and_prints_the_recipe(capsys):
    config = _with(RECIPES["lists, dicts, None, enums and bools"]).validate()
    assert main([*compress_command(config, "OUT")[1:], "--print-config"]) == 0
    assert RunConfig.from_yaml(capsys.readouterr().out) == config


def test_compress_still_needs_out_unless_printing(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["compress", "--lr", "0.001"])
    assert exited.value.code == 2 and "required: --out" in capsys.readouterr().err


@pytest.mark.parametrize("recipe, message", [
    (None, "cannot read config"),
    ("distill:\n  learning_rate: 0.1\n", "learning_rate"),
    ("plan:\n  reduction: 2\n", "between 0 and 1"),
])
def test_bad_recipes_exit_2_in_one_line(recipe, message, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    if recipe is not None:
        path.write_text(recipe)
    assert main(["compress", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lillama: error:") and message in err[0]


@pytest.mark.parametrize("args, message", [
    (["compress", "--model", "/no/such/folder", "--out", "x"], "not found"),
    (["compress", "--calibration", "/no/such/file.txt", "--out", "x"], "not found"),
    (["compress", "--reduction", "1.5", "--out", "x"], "between 0 and 1"),
    (["compress", "--rank", "0", "--out", "x"], "at least 1"),
    (["compress", "--lr", "-1", "--out", "x"], "above 0"),
    (["compress", "--tokens", "0", "--out", "x"], "positive"),
])
def test_user_errors_exit_non_zero_with_one_line(args, message, capsys, tiny_model_dir, tmp_path):
    if args[1] != "--model":
        args = [args[0], "--model", str(tiny_model_dir), *args[1:]]
    args = [*args, "--runs-dir", str(tmp_path / "runs")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("lillama: error")]
    assert errors == [err[-1]] and err[-1].startswith("lillama: error:") and message in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no clutter left behind


def test_rank_too_large_for_the_model(tiny_model_dir, texts, tmp_path, capsys):
    args = _compress_args(tiny_model_dir, texts, tmp_path / "o") + ["--rank", "500", "--strategy", "uniform"]
    assert main(args) == 2
    assert "exceeds" in capsys.readouterr().err


def test_existing_output_is_refused_without_overwrite(tiny_model_dir, texts, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    assert main(_compress_args(tiny_model_dir, texts, out, "--no-eval")) == 2
    assert "already exists" in capsys.readouterr().err


def test_chats_the_template_refuses_are_counted_in_one_warning(tiny_model_dir, texts, tmp_path, capsys):
    """A Gemma-style template raises on a system turn: the run goes on and says how many records it changed."""
    import shutil

    from transformers import AutoTokenizer

    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "strict-model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = STRICT_CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                        {"role": "user", "content": SAMPLE_TEXT}]})
                               for _ in range(8)))
    args = _compress_args(model_dir, (chats, texts[1]), tmp_path / "student", "--no-eval")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert re.search(r"\[calibration\] the chat template refused (\d+) of \1 chat records \(first: record 1, "
                     r"'System role not supported'\); used \1 with system turns folded", err), err
    # The run's log records resident memory at every step (the app's CPU memory chart plots it).
    steps = [e for e in read_events(next((tmp_path / "runs").iterdir()) / "events.jsonl") if isinstance(e, Step)]
    assert steps and all(step.rss_bytes > 2**20 for step in steps)
    assert main(["plan", "--model", str(model_dir), "--calibration", str(chats), "--strategy", "sensitivity"]) == 0
    assert re.search(r"warning: the chat template refused (\d+) of \1 chat records", capsys.readouterr().err)


def test_eval_chat_export_and_plan_commands(tiny_model_dir, texts, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(_compress_args(tiny_model_dir, texts, out, "--no-eval")) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--eval-text", str(texts[1]), "--eval-tokens", "128",
                 "--eval-seq-len", "32", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["perplexity"] > 1 and record["generate_tokens_per_s"] > 0
    assert main(["eval", "--model", str(out), "--eval-text", str(texts[1]), "--eval-tokens", "128",
                 "--eval-seq-len", "32", "--json", "--quantize", "int8", "--no-speed"]) == 0
    quantized = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert quantized["weight_bytes"] < record["weight_bytes"] and quantized["perplexity"] > 1
    assert main(["chat", "--model", str(out), "--prompt", "fox", "--max-new-tokens", "5"]) == 0
    assert "tokens/s" in capsys.readouterr().err
    merged = tmp_path / "merged"
    assert main(["export", str(out), "--out", str(merged), "--merge"]) == 0
    assert read_record(merged)["merged"] is True
    int4 = tmp_path / "int4"
    assert main(["export", str(out), "--out", str(int4), "--quantize", "int4"]) == 0
    assert read_record(int4)["quantize"] == "int4"
    assert main(["eval", "--model", str(int4), "--eval-text", str(texts[1]), "--eval-tokens", "128",
                 "--eval-seq-len", "32", "--json", "--no-speed"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"] > 1
    assert main(["export", str(int4), "--out", str(tmp_path / "again"), "--quantize", "int8"]) == 2
    assert "already quantized" in capsys.readouterr().err
    plan_file = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tiny_model_dir), "--strategy", "top", "--reduction", "0.1",
                 "--save", str(plan_file)]) == 0
    assert "fewer" in capsys.readouterr().out
    # the default (sensitivity) plan measures the model, so `plan` reads calibration data for it
    assert main(["plan", "--model", str(tiny_model_dir), "--calibration", str(texts[0]), "--reduction", "0.1"]) == 0
    assert "fewer" in capsys.readouterr().out
    assert main(_compress_args(tiny_model_dir, texts, tmp_path / "planned", "--no-eval", "--plan",
                               str(plan_file))) == 0


def test_help_of_every_subcommand(capsys):
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args([command, "--help"])
        assert exited.value.code == 0, command
        assert capsys.readouterr().out.startswith(f"usage: lillama {command}")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "--help"])
    shown = capsys.readouterr().out
    assert all(flag in shown for flag in ("--distill.weight-decay", "--heal.temperature", "--no-distill",
                                          "--config", "--print-config"))
    # A help text with a literal % (argparse %-formats help) once crashed `compress --help` and `plan --help`.
    result = subprocess.run([sys.executable, "-m", "lillama_core.cli", "plan", "--help"], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "26%" in result.stdout


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "lillama_core.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "compress" in result.stdout


def _resume_counting_trained_layers(run_dir, out, capsys, monkeypatch) -> tuple[list, dict]:
    """`lillama resume RUN`; returns one entry per layer it trained (not restored) and the JSON summary."""
    import lillama_core.compress.loop as engine

    trained = []
    monkeypatch.setattr(engine.LayerDistiller, "train",
                        lambda self, *a, real=engine.LayerDistiller.train: trained.append(1) or real(self, *a))
    assert main(["resume", str(run_dir), "--out", str(out), "--no-eval", "--json"]) == 0
    return trained, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_interrupted_run_resumes_from_its_last_finished_layer(tiny_model_dir, texts, tmp_path, capsys, monkeypatch):
    import lillama_core.compress.loop as engine
    from lillama_core.jobs import LAYERS_DIR

    runs = tmp_path / "runs"
    args = _compress_args(tiny_model_dir, texts, tmp_path / "first", "--no-eval", "--strategy", "uniform",
                          "--reduction", "0.2")
    real_save = engine.LayerCheckpoints.save
    saved = []

    def crash_after_first_layer(self, index, *rest):
        real_save(self, index, *rest)
        saved.append(index)
        if len(saved) == 1:
            raise KeyboardInterrupt  # as if the process were killed right after layer 0

    monkeypatch.setattr(engine.LayerCheckpoints, "save", crash_after_first_layer)
    assert main(args) == 130
    (run_dir,) = runs.iterdir()
    assert sorted(p.name for p in (run_dir / LAYERS_DIR).glob("*.json")) == ["layer_000.json", "plan.json"]
    out = tmp_path / "resumed"
    trained, summary = _resume_counting_trained_layers(run_dir, out, capsys, monkeypatch)
    assert len(trained) == 2  # layers 1 and 2 only: layer 0 came back from its checkpoint
    assert 0.2 <= summary["reduction"] < 0.22
    model, _ = load_compressed(out)
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_a_killed_process_resumes_from_its_last_finished_layer(tiny_model_dir, texts, tmp_path, capsys, monkeypatch):
    import os
    import signal
    import subprocess
    import sys
    import time

    from lillama_core.jobs import LAYERS_DIR

    calibration, evaluation = texts
    calibration.write_text(SAMPLE_TEXT * 100)
    runs = tmp_path / "runs"
    # Enough steps per layer (two epochs over 4k tokens) that the kill lands while a later layer trains.
    args = _compress_args(tiny_model_dir, texts, tmp_path / "first", "--no-eval", "--strategy", "uniform",
                          "--reduction", "0.2", "--tokens", "4096", "--epochs", "2")
    process = subprocess.Popen([sys.executable, "-c", "import sys; from lillama_core.cli import main; "
                                                      "sys.exit(main(sys.argv[1:]))", *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(runs.glob(f"*/{LAYERS_DIR}/layer_000.json")) and time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(30) == -signal.SIGKILL
    (run_dir,) = runs.iterdir()
    finished = sorted(p.name for p in (run_dir / LAYERS_DIR).glob("layer_*.json"))
    assert finished and "layer_002.json" not in finished

    out = tmp_path / "resumed"
    trained, summary = _resume_counting_trained_layers(run_dir, out, capsys, monkeypatch)
    assert len(trained) == 3 - len(finished) and summary["status"] == "completed"
    model, _ = load_compressed(out)
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()



@pytest.fixture
def overflowing_model_dir(tmp_path):
    """A tiny Llama saved in float32 (where it is finite) whose layer 1 overflows when loaded in float16."""
    loaded = overflowing_float16_llama()
    loaded.model.float().save_pretrained(tmp_path / "overflowing")
    loaded.tokenizer.save_pretrained(tmp_path / "overflowing")
    return tmp_path / "overflowing"


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_float16_overflow_is_one_line_naming_the_layer(overflowing_model_dir, texts, tmp_path, capsys):
    args = _compress_args(overflowing_model_dir, texts, tmp_path / "student", "--dtype", "float16")
    args[args.index("--strategy") + 1] = "sensitivity"
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("lillama: error: layer 1 (model.layers.1) produced inf/NaN activations in float16: "
                       "run with --dtype bfloat16 or float32")
    assert "Traceback" not in "\n".join(err)


def test_a_nan_perplexity_is_written_as_json_null(overflowing_model_dir, texts, tmp_path, capsys):
    # Bottom-first compresses layer 0 only, so the run never reaches the overflow; the evaluation does.
    out = tmp_path / "student"
    assert main(_compress_args(overflowing_model_dir, texts, out, "--dtype", "float16", "--json")) == 0
    summary = _strict_json(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["teacher_ppl"] is None and summary["student_ppl"] is None
    assert summary["params_after"] < summary["params_before"]
    run_dir = Path(read_record(out)["run_dir"])
    assert _strict_json((run_dir / "metrics.json").read_text())["teacher_ppl"] is None
    assert _strict_json((out / "lillama.json").read_text())["metrics"]["student_ppl"] is None


def test_progress_names_the_experts_no_token_reached(capsys):
    ProgressPrinter()(LayerFinished(layer=3, init_loss=1.0, best_loss=0.5, final_loss_teacher_input=0.5,
                                    final_loss_student_input=0.5, best_step=4, seconds=1.0, params_before=100,
                                    params_after=50, unreached_experts=2))
    assert "layer 3: 2 expert(s) saw no calibration token" in capsys.readouterr().err

@pytest.fixture(scope="module")
def tiny_opt_dir(tmp_path_factory):
    """A tiny OPT with 64 learned positions, saved as an ordinary transformers folder."""
    folder = tmp_path_factory.mktemp("tiny-opt")
    loaded = tiny_opt(64)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def test_calibration_longer_than_the_model_positions_exits_2_before_any_work(tiny_opt_dir, texts, tmp_path, capsys):
    args = _compress_args(tiny_opt_dir, texts, tmp_path / "o", "--seq-len", "128")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "lillama: error: calibration seq_len 128 is longer than the 64 positions OPTForCausalLM" in err
    assert "Traceback" not in err and "[calibration]" not in err  # refused before reading any data
    assert not any((tmp_path / "runs").iterdir())


def test_default_eval_window_on_a_64_position_model_is_shortened_and_the_student_exported(tiny_opt_dir, texts,
                                                                                          tmp_path, capsys):
    out = tmp_path / "opt-student"
    args = _compress_args(tiny_opt_dir, texts, out, "--json")
    args[args.index("--eval-seq-len") + 1] = "512"  # the default window
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "evaluation window shortened from 512 to 64 tokens" in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    metrics = read_record(out)["metrics"]  # the scores reach the export made before evaluating
    assert metrics["eval_seq_len"] == 64 and metrics["student_ppl"] == summary["student_ppl"] > 1
    assert main(["eval", "--model", str(out), "--eval-text", str(texts[1]), "--eval-tokens", "256", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["generate_tokens_per_s"] > 0


def _fail_on_eval_windows(monkeypatch):
    """Every Llama block raises on 48-token inputs: only the evaluation windows below are that long."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    fail_in(monkeypatch, LlamaDecoderLayer, lambda module, hidden: hidden.shape[1] == 48)


def test_a_failing_evaluation_exits_2_in_one_line_and_leaves_the_export(tiny_model_dir, texts, tmp_path, capsys,
                                                                        monkeypatch):
    _fail_on_eval_windows(monkeypatch)
    out = tmp_path / "student"
    args = _compress_args(tiny_model_dir, texts, out)
    args[args.index("--eval-seq-len") + 1] = "48"
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert err[-1] == ("lillama: error: evaluation failed in LlamaForCausalLM at layer 0: RuntimeError: boom "
                       f"(full traceback in {run_dir / 'traceback.txt'})")
    assert "RuntimeError: boom" in (run_dir / "traceback.txt").read_text()
    model, _ = load_compressed(out)  # exported before the evaluation failed
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_a_failing_forward_in_lillama_eval_exits_2_and_keeps_the_traceback(tiny_model_dir, texts, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.setenv("LILLAMA_HOME", str(tmp_path / "home"))
    _fail_on_eval_windows(monkeypatch)
    assert main(["eval", "--model", str(tiny_model_dir), "--eval-text", str(texts[1]), "--eval-tokens", "128",
                 "--eval-seq-len", "48", "--no-speed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lillama: error: evaluation failed in LlamaForCausalLM at layer 0: RuntimeError: boom")
    (saved,) = (tmp_path / "home" / "errors").glob("*/traceback.txt")
    assert str(saved) in err[-1] and "Traceback" in saved.read_text()


def test_plan_and_compress_share_the_sensitivity_measurement(tiny_model_dir, texts, tmp_path, monkeypatch, capsys):
    """`lillama plan` and `lillama compress` draw the planning slice of the calibration data the same way, so the
    second finds the first's stored measurement (planning/cache.py) instead of measuring again."""
    import lillama_core.planning.sensitivity as sensitivity

    calls = []
    real = sensitivity.measure_sensitivity
    monkeypatch.setattr(sensitivity, "measure_sensitivity", lambda *a, **k: calls.append(1) or real(*a, **k))
    common = ["--model", str(tiny_model_dir), "--calibration", str(texts[0]), "--reduction", "0.1"]
    assert main(["plan", *common]) == 0
    assert len(calls) == 1
    assert main(["compress", *common, "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "student"),
                 "--tokens", "1024", "--batch-size", "4", "--no-eval", "--strategy", "sensitivity"]) == 0
    assert len(calls) == 1 and "reusing the stored measurement" in capsys.readouterr().err



def test_graphs_flag_decodes_chat_and_eval_speed_through_one_compiled_decoder(tiny_model_dir, texts, capsys,
                                                                              monkeypatch):
    """--graphs gives the same sampled answers, announces the warm-up once for a whole stdin chat, and times
    `lillama eval`'s decoding through the compiled step. Traced by dynamo, run eagerly: seconds, not minutes."""
    import io

    from transformers import CompileConfig

    from lillama_core.runtime import graphs

    monkeypatch.setattr(graphs, "compile_config", lambda device: CompileConfig(backend="eager", mode="default"))
    made = []

    class Recorded(graphs.GraphDecoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(graphs, "GraphDecoder", Recorded)
    chat = ["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "6", "--seed", "5"]
    monkeypatch.setattr("sys.stdin", io.StringIO("fox\nbrown dog\n"))
    assert main(chat) == 0
    eager = capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("fox\nbrown dog\n"))
    assert main([*chat, "--graphs"]) == 0
    compiled = capsys.readouterr()
    assert compiled.out == eager.out and graphs.WARM_UP_NOTE not in eager.err
    assert compiled.err.count(graphs.WARM_UP_NOTE) == 1 and len(made) == 1  # one compile serves both prompts
    assert main(["eval", "--model", str(tiny_model_dir), "--eval-text", str(texts[1]), "--eval-tokens", "128",
                 "--eval-seq-len", "32", "--json", "--graphs"]) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out.strip().splitlines()[-1])
    assert record["graphs"] is True and record["generate_tokens_per_s"] > 0
    assert graphs.WARM_UP_NOTE in captured.err and len(made) == 2 and made[1]._warm  # eval's decoder compiled
