import pytest
import torch

from lillama_core.config import ModelConfig
from lillama_core.errors import ModelLoadError
from lillama_core.modeling.discovery import find_blocks, find_linears, module_group
from lillama_core.modeling.loading import describe, load_model, resolve_device, resolve_dtype


def test_blocks_and_linears_are_found_generically(tiny):
    blocks = find_blocks(tiny.model)
    assert [b.name for b in blocks] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert set(find_linears(blocks[0].module)) == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


@pytest.mark.parametrize("name, group", [
    ("self_attn.q_proj", "attention"), ("attention.wqkv", "attention"), ("mlp.down_proj", "mlp"),
    ("block_sparse_moe.experts.3.w1", "experts"), ("mlp.experts.0.gate_up_proj", "experts"), ("fc1", "mlp"),
    ("mixer.in_proj", "ssm"), ("mixer.out_proj", "ssm"),
    ("block_sparse_moe.gate", "router"), ("mlp.gate", "router"), ("mlp.gate_proj", "mlp"), ("norm_proj", "other"),
])
def test_module_groups(name, group):
    assert module_group(name) == group


def test_local_folder_loads(tiny_model_dir):
    loaded = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    assert loaded.num_layers == 3
    facts = describe(loaded)
    assert facts["architecture"] == "LlamaForCausalLM" and facts["layers"] == 3
    assert facts["dtype"] == "float32" and facts["device"] == "cpu"


@pytest.mark.parametrize("name, message", [
    ("/definitely/not/here", "not found"),
    ("./missing-folder", "not found"),
    ("/tmp/nothing.gguf", "GGUF file not found"),
    ("someone/surely-not-a-real-model-xyz", "could not load"),
])
def test_bad_model_names_give_one_clear_message(name, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(ModelConfig(name=name, device="cpu"))


def test_folder_without_config_and_non_model_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(ModelConfig(name=str(tmp_path)))
    stray = tmp_path / "weights.bin"
    stray.write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="not a .gguf model"):
        load_model(ModelConfig(name=str(stray)))


def test_folder_with_a_config_but_no_weights_and_a_model_without_blocks(tmp_path, tiny):
    from transformers import LlamaForCausalLM

    config_only = tmp_path / "config-only"
    tiny.model.config.save_pretrained(config_only)
    with pytest.raises(ModelLoadError, match="has a config.json but no weights"):
        load_model(ModelConfig(name=str(config_only), device="cpu"))
    blockless = tmp_path / "blockless"
    config = tiny.model.config.__class__.from_dict({**tiny.model.config.to_dict(), "num_hidden_layers": 0})
    LlamaForCausalLM(config).save_pretrained(blockless)
    tiny.tokenizer.save_pretrained(blockless)
    with pytest.raises(ModelLoadError, match="found no repeated blocks with linear layers to compress"):
        load_model(ModelConfig(name=str(blockless), device="cpu"))


@pytest.mark.parametrize("error, message", [
    (OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the "
             "cached files."), "the Hugging Face Hub cannot be reached"),
    (OSError("someone/typo is not a local folder and is not a valid model identifier listed on "
             "'https://huggingface.co/models'"), "could not load 'someone/typo': someone/typo is not a local folder"),
    (ValueError("The repository someone/typo contains custom code which must be executed to correctly load the "
                "model. Please pass the argument `trust_remote_code=True` to allow custom code to be run."),
     "someone/typo needs code from its repository; enable trust_remote_code only if you trust it"),
])
def test_hub_failures_are_explained(monkeypatch, error, message):
    import transformers

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fail)
    with pytest.raises(ModelLoadError) as caught:
        load_model(ModelConfig(name="someone/typo", device="cpu"))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_corrupted_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="could not read GGUF"):
        load_model(ModelConfig(name=str(bad)))


def test_device_and_dtype_defaults_follow_the_hardware():
    device = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_one_gpu_has_one_name_so_the_busy_check_sees_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert str(resolve_device("auto")) == str(resolve_device("cuda")) == str(resolve_device("cuda:0")) == "cuda:0"
    assert str(resolve_device("cuda:1")) == "cuda:1"


@pytest.mark.real_model
def test_built_in_smollm2_is_converted_once_then_read_from_the_cache(smollm, monkeypatch):
    assert describe(smollm)["layers"] == 30 and describe(smollm)["has_chat_template"]
    from pathlib import Path

    import transformers
    assert list(Path(smollm.source).glob("*.safetensors"))
    real = transformers.AutoModelForCausalLM.from_pretrained

    def no_gguf(*args, **kwargs):
        assert "gguf_file" not in kwargs, "the GGUF file was converted again"
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_gguf)
    again = load_model(ModelConfig(device="cpu"))
    assert again.source == smollm.source and again.model.config.num_hidden_layers == 30


def test_corrupted_safetensors_is_a_clear_error(tiny_model_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00\x10not really safetensors" * 10)
    with pytest.raises(ModelLoadError, match="could not load"):
        load_model(ModelConfig(name=str(broken), device="cpu"))


def test_unknown_architecture_and_remote_code_need_opt_in(tmp_path, tiny):
    import json

    custom = tmp_path / "custom"  # a real model whose classes live in the folder, as on the Hub
    tiny.model.save_pretrained(custom)
    tiny.tokenizer.save_pretrained(custom)
    (custom / "configuration_x.py").write_text(
        "from transformers import LlamaConfig\n\n"
        "class XConfig(LlamaConfig):\n    model_type = 'lillama_made_up_arch'\n")
    (custom / "modeling_x.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_x import XConfig\n\n"
        "class XForCausalLM(LlamaForCausalLM):\n    config_class = XConfig\n")
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="lillama_made_up_arch", architectures=["XForCausalLM"],
                  auto_map={"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (custom / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="needs code from its repository; enable trust_remote_code"):
        load_model(ModelConfig(name=str(custom), device="cpu"))
    opted_in = load_model(ModelConfig(name=str(custom), device="cpu", trust_remote_code=True))
    assert type(opted_in.model).__name__ == "XForCausalLM" and opted_in.num_layers == tiny.num_layers
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "lillama_made_up_arch"}))
    with pytest.raises(ModelLoadError, match="not supported by the installed transformers"):
        load_model(ModelConfig(name=str(plain), device="cpu"))


def test_load_model_unfuses_moe_experts_and_a_loaded_model_leaves_its_model_alone(tmp_path):
    import transformers as T
    from tiny import tiny_tokenizer

    from lillama_core.modeling.loading import LoadedModel
    from lillama_core.modeling.shipped import UnfusedExperts, is_fused_experts

    tokenizer = tiny_tokenizer()
    config = T.MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model = T.MixtralForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    by_hand = LoadedModel(model, tokenizer, "mixtral", "random", torch.device("cpu"), torch.float32)
    assert is_fused_experts(by_hand.model.model.layers[0].mlp.experts)  # building one rewrites nothing
    loaded = load_model(ModelConfig(name=str(tmp_path), device="cpu"))
    assert all(isinstance(layer.mlp.experts, UnfusedExperts) for layer in loaded.model.model.layers)
