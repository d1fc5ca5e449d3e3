"""Factorisation maths: W (out x in) ~ B (out x r) @ A (r x in). Pure tensors, no hooks.

Plain SVD minimises ||W - BA||; the whitened variant (SVD-LLM) minimises ||(W - BA) X|| for the
layer's real inputs X, which matters far more on small models.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..modeling.shipped import LowRankLinear

__all__ = [
    "svd_factors",
    "whitened_factors",
    "WhitenedSVD",
    "OutputWhitenedSVD",
    "OutputCovariance",
    "Covariance",
    "covariance_matrix",
    "whitened_svd",
    "gram_svd",
    "balance_factors",
    "is_near_zero",
    "low_rank_from_factors",
    "random_factors",
    "cholesky_whitener",
    "spectrum",
    "whitened_spectrum",
    "CovarianceAccumulator",
    "merge_low_rank",
    "serial_on_cpu",
    "oversubscribed",
]


def oversubscribed() -> bool:
    """Whether this machine's cores have more runnable threads than they can run: the 1-minute load average
    (which counts this process's own threads) above the cores this process may use."""
    try:
        return os.getloadavg()[0] > len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no load average on this platform: assume the cores are shared
        return True


@contextmanager
def serial_on_cpu(device: torch.device) -> Iterator[None]:
    """Run the decompositions inside single-threaded when they run on an oversubscribed CPU (no-op elsewhere).

    LAPACK's float64 SVD and Cholesky of matrices of a block's size (hundreds to a few thousand features)
    are long chains of small steps, each ending in a barrier of the OpenMP threads; on cores shared with
    other processes every barrier waits for a descheduled thread. Measured on 2 shared cores (load ~17):
    the float64 SVD of a 576 x 1536 matrix takes 0.93 s on 1 thread and 4.6 s on 2, and the factorisation of
    one SmolLM2-135M block 50-60 s on 2 threads (benchmarks/results/profile.jsonl). On the same 2 cores idle,
    2 threads factorise a block in half the time of 1 (0.36 s against 0.68 s), so they are kept unless the
    load average says the cores are oversubscribed. The thread count is process-wide, so other threads' CPU
    work is serial meanwhile too; it is restored on exit.

    Args:
        device: where the decompositions run.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or not oversubscribed():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, in float64 then cast back."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    b, a = _root_split(u, s, vh, rank)
    return b.to(weight.dtype), a.to(weight.dtype)


def _root_split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain SVD split of a rank: B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T."""
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def cholesky_whitener(cov: torch.Tensor, max_tries: int = 8) -> torch.Tensor:
    """Lower-triangular L with L L^T = cov (+ the smallest diagonal that makes it positive definite)."""
    cov = cov.double()
    scale = cov.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    jitter = 0.0
    for attempt in range(max_tries):
        factor, info = torch.linalg.cholesky_ex(cov + jitter * scale * eye)
        if info.item() == 0:
            return factor
        jitter = 1e-6 * 10**attempt
    # Still not positive definite (e.g. all-zero input columns): fall back to a strong ridge.
    return torch.linalg.cholesky(cov + scale * eye)


# Mean squared input (the covariance's mean diagonal) at or below which a module counts as having seen
# no data: an RMS of 1e-4, under float16's smallest normal number's scale. An MoE expert no calibration
# token reached has exactly zero.
NEAR_ZERO_COVARIANCE = 1e-8


def is_near_zero(cov: torch.Tensor) -> bool:
    """Whether an input covariance (features x features) is zero or nearly so (see NEAR_ZERO_COVARIANCE)."""
    return cov.diagonal().double().mean().item() <= NEAR_ZERO_COVARIANCE


def balance_factors(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B (out x r) and A (r x in) rescaled per rank component so column i of B and row i of A have the
    same norm; B A is unchanged (up to rounding). A zero component is left as it is."""
    b_norm, a_norm = b.norm(dim=0), a.norm(dim=1)
    usable = (b_norm > 0) & (a_norm > 0)
    scale = torch.where(usable, (a_norm / b_norm.where(usable, 1.0)).sqrt(), torch.ones_like(a_norm))
    return b * scale, a / scale[:, None]


# Kept singular values at or above this share of the largest are exact enough from the Gram matrix: its
# eigenvalues, the squares, carry an absolute error of about n * eps * s_max^2, so a value at the floor keeps a
# relative error near 576 * 1.1e-16 / 1e-8 = 6e-6 (float64, a SmolLM2-sized block). Below it: LAPACK's SVD.
GRAM_FLOOR = 1e-4


def gram_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of a float64 matrix (m x n) from the eigendecomposition of its smaller Gram matrix, S descending.

    For a block's weights this takes a third to a fifth of LAPACK's SVD (single thread, 1536 x 576: 0.13 s
    against 0.40 s), but only the singular values of at least GRAM_FLOOR x the largest, and their vectors,
    are as accurate; the singular vectors of the others are noise (zero where the value is zero).
    """
    wide = matrix.shape[0] < matrix.shape[1]
    tall = matrix.T if wide else matrix  # m >= n: tall = U S V^T, with V from the n x n Gram matrix
    squares, v = torch.linalg.eigh(tall.T @ tall)  # ascending
    s = squares.flip(0).clamp_min(0).sqrt()
    v = v.flip(1)
    u = (tall @ v) / torch.where(s > 0, s, 1.0)
    return (v, s, u.T) if wide else (u, s, v.T)


class WhitenedSVD:
    """The SVD of W L (L L^T = X^T X), computed once and truncated to any rank: probing several ranks of
    one matrix costs one decomposition.

    The SVD comes from the Gram matrix (gram_svd), and from LAPACK's SVD only for a rank that keeps
    singular values below GRAM_FLOOR of the largest, where the Gram route loses digits.

    A (near-)zero covariance (an expert no calibration token reached) makes L a tiny ridge, so A would
    carry its inverse (max|A| ~ 1e4, max|B| ~ 1e-5): the product is right but float16 overflows and
    integer exports lose B. Such factors are balanced; for an all-zero covariance that gives exactly the
    plain SVD split, the only sensible choice when there is no data to weigh by."""

    def __init__(self, weight: torch.Tensor, cov: torch.Tensor):
        self.dtype = weight.dtype
        self.balanced = is_near_zero(cov)
        self.lower = cholesky_whitener(cov)
        self.whitened = weight.double() @ self.lower
        self.u, self.s, self.vh = gram_svd(self.whitened)
        self.exact = False

    def _exact_for(self, rank: int) -> None:
        if not self.exact and rank and self.s[rank - 1] < GRAM_FLOOR * self.s[0]:
            self.u, self.s, self.vh = torch.linalg.svd(self.whitened, full_matrices=False)
            self.exact = True

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B: out x rank, A: rank x in) in the weight's dtype."""
        self._exact_for(rank)
        root = self.s[:rank].sqrt()
        # A = sqrt(S_r) V_r^T L^{-1}, computed as a triangular solve instead of an explicit inverse.
        a = torch.linalg.solve_triangular(self.lower, (root[:, None] * self.vh[:rank]), upper=False, left=False)
        b = self.u[:, :rank] * root
        if self.balanced:
            b, a = balance_factors(b, a)
        return b.to(self.dtype), a.to(self.dtype)


@dataclass(frozen=True)
class OutputCovariance:
    """(W X)(W X)^T / tokens: the mean second moment of a linear's outputs less its bias (out x out, float64).

    It carries everything whitening needs (W C W^T, C = X^T X / tokens), and for a layer with fewer outputs
    than inputs it costs (out / in)^2 of the input covariance to gather: a seventh for SmolLM2's down
    projection (1536 -> 576)."""

    matrix: torch.Tensor

    def to(self, device: torch.device | str) -> OutputCovariance:
        return OutputCovariance(self.matrix.to(device))


# A layer's data statistics for whitening: its input covariance X^T X / tokens (in x in) as a plain tensor,
# or its output covariance.
Covariance = torch.Tensor | OutputCovariance


def covariance_matrix(cov: Covariance) -> torch.Tensor:
    """The matrix of either kind of covariance."""
    return cov.matrix if isinstance(cov, OutputCovariance) else cov


# Singular values under this share of the largest are within the eigendecomposition's rounding of zero (float64
# eigenvalues carry an absolute error near n * eps * s_max^2, so s near sqrt(576 * 1.1e-16) * s_max = 2.5e-7 s_max);
# their components are split evenly between B and A instead of dividing by them.
OUTPUT_FLOOR = 1e-6


class OutputWhitenedSVD:
    """SVD-LLM's whitened factors from a layer's output covariance M = W C W^T, without C.

    M's eigenvectors are the left singular vectors U of W L (L L^T = C) and its eigenvalues their squared
    singular values S^2, so B = U_r S_r^(1/2) and A = S_r^(-1/2) U_r^T W are the input route's factors
    (there A = S_r^(1/2) V_r^T L^-1, and S_r V_r^T = U_r^T W L). B A = U_r U_r^T W projects W onto the
    top-r output directions on the data, the rank-r minimiser of ||(W - B A) X||_F (Eckart-Young on W X).
    One eigendecomposition of out x out and no Cholesky factor or triangular solve; the kept directions come
    straight from the eigenvectors, so small singular values lose no accuracy to a division (see gram_svd).
    A (near-)zero M (an expert no token reached) gives the plain SVD split, as WhitenedSVD does."""

    def __init__(self, weight: torch.Tensor, cov: OutputCovariance):
        self.dtype = weight.dtype
        self.weight = weight.double()
        matrix = cov.matrix.double()
        self.plain = is_near_zero(matrix)
        if self.plain:
            self.u, self.s, self.vh = torch.linalg.svd(self.weight, full_matrices=False)
            return
        squares, u = torch.linalg.eigh((matrix + matrix.T) / 2)  # ascending
        self.s, self.u = squares.flip(0).clamp_min(0).sqrt(), u.flip(1)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B: out x rank, A: rank x in) in the weight's dtype."""
        if self.plain:
            b, a = _root_split(self.u, self.s, self.vh, rank)
            return b.to(self.dtype), a.to(self.dtype)
        s, u = self.s[:rank], self.u[:, :rank]
        usable = s > OUTPUT_FLOOR * self.s[0]
        root = torch.where(usable, s.sqrt(), 1.0)
        b, a = u * root, (u.T @ self.weight) / root[:, None]
        if not usable.all():
            b[:, ~usable], a[~usable] = balance_factors(b[:, ~usable], a[~usable])
        return b.to(self.dtype), a.to(self.dtype)


