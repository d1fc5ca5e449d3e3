"""Low-rank linear layers (alone, or packed to share one A matmul) and rank-map surgery, self-contained so that exports
can ship this file.

An exported checkpoint copies this file next to its weights and subclasses the original model class,
so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` rebuilds the student
without lillama_core installed. Keep it importing torch and transformers alone (it imports neither
transformers nor lillama_core itself; the exported file adds the lines that bind its base classes), and torchao
only inside the integer-weight code, which needs its kernels.
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


class NoKernelError(RuntimeError):
    """The device has no kernel for these integer weights."""


def int4_group(in_features, group=INT4_GROUP):
    """The int4 group size the integer kernels take for this input width: `group`, else 32, else None (the layer
    is then stored as int8: torchao's CPU int4 kernel needs groups of 32, 64 or 128 that divide the input width)."""
    return next((g for g in (group, 32) if in_features % g == 0), None)


class QuantizedLinear(nn.Module):
    """Integer weights as an export stores them, in a layout every device can read: int8 with one scale per output
    channel (`qweight` (out, in) int8, `scale` (out, 1)), or int4 in groups of input columns, two to a byte (low
    nibble first, `qweight` (out, in/2) uint8, values 0..15), dequantized as `(q - 8) * scale + zero` per group
    (`scale`, `zero` (out, groups), torchao's HQQ in the tinygemm convention). Built empty to load buffers into, or
    by `from_linear`; `to_kernel()` packs it for its device's torchao kernel.

    Exports written before torchao (`legacy`) stored int4 symmetric, without `zero`, in groups of 64 padded at the
    end, or one group for narrow inputs; they are read here only to be dequantized into a float nn.Linear."""

    def __init__(self, in_features, out_features, bits, group_size=INT4_GROUP, bias=True, device=None,
                 legacy=False):
        super().__init__()
        self.out_features, self.in_features, self.bits, self.legacy = out_features, in_features, bits, legacy
        if bits == 8:
            self.group = in_features
        elif legacy:
            self.group = min(group_size, in_features + in_features % 2)
        else:
            self.group = int4_group(in_features, group_size)
        columns = in_features + (-in_features % self.group)
        self.register_buffer("qweight", torch.zeros(out_features, columns // 2 if bits == 4 else columns,
                                                    device=device, dtype=torch.uint8 if bits == 4 else torch.int8))
        scale_dtype = torch.float16 if legacy else torch.float32 if bits == 8 else torch.bfloat16
        groups = columns // self.group
        self.register_buffer("scale", torch.ones(out_features, groups, device=device, dtype=scale_dtype))
        self.register_buffer("zero", torch.zeros(out_features, groups, device=device, dtype=scale_dtype)
                             if bits == 4 and not legacy else None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear, bits, group_size=INT4_GROUP):
        """Quantize an nn.Linear with torchao: int8 symmetric per output channel, or int4 with HQQ (calibration-free,
        Badri & Shaji 2023) in groups of `int4_group(in_features, group_size)`, which must not be None."""
        from torchao.quantization import Int8Tensor, PerRow
        from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_affine_hqq

        weight = linear.weight.detach()
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bits, group_size, bias=linear.bias is not None, device=weight.device)
        if bits == 8:
            q = Int8Tensor.from_hp(weight.float(), PerRow())
            layer.qweight.copy_(q.qdata)
            layer.scale.copy_(q.scale)
        else:
            q, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(
                weight.float(), nbits=4, group_size=layer.group, axis=1, compute_dtype=torch.bfloat16,
                device=weight.device)
            q = q.view(out_features, in_features)
            layer.qweight.copy_(q[:, 0::2] | (q[:, 1::2] << 4))
            layer.scale.copy_(scale.view(out_features, -1))
            layer.zero.copy_(zero.view(out_features, -1))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def int4_values(self):
        """(out, columns) uint8 values 0..15 of an int4 layer."""
        return torch.stack((self.qweight & 0xF, self.qweight >> 4), dim=-1).view(self.out_features, -1)

    def to_kernel(self):
        """An nn.Linear whose weight is a torchao tensor for this layer's device (a float nn.Linear for a legacy
        layer). Raises NoKernelError where torchao has no kernel for the device."""
        if self.legacy:
            return self._legacy_dense()
        from torchao.quantization import Int8Tensor

        if self.bits == 8:
            weight = Int8Tensor(self.qweight, self.scale.float(), [1, self.in_features], torch.float32)
            return KernelLinear(weight, self.bias)
        weight = _int4_kernel_tensor(self.int4_values(), self.scale, self.zero, self.group)
        return KernelLinear(weight, self.bias, compute_dtype=torch.bfloat16)

    def _legacy_dense(self):
        q = self.qweight
        if self.bits == 4:
            q = self.int4_values().to(torch.int8) - 8
        w = q.view(self.out_features, -1, self.group).float() * self.scale.float().unsqueeze(-1)
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=q.device)
        dense.weight = nn.Parameter(w.view(self.out_features, -1)[:, : self.in_features], requires_grad=False)
        dense.bias = self.bias
        return dense

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, group={self.group}"


