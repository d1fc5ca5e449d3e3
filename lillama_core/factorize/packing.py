"""Packing maths for low-rank factors that read one input: A factors stacked into one matrix, and split back.

Factors `A_i` (r_i x in) of modules reading the same x stack into `A = [A_1; ...; A_n]` (sum r_i x in), so
`A x` is one matrix multiply whose rows `offsets[i]:offsets[i+1]` are `A_i x`. Each module then applies its own
B_i (out_i x r_i) to its rows, so the packed outputs equal the unpacked ones up to floating-point summation order.
"""

from __future__ import annotations

import torch


def stack_factors(factors: list[torch.Tensor]) -> torch.Tensor:
    """[sum r_i, in] the A factors (each [r_i, in], one input width) stacked row-wise, in order.

    Raises:
        ValueError: no factors, or factors of different input widths.
    """
    if not factors or len({a.shape[1] for a in factors}) != 1:
        raise ValueError("stacking needs at least one A factor, all of one input width")
    return torch.cat(factors, dim=0)


def split_factor(packed: torch.Tensor, ranks: list[int]) -> list[torch.Tensor]:
    """The A factors ([r_i, in] each, views of `packed`) of a stacked [sum r_i, in] matrix.

    Raises:
        ValueError: the ranks do not add up to the stacked rows.
    """
    if sum(ranks) != packed.shape[0]:
        raise ValueError(f"ranks {list(ranks)} do not add up to the {packed.shape[0]} rows of the packed factor")
    return list(packed.split(list(ranks), dim=0))
