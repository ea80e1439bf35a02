"""OSF's SVD split and gradient projection as plain functions (the reference's ``peft.tuners.osf.utils``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def decompose_weight_matrix(weight: torch.Tensor, top_k: int) -> dict[str, Any]:
    """SVD of ``weight: (out, in)`` (in float32) split at ``k = min(top_k, min(out, in))``.

    Returns ``U_high: (out, k)``, ``S_high: (k,)``, ``V_high: (k, in)`` (frozen tensors) and ``U_low: (out, m − k)``,
    ``S_low: (m − k,)``, ``V_low: (m − k, in)`` (``nn.Parameter``), all in ``weight``'s dtype and device, and
    ``rank_high = k``."""
    U, S, Vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    k = min(top_k, S.shape[0])

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().to(device=weight.device, dtype=weight.dtype)

    return {
        "U_high": cast(U[:, :k]), "S_high": cast(S[:k]), "V_high": cast(Vh[:k, :]),
        "U_low": nn.Parameter(cast(U[:, k:])), "S_low": nn.Parameter(cast(S[k:])),
        "V_low": nn.Parameter(cast(Vh[k:, :])), "rank_high": k,
    }


def project_gradient_to_orthogonal_space(svd_dict: dict[str, Any]) -> None:
    """In place: ``U_low.grad -= U_high (U_highᵀ U_low.grad)`` and ``V_low.grad -= (V_low.grad V_highᵀ) V_high``,
    so a step moves the trained factors orthogonally to the frozen subspace (single process; no-op without
    gradients)."""
    U_high, V_high = svd_dict["U_high"], svd_dict["V_high"]
    dU, dV = svd_dict["U_low"].grad, svd_dict["V_low"].grad
    if dU is not None:
        dU.sub_(U_high @ (U_high.t() @ dU))
    if dV is not None:
        dV.sub_((dV @ V_high.t()) @ V_high)


__all__ = ["decompose_weight_matrix", "project_gradient_to_orthogonal_space"]
