import pytest
import torch

from lillama_core.factorize.packing import split_factor, stack_factors


def test_a_stacked_factor_multiplies_as_its_parts_and_splits_back():
    generator = torch.Generator().manual_seed(0)
    factors = [torch.randn(rank, 12, generator=generator) for rank in (8, 4, 8)]
    x = torch.randn(5, 12, generator=generator)
    stacked = stack_factors(factors)
    assert stacked.shape == (20, 12)
    torch.testing.assert_close(x @ stacked.T, torch.cat([x @ a.T for a in factors], dim=-1))
    for got, expected in zip(split_factor(stacked, [8, 4, 8]), factors, strict=True):
        assert torch.equal(got, expected)


def test_factors_that_cannot_stack_or_split_are_refused():
    with pytest.raises(ValueError, match="one input width"):
        stack_factors([torch.zeros(2, 4), torch.zeros(2, 5)])
    with pytest.raises(ValueError, match="do not add up"):
        split_factor(torch.zeros(6, 4), [2, 3])
