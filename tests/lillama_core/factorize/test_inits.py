import pytest
import torch

import lillama_core.factorize.inits as inits
from lillama_core.config import DistillConfig, Init
from lillama_core.errors import ConfigError
from lillama_core.factorize.inits import init_named, register_init, to_low_rank


def test_every_init_is_registered_and_only_whitened_reads_the_covariance():
    assert {name: init_named(name).needs_covariance for name in Init} == {"whitened": True, "svd": False,
                                                                          "random": False}


def test_whitened_init_uses_the_covariance_it_is_given():
    torch.manual_seed(0)
    dense = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(256, 16) * torch.linspace(0.01, 3.0, 16)  # inputs that favour the last features
    cov = x.T @ x / x.shape[0]
    whitened, plain = to_low_rank(dense, 3, "whitened", cov), to_low_rank(dense, 3, "svd")
    with torch.no_grad():
        error = {name: (low(x) - dense(x)).norm().item() for name, low in (("whitened", whitened), ("svd", plain))}
    assert error["whitened"] < error["svd"]
    with pytest.raises(ValueError, match="covariance"):
        to_low_rank(dense, 3, "whitened")


def test_an_init_registered_in_a_test_is_used_by_to_low_rank_and_accepted_by_the_config(monkeypatch):
    monkeypatch.setattr(inits, "_INITS", inits._INITS.copy())

    @register_init("zeros")
    def zeros(weight, rank, cov, generator):
        return torch.zeros(weight.shape[0], rank), torch.zeros(rank, weight.shape[1])

    low = to_low_rank(torch.nn.Linear(6, 4), 2, "zeros")
    assert low.rank == 2 and not low.A.weight.any()
    DistillConfig(init="zeros").validate()


def test_an_unknown_init_is_one_config_error():
    with pytest.raises(ConfigError, match="init must be one of whitened, svd, random, not 'pca'"):
        to_low_rank(torch.nn.Linear(6, 4), 2, "pca")