def _int4_kernel_tensor(values, scale, zero, group):
    """A torchao int4 tensor for the device of `values` ((out, in) uint8 0..15): Int4OpaqueTensor on CPU (torch's
    `_weight_int4pack_mm_for_cpu`, bfloat16 activations), Int4TilePackedTo4dTensor on CUDA (tinygemm, compute
    capability 8.0 or newer). Kernel-only padding (rows, columns) is sliced off by the tensors themselves."""
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    out_features, in_features = values.shape
    device = values.device

    def padded(rows, columns):
        pad = (0, columns - in_features, 0, rows - out_features)
        groups = (0, (columns - in_features) // group, 0, rows - out_features)
        return (F.pad(values, pad, value=8),
                pack_tinygemm_scales_and_zeros(F.pad(scale.to(torch.bfloat16), groups, value=1),
                                               F.pad(zero.to(torch.bfloat16), groups), torch.bfloat16))

    if device.type == "cpu":
        from torchao.prototype.quantization.int4 import Int4OpaqueTensor

        q, scale_and_zero = padded(out_features + -out_features % 16, in_features)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        return Int4OpaqueTensor(packed, scale_and_zero, [1, group], values.shape)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        from torchao.quantization import Int4TilePackedTo4dTensor

        q, scale_and_zero = padded(out_features + -out_features % 8, in_features + -in_features % 1024)
        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, 0::2] << 4 | q[:, 1::2]).contiguous(), 8)
        return Int4TilePackedTo4dTensor(packed, scale_and_zero, [1, group], values.shape)
    raise NoKernelError(f"int4 weights run on a CPU or a CUDA GPU of compute capability 8.0 or newer, not on {device}")


class KernelLinear(nn.Linear):
    """nn.Linear whose weight is a torchao quantized tensor. With `compute_dtype` (int4 kernels take bfloat16
    alone) inputs are cast to it and outputs back; the bias is added in the input's dtype."""

    def __init__(self, weight, bias=None, compute_dtype=None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias, self.compute_dtype = bias, compute_dtype

    def forward(self, x):
        y = F.linear(x if self.compute_dtype is None else x.to(self.compute_dtype), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def apply_quantization(model, spec):
    """Replace the linears `spec["modules"]` names by empty QuantizedLinear layers to load an export's integer
    weights into (`spec`: {"version": 2, "group": 64, "modules": {name: bits}}, or the legacy
    {"bits": b, "group": 64, "modules": [names]}); `pack_quantized` then turns them into kernels."""
    spec = spec or {}
    modules = spec.get("modules", [])
    legacy = "version" not in spec
    bits_of = dict.fromkeys(modules, spec.get("bits")) if legacy else modules
    for name, bits in _local_names(model, bits_of).items():
        dense = model.get_submodule(name)
        set_submodule(model, name, QuantizedLinear(dense.in_features, dense.out_features, bits,
                                                   spec.get("group", INT4_GROUP), bias=dense.bias is not None,
                                                   device=dense.weight.device, legacy=legacy))
    return model


def pack_quantized(model):
    """Replace every QuantizedLinear by its kernel (`to_kernel`), in place, on the device its weights are on."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            set_submodule(model, name, module.to_kernel())
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
    `config.lillama_rank_map`, `config.lillama_packs` (absent in exports before packed factors) and
    `config.lillama_quantization`, so `from_pretrained` builds the low-rank modules, their packs and the integer
    modules before it loads their weights.
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
            apply_quantization(self, getattr(config, "lillama_quantization", None))

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            # Integer weights load into portable buffers; only now, on the device they loaded to, are they packed
            # for its kernels.
            return pack_quantized(super().from_pretrained(*args, **kwargs))

    if config_class is not None:
        LowRankModel.config_class = config_class
    LowRankModel.__name__ = LowRankModel.__qualname__ = "Lillama" + base.__name__
    return LowRankModel
