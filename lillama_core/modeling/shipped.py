"""Low-rank linear layers (alone, or packed to share one A matmul) and rank-map surgery, self-contained so that exports
can ship this file.

An exported checkpoint copies this file next to its weights and subclasses the original model class,
so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` rebuilds the student
without lillama_core installed. Keep it importing torch and transformers alone (it imports neither
transformers nor lillama_core itself; the exported file adds the lines that bind its base classes).
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn


class FactoredLinear(nn.Module):
    """What a linear layer stored as factors offers code that reads a linear's attributes: `weight` (the dense
    product B·A) and `bias`. Subclasses hold `B` (rank -> out, with the bias) and say where their A is."""

    def __init__(self, in_features, out_features, rank, bias=True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.B = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def weight(self):
        """The dense product B·A (out, in), for code that reads `.weight` of a linear layer."""
        return self.B.weight @ self.a_weight

    @property
    def bias(self):
        return self.B.bias

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankLinear(FactoredLinear):
    """y = B(A x) + bias: two plain matmuls, `rank * (in + out)` weights instead of `in * out`."""

    def __init__(self, in_features, out_features, rank, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, rank, bias, device, dtype)
        self.A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)

    @property
    def a_weight(self):
        return self.A.weight

    def forward(self, x):
        return self.B(self.A(x))


class LowRankPack(nn.Module):
    """The A factors of low-rank modules that read one input, stacked into one matmul: `A` maps in -> r_1 + ... +
    r_n, member i's rows are `ranks[i]` long, in member order.

    Members (PackedLowRankLinear) call `part(x, i)`. The first member called with an input computes A x for all,
    the others called with the same tensor object take their slice of it (one kernel instead of n). The product
    is dropped once every member has taken its part, so no activation outlives the forward that made it. Reuse is
    keyed by the tensor's identity, not its values: a member called with any other tensor computes afresh, so
    outputs never depend on which modules are packed. One (input, parts, left) tuple is read and replaced whole,
    so threads sharing a model each get their own input's parts."""

    def __init__(self, in_features, ranks, device=None, dtype=None):
        super().__init__()
        self.in_features, self.ranks = in_features, tuple(int(r) for r in ranks)
        self.A = nn.Linear(in_features, sum(self.ranks), bias=False, device=device, dtype=dtype)
        self._cache = None

    def part(self, x, index):
        """Member `index`'s A x (..., ranks[index]), a view of the packed product."""
        cache = self._cache
        if cache is None or cache[0] is not x:
            cache = (x, self.A(x).split(self.ranks, dim=-1), len(self.ranks))
        left = cache[2] - 1
        self._cache = (cache[0], cache[1], left) if left else None
        return cache[1][index]

    def extra_repr(self):
        return f"in_features={self.in_features}, ranks={list(self.ranks)}"


class PackedLowRankLinear(FactoredLinear):
    """y = B (A x)[rows of this member] + bias, with A x computed once for its whole LowRankPack. Member 0 holds
    the pack as a submodule (its weights are saved once, under that member's name); the others refer to it."""

    def __init__(self, out_features, pack, index, bias=True, device=None, dtype=None):
        super().__init__(pack.in_features, out_features, pack.ranks[index], bias, device, dtype)
        self.index = index
        if index == 0:
            self.pack = pack
        else:
            self.__dict__["pack"] = pack

    @property
    def a_weight(self):
        start = sum(self.pack.ranks[: self.index])
        return self.pack.A.weight[start: start + self.rank]

    def forward(self, x):
        return self.B(self.pack.part(x, self.index))


def set_submodule(root, name, module):
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def apply_rank_map(model, rank_map):
    """Replace each named nn.Linear by an uninitialised LowRankLinear of the given rank."""
    for name, rank in rank_map.items():
        dense = model.get_submodule(name)
        low = LowRankLinear(
            dense.in_features,
            dense.out_features,
            int(rank),
            bias=dense.bias is not None,
            device=dense.weight.device,
            dtype=dense.weight.dtype,
        )
        set_submodule(model, name, low)
    return model


def apply_packs(model, packs):
    """Replace each list of LowRankLinear names in `packs` (modules reading one input, in member order) by
    PackedLowRankLinear members of one LowRankPack. Each member keeps its B; the pack's A is left uninitialised,
    for `from_pretrained` to load, or for the caller to fill with the members' stacked A factors.

    Raises:
        ValueError: a named module is not a LowRankLinear, or the members' inputs differ in width."""
    for names in packs:
        members = [model.get_submodule(name) for name in names]
        if not all(type(m) is LowRankLinear for m in members) or len({m.in_features for m in members}) != 1:
            raise ValueError(f"cannot pack {names}: a pack joins low-rank modules of one input width")
        weight = members[0].A.weight
        pack = LowRankPack(members[0].in_features, [m.rank for m in members], device=weight.device, dtype=weight.dtype)
        for index, (name, low) in enumerate(zip(names, members, strict=True)):
            packed = PackedLowRankLinear(low.out_features, pack, index, bias=low.B.bias is not None, device="meta")
            packed.B = low.B
            set_submodule(model, name, packed)
    return model


