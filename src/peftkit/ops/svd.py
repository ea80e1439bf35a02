"""A dense weight update as LoRA factors through its SVD (``convert_to_lora``'s math).

Conventions: ``delta: (rows, cols)`` (a layer's ``ΔW`` in its weight's layout), ``A: (k, cols)``, ``B: (rows, k)``
with ``B @ A`` the best rank-``k`` approximation of ``delta`` (Eckart-Young) and the singular values folded into
``B``. ``rank`` is an int ``k``, or a float threshold ``t`` in ``(0, 1]``: the smallest ``k`` whose top singular
values hold at least the fraction ``t`` of the energy ``sum(S**2)``.
"""

from __future__ import annotations

import torch


def energy_rank(S: torch.Tensor, threshold: float) -> int:
    """The smallest ``k`` with ``sum(S[:k]**2) >= threshold * sum(S**2)``, at least 1.

    ``S: (n,)`` singular values sorted in decreasing order. As the reference's ``_find_cutoff_index``: the first
    index where the cumulative energy reaches the cutoff (``torch.searchsorted``, left side), plus one."""
    if S.dim() != 1:
        raise ValueError(f"energy_rank: S must be 1-d (singular values), got shape {tuple(S.shape)}")
    cumulative = torch.cumsum(S**2, dim=0)
    cutoff = threshold * cumulative[-1]
    return int(torch.searchsorted(cumulative, cutoff).item()) + 1


def svd_spectrum(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U: (rows, n)``, ``S: (n,)``, ``Vh: (n, cols)`` of ``delta`` computed in float32 (SVD has no half-precision
    kernels), ``n = min(rows, cols)``, on ``delta``'s device."""
    return torch.linalg.svd(delta.float(), full_matrices=False)


def lora_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = Vh[:k]: (k, cols)`` and ``B = U[:, :k] * S[:k]: (rows, k)``, contiguous, in ``dtype``."""
    B = U[:, :k] * S[:k]
    A = Vh[:k]
    return A.to(dtype).contiguous(), B.to(dtype).contiguous()


def resolve_rank(S: torch.Tensor, rank: float) -> int:
    """``rank`` itself when it is an int, else :func:`energy_rank` of ``S`` at threshold ``rank``."""
    return rank if isinstance(rank, int) else energy_rank(S, rank)


def lowrank_reference(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Plain reference: the rank-``k`` truncation of ``delta`` in float64, ``(rows, cols)``, for tests."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]
