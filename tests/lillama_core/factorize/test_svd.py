import os

import torch

from lillama_core.factorize.inits import to_low_rank
from lillama_core.factorize.svd import (
    GRAM_FLOOR,
    CovarianceAccumulator,
    OutputCovariance,
    OutputWhitenedSVD,
    WhitenedSVD,
    balance_factors,
    cholesky_whitener,
    gram_svd,
    is_near_zero,
    low_rank_from_factors,
    merge_low_rank,
    serial_on_cpu,
    svd_factors,
    whitened_factors,
    whitened_spectrum,
)
from lillama_core.modeling.shipped import LowRankLinear


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


def _ratio(b, a):
    return (a.abs().max() / b.abs().max()).item()


def test_a_zero_covariance_gives_balanced_factors_with_the_plain_svd_product():
    # An expert no calibration token reached: unbalanced, max|A| was ~1e4 and max|B| ~1e-5.
    torch.manual_seed(3)
    w = torch.randn(48, 32)
    b, a = whitened_factors(w, torch.zeros(32, 32, dtype=torch.float64), 8)
    assert 0.1 < _ratio(b, a) < 10
    b_svd, a_svd = svd_factors(w, 8)
    torch.testing.assert_close(b @ a, b_svd @ a_svd, atol=1e-5, rtol=1e-4)
    low = low_rank_from_factors(torch.nn.Linear(32, 48, bias=False), b, a).half()
    with torch.no_grad():
        assert torch.isfinite(low(torch.randn(4, 32).half())).all()


def test_a_nearly_zero_covariance_is_balanced_and_keeps_its_whitened_product():
    torch.manual_seed(4)
    w = torch.randn(24, 32)
    cov = CovarianceAccumulator(32, torch.device("cpu"))
    cov.add(_correlated_inputs())
    b, a = whitened_factors(w, cov.mean(), 6)
    tiny_b, tiny_a = whitened_factors(w, cov.mean() * 1e-12, 6)  # the same directions, almost no signal
    assert 0.1 < _ratio(tiny_b, tiny_a) < 10
    torch.testing.assert_close(tiny_b @ tiny_a, b @ a, atol=1e-3, rtol=1e-3)


def test_balancing_keeps_the_product_and_equalises_every_component():
    torch.manual_seed(5)
    b, a = torch.randn(20, 4) * 1e-5, torch.randn(4, 12) * 1e4
    b[:, 2] = 0.0  # a zero component stays as it is
    balanced_b, balanced_a = balance_factors(b, a)
    torch.testing.assert_close(balanced_b @ balanced_a, b @ a)
    keep = [0, 1, 3]
    torch.testing.assert_close(balanced_b.norm(dim=0)[keep], balanced_a.norm(dim=1)[keep])
    torch.testing.assert_close(balanced_a[2], a[2])


def test_ordinary_covariances_are_not_near_zero():
    cov = CovarianceAccumulator(32, torch.device("cpu"))
    cov.add(_correlated_inputs())
    assert not is_near_zero(cov.mean())
    assert is_near_zero(torch.zeros(32, 32)) and is_near_zero(cov.mean() * 1e-12)