INT4_GROUP = 64


class QuantizedLinear(nn.Module):
    """A linear layer with symmetric integer weights: int8 per output channel, or int4 per group of input
    columns, packed two to a byte. Built empty (to load saved buffers into) or by `from_linear`."""

    def __init__(self, in_features, out_features, bits, group_size=INT4_GROUP, bias=True, device=None):
        super().__init__()
        self.out_features, self.in_features, self.bits = out_features, in_features, bits
        # Narrow inputs (the B factor of a small rank) get one group, not one padded to group_size.
        self.group = in_features if bits == 8 else min(group_size, in_features + in_features % 2)
        columns = in_features + (-in_features % self.group)
        packed = columns // 2 if bits == 4 else columns
        self.register_buffer("qweight", torch.zeros(out_features, packed, device=device,
                                                    dtype=torch.uint8 if bits == 4 else torch.int8))
        self.register_buffer("scale", torch.ones(out_features, columns // self.group, device=device,
                                                 dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear, bits, group_size=INT4_GROUP):
        weight = linear.weight.detach().float()
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bits, group_size, bias=linear.bias is not None, device=weight.device)
        padded = F.pad(weight, (0, -in_features % layer.group)).view(out_features, -1, layer.group)
        qmax = 2 ** (bits - 1) - 1
        # The scale is rounded to its stored precision before use, so dequantizing is exact to half a step.
        scale = (padded.abs().amax(-1, keepdim=True) / qmax).to(torch.float16).float().clamp_min(2**-24)
        q = torch.clamp(torch.round(padded / scale), -qmax - 1, qmax).to(torch.int16).view(out_features, -1)
        if bits == 4:  # two signed nibbles per byte, offset to 0..15
            q = (q[:, 0::2] + 8) | ((q[:, 1::2] + 8) << 4)
        layer.qweight.copy_(q.to(layer.qweight.dtype))
        layer.scale.copy_(scale.squeeze(-1))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def dequantized(self):
        q = self.qweight
        if self.bits == 4:
            q = torch.stack(((q & 0xF).to(torch.int8) - 8, (q >> 4).to(torch.int8) - 8), dim=-1)
        w = q.view(self.out_features, -1, self.group).float() * self.scale.float().unsqueeze(-1)
        return w.view(self.out_features, -1)[:, : self.in_features]

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized().to(x.dtype), bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, group={self.group}"


def apply_quantization(model, spec):
    """Replace the linears `spec["modules"]` names by empty QuantizedLinear layers of `spec["bits"]`."""
    for name in (spec or {}).get("modules", []):
        dense = model.get_submodule(name)
        set_submodule(model, name, QuantizedLinear(dense.in_features, dense.out_features, spec["bits"],
                                                   spec.get("group", INT4_GROUP), bias=dense.bias is not None,
                                                   device=dense.weight.device))
    return model


class Expert(nn.Module):
    """One expert of a fused MoE bank as two ordinary linears, so it is factorised like any other module."""

    def __init__(self, hidden, intermediate, device=None, dtype=None):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, device=device, dtype=dtype)


