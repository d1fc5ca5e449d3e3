import copy

import pytest
import torch
import transformers as T
from tiny import tiny_llama, tiny_sequences, tiny_tokenizer, tiny_whisper

from lillama_core.compress import layer as layer_module
from lillama_core.compress.batching import batch_slices, join_batches, run_block
from lillama_core.compress.capture import capture_block_inputs, run_block_over
from lillama_core.compress.layer import LayerData, LayerDistiller
from lillama_core.config import DistillConfig
from lillama_core.data.calibration import CalibrationData
from lillama_core.factorize.inits import to_low_rank
from lillama_core.modeling.discovery import find_blocks
from lillama_core.modeling.loading import LoadedModel
from lillama_core.modeling.shipped import set_submodule

CPU = torch.device("cpu")


def test_per_sample_tensors_are_stacked_and_shared_ones_passed_once():
    rotary = (torch.randn(1, 5, 4), torch.randn(1, 5, 4))
    mask_t, mask_s = torch.zeros(3, 1, 5, 5), torch.ones(3, 1, 5, 5)
    joined = join_batches({"mask": mask_t, "rotary": rotary, "flag": False, "none": None},
                          {"mask": mask_s, "rotary": rotary, "flag": False, "none": None}, rows=3)
    assert torch.equal(joined["mask"], torch.cat([mask_t, mask_s]))
    assert joined["rotary"][0] is rotary[0] and joined["rotary"][1] is rotary[1]
    assert joined["flag"] is False and joined["none"] is None
    assert join_batches({"ids": torch.arange(5)[None]}, {"ids": torch.arange(5)[None] + 1}, rows=3) is None
    assert join_batches({"flag": True}, {"flag": False}, rows=3) is None


def _mistral() -> LoadedModel:  # a sliding-window mask is a per-sample [batch, 1, q, k] tensor
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = T.MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    return LoadedModel(T.MistralForCausalLM(config).eval(), tokenizer, "mistral", "random", CPU, torch.float32)


def _layer_data(loaded: LoadedModel, n: int = 8, seq: int = 16) -> tuple[torch.nn.Module, LayerData, list[slice]]:
    """A low-rank student of block 0 and its data, with student inputs that differ from the teacher's."""
    block = find_blocks(loaded.model)[0].module
    batches = batch_slices(0, n, 4)
    starts, inputs = capture_block_inputs(loaded.model, find_blocks(loaded.model),
                                          CalibrationData(tiny_sequences(n, seq), "random", 0), batches, CPU)
    teacher_in = starts[0]
    kwargs_for = inputs.kwargs_for(0)
    teacher_out = run_block_over(block, teacher_in, torch.empty_like(teacher_in), kwargs_for, batches, CPU)
    student = copy.deepcopy(block)
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        set_submodule(student, name, to_low_rank(student.get_submodule(name), 8, "svd", None, None))
    student_in = teacher_in + 0.1 * torch.randn_like(teacher_in)
    return student, LayerData(teacher_in, teacher_out, student_in, kwargs_for), batches


def _loss_and_gradients(student, data, batches, rows):
    distiller = LayerDistiller(student, data, DistillConfig(loss="joint"), CPU, batches, [], None)
    loss_t, loss_s = distiller._losses(rows)
    distiller._objective(loss_t, loss_s).backward()
    grads = [p.grad.clone() for p in distiller.factors]
    for p in distiller.factors:
        p.grad = None
    return loss_t.detach(), loss_s.detach(), grads


@pytest.mark.parametrize("build", [lambda: tiny_llama(layers=1), _mistral], ids=["llama", "mistral-sliding-mask"])
def test_one_stacked_forward_gives_the_losses_and_gradients_of_two(build, monkeypatch):
    student, data, batches = _layer_data(build())
    calls = []
    monkeypatch.setattr(layer_module, "run_block", lambda *a: calls.append(a[1].shape[0]) or run_block(*a))
    stacked = _loss_and_gradients(student, data, batches, batches[1])
    assert calls == [8]  # one forward over both paths' 4 rows
    monkeypatch.setattr(layer_module, "join_batches", lambda *a: None)
    separate = _loss_and_gradients(student, data, batches, batches[1])
    assert calls == [8, 4, 4]
    torch.testing.assert_close(stacked[:2], separate[:2], rtol=1e-5, atol=1e-6)
    assert stacked[0] != stacked[1]  # the paths really differ
    for a, b in zip(stacked[2], separate[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_decoder_block_stacks_each_paths_own_cross_attention_states():
    block = tiny_whisper().model.model.decoder.layers[0]
    torch.manual_seed(0)
    hidden = torch.randn(2, 2, 6, 64)
    encoder = torch.randn(2, 2, 10, 64)  # [path, rows, frames, hidden]: the teacher's and the student's encoder
    kwargs = [{"attention_mask": None, "encoder_hidden_states": encoder[p], "use_cache": False} for p in range(2)]
    joined = join_batches(kwargs[0], kwargs[1], rows=2)
    with torch.no_grad():
        stacked = run_block(block, hidden.flatten(0, 1), joined)
        separate = torch.cat([run_block(block, hidden[p], kwargs[p]) for p in range(2)])
    torch.testing.assert_close(stacked, separate, rtol=1e-5, atol=1e-6)
