"""Low-rank linear layer and rank-map surgery, self-contained so that exports can ship this file.

An exported checkpoint copies this file next to its weights and subclasses the original model class,
so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` rebuilds the student
without lillama_core installed. Keep it importing torch alone.
"""

from torch import nn


class LowRankLinear(nn.Module):
    """y = B(A x) + bias: two plain matmuls, `rank * (in + out)` weights instead of `in * out`."""

    def __init__(self, in_features, out_features, rank, bias=True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.B = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def weight(self):
        """The dense product B·A, for code that reads `.weight` of a linear layer."""
        return self.B.weight @ self.A.weight

    @property
    def bias(self):
        return self.B.bias

    def forward(self, x):
        return self.B(self.A(x))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


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


def lowrank_subclass(base):
    """A subclass of a transformers model class whose constructor applies `config.lillama_rank_map`,
    so `from_pretrained` builds the low-rank modules before it loads their weights."""

    class LowRankModel(base):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            apply_rank_map(self, getattr(config, "lillama_rank_map", None) or {})

    LowRankModel.__name__ = LowRankModel.__qualname__ = "Lillama" + base.__name__
    return LowRankModel
