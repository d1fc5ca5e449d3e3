"""Structure discovery: one generic walk finds a model's repeated blocks, their linear layers and each
layer's role, with no per-architecture tables."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Block:
    index: int  # position in the run order, across all block lists
    name: str  # dotted path in the model, e.g. "model.layers.3"
    module: nn.Module


def find_block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every ModuleList whose items are repeated blocks of one class that hold linear layers."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 1:
            continue
        classes = {type(child) for child in module}
        if len(classes) == 1 and any(isinstance(m, nn.Linear) for m in module[0].modules()):
            if not any(name.startswith(outer + ".") for outer, _ in found):  # keep the outermost lists
                found.append((name, module))
    return found


def find_blocks(model: nn.Module) -> list[Block]:
    """The blocks in the order the model runs them: one stack for a causal LM, the encoder's then the
    decoder's for an encoder-decoder model, numbered across both."""
    lists = find_block_lists(model)
    if not lists:
        return []
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        lists = [max(lists, key=lambda item: len(item[1]))]  # other lists (e.g. a vision tower) stay untouched
    blocks = []
    for name, layers in lists:  # named_modules order: the encoder is defined, and runs, first
        blocks.extend(Block(len(blocks), f"{name}.{i}", layer) for i, layer in enumerate(layers))
    return blocks


def stack_of(block: Block) -> str:
    """The dotted name of the block list a block belongs to, e.g. "model.decoder.layers"."""
    return block.name.rpartition(".")[0]


def stack_starts(blocks: list[Block]) -> list[Block]:
    """The first block of every stack: where the hidden states start afresh from the model's own inputs."""
    return [b for i, b in enumerate(blocks) if i == 0 or stack_of(b) != stack_of(blocks[i - 1])]


def find_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Linear modules inside a block, keyed by their name relative to the block."""
    return {name: m for name, m in block.named_modules() if type(m) is nn.Linear}


# The one small table the generic discovery needs: words in module names that tell their role.
_ROUTER_WORDS = ("router", "block_sparse_moe.gate", "mlp.gate", "moe.gate", "shared_expert_gate")


_SSM_WORDS = ("mixer.", "in_proj", "x_proj", "dt_proj")


_ATTENTION_WORDS = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "qkv", "query", "key", "value")


_EXPERT_WORDS = ("experts.",)


_MLP_WORDS = ("mlp", "ffn", "feed_forward", "fc1", "fc2", "gate", "up_proj", "down_proj", "expert", "w1", "w2", "w3")


def module_group(local_name: str) -> str:
    """attention, mlp, experts (MoE experts), ssm (Mamba mixers), router (MoE gates: tiny and fragile, never
    compressed by default) or other."""
    lowered = local_name.lower()
    if lowered.endswith(_ROUTER_WORDS) or "router" in lowered:
        return "router"
    if any(word in lowered for word in _SSM_WORDS):
        return "ssm"
    if any(word in lowered for word in _ATTENTION_WORDS):
        return "attention"
    if any(word in lowered for word in _EXPERT_WORDS):
        return "experts"
    if any(word in lowered for word in _MLP_WORDS):
        return "mlp"
    return "other"


def share_weights_copy(model: nn.Module) -> nn.Module:
    """A new module tree whose parameters and buffers are the original tensors: replacing a block
    in the copy leaves the original untouched and costs no memory for the blocks left alone."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def count_parameters(model: nn.Module) -> int:
    """All parameters, embeddings included, each shared tensor counted once (tied embeddings)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def weight_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
