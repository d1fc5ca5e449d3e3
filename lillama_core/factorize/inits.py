"""The factor initialisations, each registered once: how W (out x in) becomes B (out x r) · A (r x in),
and whether that needs the layer's input covariance (the loop records it only then)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import Init
from ..modeling.shipped import LowRankLinear
from ..registry import Registry
from .svd import Covariance, low_rank_from_factors, random_factors, svd_factors, whitened_factors

# (weight [out, in] float32, rank, covariance (input [in, in] or OutputCovariance [out, out]) or None, generator)
# -> (B [out, r], A [r, in])
Factorizer = Callable[[torch.Tensor, int, "Covariance | None", "torch.Generator | None"],
                      tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class FactorInit:
    name: str
    factorize: Factorizer
    needs_covariance: bool  # reads the layer's covariance (factorize.svd.Covariance)


_INITS: Registry[FactorInit] = Registry("init")


def register_init(name: str, needs_covariance: bool = False) -> Callable[[Factorizer], Factorizer]:
    """Decorator: register `factorize` as the initialisation `name`."""

    def register(factorize: Factorizer) -> Factorizer:
        _INITS.add(name, FactorInit(name, factorize, needs_covariance))
        return factorize

    return register


def init_named(name: str) -> FactorInit:
    """The registered initialisation `name`.

    Raises:
        ConfigError: no initialisation has that name.
    """
    return _INITS[name]


@register_init(Init.WHITENED, needs_covariance=True)
def _whitened(weight, rank, cov, generator):
    if cov is None:
        raise ValueError("whitened init needs the input covariance of the layer")
    return whitened_factors(weight, cov.to(weight.device), rank)


@register_init(Init.SVD)
def _svd(weight, rank, cov, generator):
    return svd_factors(weight, rank)


@register_init(Init.RANDOM)
def _random(weight, rank, cov, generator):
    return random_factors(weight, rank, generator)


def to_low_rank(dense: nn.Linear, rank: int, init: str, cov: Covariance | None = None,
                generator: torch.Generator | None = None) -> LowRankLinear:
    """A float32 LowRankLinear initialised from a dense layer; keeps the bias on the output side.

    Args:
        dense: the teacher's linear (out x in).
        rank: r, the inner size of B · A.
        init: a registered initialisation name.
        cov: the layer's input covariance [in, in] or output covariance, for inits that need it.
        generator: randomness for the random init.
    Raises:
        ConfigError: an unknown init.
    """
    b, a = init_named(init).factorize(dense.weight.detach().float(), rank, cov, generator)
    return low_rank_from_factors(dense, b, a)
