"""Packed factors: the low-rank modules of a block that read the same input share one A matmul.

Which modules share an input is found by running the model once and watching the tensor each low-rank module
receives, not from module names, so it holds for every family: q/k/v of self-attention and gate/up of an MLP
pack; Whisper's cross-attention k/v (both read the encoder output) pack while its q (the decoder's) does not;
MoE experts (each reads its own tokens) and down projections stay alone. Packs never cross blocks. The module
classes live in `shipped.py`, which exports carry; this module finds, builds and undoes packs."""

from __future__ import annotations

import torch
from torch import nn

from ..factorize.packing import split_factor, stack_factors
from .discovery import find_blocks
from .shipped import LowRankLinear, PackedLowRankLinear, apply_packs, set_submodule


def token_inputs(model: nn.Module, length: int = 8) -> dict[str, torch.Tensor]:
    """Forward inputs of a causal language model for `shared_input_groups`: one row of `length` token ids."""
    device = next(model.parameters()).device
    return {"input_ids": (torch.arange(length, device=device) % model.config.vocab_size)[None]}


@torch.no_grad()
def shared_input_groups(model: nn.Module, inputs: dict) -> list[list[str]]:
    """Names of the low-rank modules (LowRankLinear) that read one tensor object in a forward on `inputs`, one
    list per tensor with two or more readers, in call order, never across blocks. A module called more than
    once in the forward is left out: it may not share its other inputs.

    Args:
        model: a student with LowRankLinear modules inside its blocks.
        inputs: keyword arguments of one forward (a few tokens: `token_inputs`, or calibration rows).
    """
    calls: dict[str, list[torch.Tensor]] = {}
    block_of: dict[str, str] = {}
    hooks = []
    for block in find_blocks(model):
        for local, module in block.module.named_modules():
            if type(module) is LowRankLinear:
                name = f"{block.name}.{local}"
                block_of[name] = block.name
                hooks.append(module.register_forward_pre_hook(
                    lambda _, args, name=name: calls.setdefault(name, []).append(args[0] if args else None)))
    try:
        model(**inputs, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    groups: list[tuple[str, torch.Tensor, list[str]]] = []  # (block, input, readers); tensors held: ids stay unique
    for name, seen in calls.items():
        if len(seen) != 1 or seen[0] is None:
            continue
        group = next((g for g in groups if g[0] == block_of[name] and g[1] is seen[0]), None)
        if group is None:
            groups.append((block_of[name], seen[0], [name]))
        else:
            group[2].append(name)
    return [names for _, _, names in groups if len(names) > 1]


@torch.no_grad()
def pack_low_rank(model: nn.Module, inputs: dict) -> list[list[str]]:
    """Pack, in place, every group of low-rank modules that `shared_input_groups` finds: their A factors are
    stacked into one LowRankPack per group and each becomes a PackedLowRankLinear with its own B. The outputs are
    the unpacked model's up to floating-point summation order. Returns the packs (module names, member order)."""
    groups = shared_input_groups(model, inputs)
    factors = [[model.get_submodule(name).A.weight for name in names] for names in groups]
    apply_packs(model, groups)
    for names, stacked in zip(groups, factors, strict=True):
        model.get_submodule(names[0]).pack.A.weight.copy_(stack_factors(stacked))
    return groups


def packs_of(model: nn.Module) -> list[list[str]]:
    """The model's packs as lists of member names in member order (what an export records to rebuild them)."""
    members: dict[int, list[tuple[int, str]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, PackedLowRankLinear):
            members.setdefault(id(module.pack), []).append((module.index, name))
    return [[name for _, name in sorted(named)] for named in members.values()]


@torch.no_grad()
def unpack_low_rank(model: nn.Module) -> int:
    """Undo `pack_low_rank` in place: every PackedLowRankLinear becomes a LowRankLinear with its own copy of its
    rows of the pack's A (trainable and mergeable again), keeping its B. Returns how many modules were unpacked."""
    unpacked = 0
    for names in packs_of(model):
        members = [model.get_submodule(name) for name in names]
        pack = members[0].pack
        for name, member, a in zip(names, members, split_factor(pack.A.weight, pack.ranks), strict=True):
            low = LowRankLinear(member.in_features, member.out_features, member.rank, bias=member.bias is not None,
                                device="meta")
            low.A.weight = nn.Parameter(a.clone(), requires_grad=pack.A.weight.requires_grad)
            low.B = member.B
            set_submodule(model, name, low)
            unpacked += 1
    return unpacked
