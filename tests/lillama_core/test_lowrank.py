import torch

from lillama_core.lowrank import (CovarianceAccumulator, LowRankLinear, cholesky_whitener, merge_low_rank,
                                  svd_factors, to_low_rank, whitened_factors)


def test_full_rank_svd_reproduces_the_weight():
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    b, a = svd_factors(w, 32)
    assert b.shape == (48, 32) and a.shape == (32, 32)
    torch.testing.assert_close(b @ a, w, atol=1e-5, rtol=1e-5)


def test_truncated_svd_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    w = torch.randn(40, 30)
    b, a = svd_factors(w, 5)
    s = torch.linalg.svdvals(w.double())
    err = torch.linalg.matrix_norm((w - b @ a).double())
    assert torch.isclose(err, s[5:].square().sum().sqrt(), rtol=1e-4)


def _correlated_inputs(n=4096, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g) * torch.logspace(0, -3, d)  # strongly anisotropic inputs
    return torch.randn(n, d, generator=g) @ mixing.T


def test_whitened_init_has_lower_activation_error_than_svd_on_correlated_inputs():
    torch.manual_seed(1)
    w = torch.randn(24, 32)
    x = _correlated_inputs()
    cov = CovarianceAccumulator(32, torch.device("cpu"))
    cov.add(x)
    rank = 6
    b_s, a_s = svd_factors(w, rank)
    b_w, a_w = whitened_factors(w, cov.mean(), rank)
    err_svd = ((x @ (w - b_s @ a_s).T).norm())
    err_white = ((x @ (w - b_w @ a_w).T).norm())
    assert err_white < 0.5 * err_svd


def test_whitened_full_rank_reproduces_the_weight():
    torch.manual_seed(2)
    w = torch.randn(16, 16)
    cov = CovarianceAccumulator(16, torch.device("cpu"))
    cov.add(_correlated_inputs(d=16))
    b, a = whitened_factors(w, cov.mean(), 16)
    torch.testing.assert_close(b @ a, w, atol=1e-3, rtol=1e-3)


def test_cholesky_falls_back_when_covariance_is_singular():
    x = torch.randn(100, 8)
    x[:, 3] = 0.0  # a dead input feature makes X^T X singular
    cov = x.T @ x
    assert torch.linalg.cholesky_ex(cov.double()).info.item() != 0
    lower = cholesky_whitener(cov)
    assert torch.isfinite(lower).all()
    torch.testing.assert_close(lower @ lower.T, cov.double(), atol=1e-2, rtol=1e-3)


def test_to_low_rank_keeps_bias_and_merge_matches_product():
    torch.manual_seed(3)
    dense = torch.nn.Linear(20, 12, bias=True)
    low = to_low_rank(dense, 12, "svd")
    x = torch.randn(5, 20)
    torch.testing.assert_close(low(x), dense(x), atol=1e-5, rtol=1e-5)
    merged = merge_low_rank(low)
    torch.testing.assert_close(merged(x), low(x), atol=1e-5, rtol=1e-5)
    assert isinstance(low, LowRankLinear) and low.rank == 12
    assert sum(p.numel() for p in low.parameters()) == 12 * (20 + 12) + 12


def test_random_init_has_the_requested_shapes():
    dense = torch.nn.Linear(20, 12, bias=False)
    low = to_low_rank(dense, 4, "random", generator=torch.Generator().manual_seed(0))
    assert low.A.weight.shape == (4, 20) and low.B.weight.shape == (12, 4)
    assert torch.isfinite(low(torch.randn(3, 20))).all()