class UnfusedExperts(nn.Module):
    """Drop-in for transformers' fused experts (`gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I) as 3-D
    parameters, called as `experts(hidden, top_k_index, top_k_weights)`), holding each expert as `Expert`
    children named 0..E-1. The fused original is kept with empty weights, to rebuild it for dense exports."""

    def __init__(self, fused):
        super().__init__()
        experts, intermediate2, hidden = fused.gate_up_proj.shape
        device, dtype = fused.gate_up_proj.device, fused.gate_up_proj.dtype
        for index in range(experts):
            expert = Expert(hidden, intermediate2 // 2, device=device, dtype=dtype)
            if device.type != "meta":
                with torch.no_grad():
                    expert.gate_up_proj.weight.copy_(fused.gate_up_proj[index])
                    expert.down_proj.weight.copy_(fused.down_proj[index])
            self.add_module(str(index), expert)
        # Plain attributes, not submodules: the activation has no weights, and the template must stay out of
        # the state dict.
        self.__dict__["act_fn"] = fused.act_fn
        template = copy.copy(fused)
        template._parameters = {name: nn.Parameter(torch.empty(0, device="meta"), requires_grad=False)
                                for name in fused._parameters}
        self.__dict__["template"] = template

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for index, expert in enumerate(self.children()):
            token, slot = torch.where(top_k_index == index)
            if token.numel() == 0:
                continue
            gate, up = expert.gate_up_proj(hidden_states[token]).chunk(2, dim=-1)
            routed = expert.down_proj(self.act_fn(gate) * up) * top_k_weights[token, slot, None]
            out.index_add_(0, token, routed.to(out.dtype))
        return out

    def to_fused(self, dense_weight):
        """The original fused module, its 3-D weights stacked from `dense_weight(linear)` of each expert."""
        fused = copy.copy(self.template)
        fused._parameters = dict(fused._parameters)
        experts = list(self.children())
        for name in ("gate_up_proj", "down_proj"):
            stacked = torch.stack([dense_weight(getattr(e, name)) for e in experts])
            fused._parameters[name] = nn.Parameter(stacked, requires_grad=False)
        return fused


def is_fused_experts(module):
    """Whether `module` follows transformers' default fused-experts layout (gate and up concatenated, not
    transposed, no biases), the only one UnfusedExperts reproduces."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or not hasattr(module, "act_fn"):
        return False
    layout = dict(has_gate=True, has_bias=False, is_transposed=False, is_concatenated=True,
                  has_post_expert_norm=False)
    if any(getattr(module, flag, default) != default for flag, default in layout.items()):
        return False
    experts, intermediate2, hidden = gate_up.shape
    return intermediate2 % 2 == 0 and tuple(down.shape) == (experts, hidden, intermediate2 // 2) and \
        set(module._parameters) == {"gate_up_proj", "down_proj"}


def _same_output(fused, unfused, top_k=2, tokens_per_expert=4):
    experts, _, hidden = fused.gate_up_proj.shape
    generator = torch.Generator().manual_seed(0)
    tokens = tokens_per_expert * experts
    x = torch.randn(tokens, hidden, generator=generator).to(fused.gate_up_proj)
    index = torch.stack([torch.randperm(experts, generator=generator)[:min(top_k, experts)] for _ in range(tokens)])
    weights = torch.rand(index.shape, generator=generator).to(x)
    with torch.no_grad():
        expected, got = fused(x, index.to(x.device), weights), unfused(x, index.to(x.device), weights)
    scale = expected.float().norm().clamp_min(1e-6)
    return bool(((expected.float() - got.float()).norm() / scale) < 1e-2)


def unfuse_experts(model, check=True):
    """Replace every fused experts module by UnfusedExperts, in place; returns how many were replaced.
    With `check`, each replacement must reproduce the original's output on random routing, or the module
    is left fused (its experts are then simply not compressible)."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if not is_fused_experts(module):
            continue
        unfused = UnfusedExperts(module)
        if check and module.gate_up_proj.device.type != "meta" and not _same_output(module, unfused):
            continue
        set_submodule(model, name, unfused)
        replaced += 1
    return replaced


LILLAMA_MODEL_TYPE = "lillama_"


def lowrank_config(base):
    """A subclass of a transformers config class with its own `model_type` ("lillama_" + the base's), so
    transformers cannot mistake a compressed export for its dense base: without the shipped code, Auto classes
    refuse the folder instead of building the dense model with random weights where the factors are."""

    class LowRankConfig(base):
        model_type = LILLAMA_MODEL_TYPE + base.model_type
        _auto_class = None  # a remote-code base's registration would make save_pretrained ship this file instead

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # config.json carries the class's model_type; in memory the student keeps its base's, which
            # transformers branches on (Whisper's generate keeps a decoder prompt as given only for "whisper").
            self.__dict__["model_type"] = base.model_type

    LowRankConfig.__name__ = LowRankConfig.__qualname__ = "Lillama" + base.__name__
    return LowRankConfig


def _local_names(model, names):
    """Module names of the task model (`model.layers.0...`) as they are in `model`, which may be the backbone
    alone (`layers.0...`, what AutoModel builds); names of modules the backbone lacks (the head) are dropped."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    owned = dict(model.named_modules())
    local = {}
    for name, value in names.items():
        if name not in owned and name.startswith(prefix) and name[len(prefix):] in owned:
            name = name[len(prefix):]
        if name in owned:
            local[name] = value
    return local


def lowrank_subclass(base, config_class=None):
    """A subclass of a transformers model class (task model or backbone) whose constructor applies
    `config.lillama_rank_map` and `config.lillama_packs` (absent in exports before packed factors), so
    `from_pretrained` builds the low-rank modules and their packs before it loads their weights.
    `config_class` (from `lowrank_config`) is the class `from_pretrained` reads config.json with."""

    class LowRankModel(base):
        _auto_class = None  # a remote-code base's registration would make save_pretrained ship this file instead

        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            if getattr(config, "lillama_unfused_experts", False):
                unfuse_experts(self, check=False)
            apply_rank_map(self, _local_names(self, getattr(config, "lillama_rank_map", None) or {}))
            apply_packs(self, [list(_local_names(self, dict.fromkeys(names)))
                               for names in getattr(config, "lillama_packs", None) or []])
            quantization = getattr(config, "lillama_quantization", None) or {}
            if quantization:
                quantization = {**quantization, "modules": list(_local_names(
                    self, dict.fromkeys(quantization.get("modules", []))))}
            apply_quantization(self, quantization)

    if config_class is not None:
        LowRankModel.config_class = config_class
    LowRankModel.__name__ = LowRankModel.__qualname__ = "Lillama" + base.__name__
    return LowRankModel
