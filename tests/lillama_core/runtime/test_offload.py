"""Streamed blocks: one block at a time visits the accelerator, and the results do not change.

This machine has no accelerator, so the blocks "move" from CPU to CPU: the tests check the bookkeeping that
decides which block is on the accelerator when, and that a streamed run gives the same student."""

import pytest
import torch
from tiny import tiny_llama, tiny_sequences

from lillama_core.compress.loop import Compressor
from lillama_core.config import DistillConfig, HealConfig, ModelConfig, PlanConfig, RunConfig
from lillama_core.data.calibration import CalibrationData
from lillama_core.errors import ConfigError
from lillama_core.events import Step
from lillama_core.modeling.discovery import find_blocks
from lillama_core.planning.planner import make_plan
from lillama_core.runtime.offload import is_streamed, on_accelerator, resident, stream_blocks


def streamed_tiny(layers=3):
    loaded = tiny_llama(layers=layers)
    blocks = [b.module for b in find_blocks(loaded.model)]
    stream_blocks(loaded.model, blocks, torch.device("cpu"))
    return loaded, blocks


def test_each_block_visits_only_while_it_runs():
    loaded, blocks = streamed_tiny()
    seen = []
    for block in blocks:  # registered after the streaming hooks, so it runs once the block has arrived
        block.register_forward_pre_hook(lambda module, args: seen.append([on_accelerator(b) for b in blocks]))
    with torch.no_grad():
        loaded.model(input_ids=tiny_sequences(2, 16))
    assert seen == [[True, False, False], [False, True, False], [False, False, True]]
    assert not any(on_accelerator(b) for b in blocks)
    with resident(blocks[1]):
        assert [on_accelerator(b) for b in blocks] == [False, True, False]
        with torch.no_grad():
            loaded.model(input_ids=tiny_sequences(1, 8))
        assert on_accelerator(blocks[1])  # a pinned block does not leave after its forward
    assert not on_accelerator(blocks[1])


def test_a_streamed_run_keeps_one_teacher_block_at_a_time_and_gives_the_same_student():
    calibration = CalibrationData(tiny_sequences(12, 32), "random", 0)
    config = DistillConfig(init="whitened")
    plain = tiny_llama(layers=3)
    plan = make_plan(plain, PlanConfig(strategy="uniform", rank=8, reduction=None))
    expected = Compressor(plain, calibration, plan, config, batch_size=4).run().student

    loaded, blocks = streamed_tiny()
    visiting = []

    def on_event(event):
        if isinstance(event, Step):
            visiting.append((event.layer, [i for i, b in enumerate(blocks) if on_accelerator(b)]))

    student = Compressor(loaded, calibration, plan, config, batch_size=4, on_event=on_event).run().student
    assert visiting and all(on == [layer] for layer, on in visiting)
    student_blocks = [b.module for b in find_blocks(student)]
    assert all(is_streamed(b) and not on_accelerator(b) for b in student_blocks)
    ids = tiny_sequences(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, expected(input_ids=ids).logits)


def test_offloading_and_healing_do_not_mix():
    with pytest.raises(ConfigError, match="offload"):
        RunConfig(model=ModelConfig(offload=True), heal=HealConfig(tokens=1024)).validate()


def test_blocks_go_home_to_their_own_host_tensors_without_copying():
    """Going home restores each parameter's host tensor instead of copying the accelerator's back, so a
    checkpoint's memory-mapped weights stay file pages. On this CPU-only machine a visit is simulated by
    giving the parameters new storage, as a move to an accelerator does."""
    from torch import nn

    from lillama_core.modeling.discovery import share_weights_copy
    from lillama_core.runtime.offload import stream_block

    model = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)))
    block = stream_block(model[0], torch.device("cpu"))
    home = [p.data_ptr() for p in block.parameters()]

    def visit(module):
        for p in module.parameters():
            p.data = p.data.clone()
        assert [p.data_ptr() for p in module.parameters()] != home

    block.register_forward_pre_hook(lambda module, args: visit(module))
    with torch.no_grad():
        block(torch.ones(2, 8))
    assert [p.data_ptr() for p in block.parameters()] == home
    with resident(block):
        visit(block)
    assert [p.data_ptr() for p in block.parameters()] == home
    copy = share_weights_copy(model)[0]  # a weight-sharing copy (the student) goes home to the same tensors
    with torch.no_grad():
        copy(torch.ones(1, 8))
    assert [p.data_ptr() for p in copy.parameters()] == home