def whitened_svd(weight: torch.Tensor, cov: Covariance) -> WhitenedSVD | OutputWhitenedSVD:
    """The whitened SVD of a weight (out x in) from whichever covariance the layer's data gave: both have the
    singular values `s` (descending, float64) and `factors(rank)`, and agree up to rounding and signs."""
    return OutputWhitenedSVD(weight, cov) if isinstance(cov, OutputCovariance) else WhitenedSVD(weight, cov)


def whitened_factors(weight: torch.Tensor, cov: Covariance, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of W L where L L^T = X^T X; A absorbs L^{-1} so B A approximates W on the data."""
    return whitened_svd(weight, cov).factors(rank)


def random_factors(weight: torch.Tensor, rank: int, generator: torch.Generator | None = None):
    """Kaiming-like random factors whose product has roughly the scale of W, for ablations."""
    out_f, in_f = weight.shape
    std = weight.float().std().item() or 1.0 / in_f**0.5
    a = torch.randn(rank, in_f, generator=generator, dtype=torch.float32) / in_f**0.5
    b = torch.randn(out_f, rank, generator=generator, dtype=torch.float32) * std * (in_f / rank) ** 0.5
    return b.to(weight.device, weight.dtype), a.to(weight.device, weight.dtype)


def spectrum(weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(weight.float())


def whitened_spectrum(weight: torch.Tensor, cov: Covariance) -> torch.Tensor:
    """Singular values of W L (L L^T = X^T X / tokens), descending, float32."""
    if isinstance(cov, OutputCovariance):
        return OutputWhitenedSVD(weight, cov).s.float()
    return torch.linalg.svdvals((weight.double() @ cholesky_whitener(cov)).float())


class CovarianceAccumulator:
    """Running X^T X over every token seen, summed in float64 so millions of tokens stay exact enough."""

    def __init__(self, features: int, device: torch.device):
        self.sum = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum += (flat.T @ flat).double()
        self.tokens += flat.shape[0]

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.tokens, 1)


def low_rank_from_factors(dense: nn.Linear, b: torch.Tensor, a: torch.Tensor) -> LowRankLinear:
    """A float32 LowRankLinear with weights B and A, carrying the dense layer's bias on the output side."""
    low = LowRankLinear(dense.in_features, dense.out_features, a.shape[0], bias=dense.bias is not None,
                        device=dense.weight.device, dtype=torch.float32)
    with torch.no_grad():
        low.A.weight.copy_(a)
        low.B.weight.copy_(b)
        if dense.bias is not None:
            low.B.bias.copy_(dense.bias.float())
    return low


def merge_low_rank(low: LowRankLinear) -> nn.Linear:
    """Dense nn.Linear with W = B A, multiplied in float32 and checked before it is used."""
    dtype = low.A.weight.dtype
    weight = low.B.weight.float() @ low.A.weight.float()
    if not torch.isfinite(weight).all():
        raise ValueError("merged weight has NaN or inf values")
    dense = nn.Linear(low.in_features, low.out_features, bias=low.B.bias is not None,
                      device=weight.device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(weight.to(dtype))
        if low.B.bias is not None:
            dense.bias.copy_(low.B.bias)
    return dense