def test_serial_on_cpu_gives_the_same_factors_single_threaded_and_restores_the_thread_count(monkeypatch):
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(48, 32, generator=g), torch.randn(256, 32, generator=g)
    cov = (x.T @ x / 256).double()
    cores = len(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(os, "getloadavg", lambda: (cores + 1.0, 0.0, 0.0))
        with serial_on_cpu(torch.device("cpu")):
            assert torch.get_num_threads() == 1
            b, a = whitened_factors(weight, cov, 8)
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(os, "getloadavg", lambda: (cores - 0.5, 0.0, 0.0))
        with serial_on_cpu(torch.device("cpu")):  # idle cores: both threads are kept
            assert torch.get_num_threads() == 2
            b_ref, a_ref = whitened_factors(weight, cov, 8)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(b @ a, b_ref @ a_ref, rtol=1e-5, atol=1e-6)


def test_whitening_needs_float64_for_activation_outliers():
    """Why the Cholesky whitening stays in float64: a covariance with a few huge feature channels (as LLM
    activations have, ~1e4x the rest) is too ill-conditioned for float32 to whiten accurately."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g, dtype=torch.float64)
    x[:, :2] *= 1e4  # outlier channels
    x[:, 2:6] = x[:, 6:10] + 1e-4 * x[:, 2:6]  # nearly collinear channels
    cov = x.T @ x / x.shape[0]
    lower = cholesky_whitener(cov)

    def relative(low: torch.Tensor) -> float:  # ||L L^T - cov|| / ||cov||
        return ((low.double() @ low.double().T - cov).norm() / cov.norm()).item()

    assert relative(lower) < 1e-12
    low32, info = torch.linalg.cholesky_ex(cov.float())
    assert info.item() != 0 or relative(low32) > 1e3 * relative(lower)


def _with_spectrum(out_features: int, in_features: int, singular_values: torch.Tensor) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(out_features, out_features, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_features, in_features, dtype=torch.float64))
    k = len(singular_values)
    return u[:, :k] * singular_values @ v[:, :k].T


def test_the_gram_route_gives_lapacks_truncations_of_tall_and_wide_matrices():
    torch.manual_seed(0)
    for shape in ((48, 20), (20, 48)):
        matrix = _with_spectrum(*shape, torch.logspace(0, -3, 20, dtype=torch.float64))
        u, s, vh = gram_svd(matrix)
        exact_u, exact_s, exact_vh = torch.linalg.svd(matrix, full_matrices=False)
        torch.testing.assert_close(s, exact_s, rtol=1e-10, atol=0)
        for rank in (1, 7, 20):
            torch.testing.assert_close(u[:, :rank] * s[:rank] @ vh[:rank],
                                       exact_u[:, :rank] * exact_s[:rank] @ exact_vh[:rank], rtol=0, atol=1e-10)


def test_ranks_that_keep_values_below_the_gram_floor_use_lapacks_svd():
    torch.manual_seed(0)
    values = torch.cat([torch.ones(4), torch.full((4,), GRAM_FLOOR / 100)]).double()
    weight, cov = _with_spectrum(16, 12, values).float(), torch.eye(12)
    decomposition = WhitenedSVD(weight, cov)
    decomposition.factors(4)
    assert not decomposition.exact
    b, a = decomposition.factors(8)
    assert decomposition.exact
    torch.testing.assert_close(b.double() @ a.double(), weight.double(), rtol=0, atol=1e-6)


def test_output_covariance_gives_the_input_routes_factors():
    # W C W^T has the left singular vectors of W L as eigenvectors: same B and A (up to each component's sign)
    torch.manual_seed(0)
    x = torch.randn(400, 48, dtype=torch.float64) @ torch.randn(48, 48, dtype=torch.float64)
    weight = torch.randn(20, 48, dtype=torch.float64)
    y = x @ weight.T
    inputs, outputs = x.T @ x / 400, OutputCovariance(y.T @ y / 400)
    torch.testing.assert_close(whitened_spectrum(weight, outputs).double(), whitened_spectrum(weight, inputs).double(),
                               rtol=1e-5, atol=0)
    for rank in (1, 7, 19):
        b_in, a_in = whitened_factors(weight, inputs, rank)
        b_out, a_out = whitened_factors(weight, outputs, rank)
        sign = torch.sign((b_in * b_out).sum(0))
        torch.testing.assert_close(b_out, b_in * sign, rtol=0, atol=1e-8 * b_in.abs().max())
        torch.testing.assert_close(a_out, a_in * sign[:, None], rtol=0, atol=1e-8 * a_in.abs().max())


def test_output_route_is_exact_on_the_data_when_the_rank_exceeds_the_datas():
    # 5 tokens span 5 output directions: rank 8 reproduces W X exactly, and the dead directions stay finite
    torch.manual_seed(0)
    x = torch.randn(5, 32, dtype=torch.float64)
    weight = torch.randn(12, 32, dtype=torch.float64)
    y = x @ weight.T
    b, a = OutputWhitenedSVD(weight, OutputCovariance(y.T @ y / 5)).factors(8)
    assert torch.isfinite(b).all() and torch.isfinite(a).all()
    torch.testing.assert_close(x @ (b @ a).T, y, rtol=0, atol=1e-9 * y.abs().max())


def test_a_zero_output_covariance_gives_the_plain_svd_split():
    torch.manual_seed(0)
    weight = torch.randn(12, 32)
    b, a = OutputWhitenedSVD(weight, OutputCovariance(torch.zeros(12, 12, dtype=torch.float64))).factors(6)
    plain_b, plain_a = svd_factors(weight, 6)
    sign = torch.sign((b * plain_b).sum(0))
    torch.testing.assert_close(b, plain_b * sign, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, plain_a * sign[:, None], rtol=1e-5, atol=1e-6)
