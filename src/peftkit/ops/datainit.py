"""Math of the data-driven LoRA initialisations CorDA and LoRA-GA (pure tensor functions).

Conventions: a layer's weight ``W: (out, in)``, its inputs ``x: (..., in)``, ``A: (r, in)``, ``B: (out, r)``,
``scaling = lora_alpha / r``. Each fast path has a plain reference beside it (``*_reference``) that the tests
compare it to.
"""

from __future__ import annotations

import torch

# ----------------------------------------------------------------------------------------------------- CorDA


def accumulate_covariance_(acc: torch.Tensor, x: torch.Tensor) -> int:
    """Add the max-normalised input covariance of every sample in ``x`` to ``acc`` in place; return the number of
    samples added.

    ``acc: (in, in)`` accumulator (its dtype is the compute dtype); ``x: (in,)``, ``(T, in)`` (one sample) or
    ``(B, ..., in)`` (``B`` samples of any number of tokens). Each sample ``X_b: (T, in)`` is divided by
    ``|max(X_b)|`` (the maximum value, not the maximum magnitude, as the reference's CorDA hook) and
    ``X_b^T X_b`` is added. One ``(B*T, in)`` copy of the input is made; cost ``O(B * T * in^2)`` flops.

    Raises:
        ValueError: the input or its covariance holds NaN or inf.
    """
    in_dim = acc.shape[0]
    samples = x.detach().reshape(-1, *x.shape[-2:]) if x.dim() >= 3 else x.detach().reshape(1, -1, in_dim)
    samples = samples.to(acc.dtype)
    peak = samples.amax(dim=(1, 2)).abs().view(-1, 1, 1)
    normalised = (samples / peak).reshape(-1, in_dim)
    if not torch.isfinite(normalised).all():
        raise ValueError("CorDA: invalid value (NaN or inf) found in a target layer's input; check your data "
                         "(an all-zero sample divides by zero)")
    acc.addmm_(normalised.t(), normalised)
    if not torch.isfinite(acc).all():
        raise ValueError("CorDA: invalid value (NaN or inf) in the input covariance; with "
                         "use_float16_for_covariance=True, try float32 (the default)")
    return samples.shape[0]


def covariance_reference(samples: list[torch.Tensor]) -> torch.Tensor:
    """Plain reference of the mean of :func:`accumulate_covariance_` over ``samples`` (each ``(T, in)``), in
    float32: ``mean_b (X_b / |max X_b|)^T (X_b / |max X_b|)``."""
    total = torch.zeros(samples[0].shape[-1], samples[0].shape[-1])
    for X in samples:
        Xn = X.float() / torch.max(X.float()).abs()
        total = total + Xn.t() @ Xn
    return total / len(samples)


def damped_inverse(cov: torch.Tensor, max_error: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C + d * mean(diag C) * I, its inverse)`` for ``cov = C: (in, in)`` (float32), with the damping ``d``
    starting at 0.01 and doubled until ``||C_d @ C_d^-1 - I||_F < max_error`` (the reference's rule, so the same
    ``d`` is chosen). Cost: one ``in x in`` inverse per try."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    mean_diag = torch.mean(torch.diag(cov))
    damp = 0.01
    while True:
        fixed = cov + eye * (mean_diag * damp)
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < max_error:
            return fixed, inverse
        damp *= 2


def corda_eigens(weight: torch.Tensor, cov: torch.Tensor, r: int, method: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CorDA's context-oriented decomposition of ``weight: (out, in)`` under the input covariance ``cov: (in, in)``
    (both float32): ``W C = U S V_h`` (SVD), ``V = (V_h C^-1)^T`` so ``W = U S V^T``. Returns the ``r`` components
    CorDA keeps, ``(S: (r,), U: (out, r), V: (in, r))``: the largest (``method="ipm"``) or the smallest
    (``"kpm"``). Cost: ``O(out * in * min(out, in))`` for the SVD plus ``O(in^3)`` for the inverse."""
    fixed, inverse = damped_inverse(cov)
    U, S, Vh = torch.linalg.svd(weight @ fixed, full_matrices=False)
    V = (Vh @ inverse).t()
    keep = slice(None, r) if method == "ipm" else slice(-r, None)
    return S[keep].clone(), U[:, keep].contiguous(), V[:, keep].contiguous()


def corda_factors(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, scaling: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = sqrt(S / s) V^T: (r, in)`` and ``B = U sqrt(S / s): (out, r)`` so that ``s * B @ A = U S V^T`` (the
    reference's ``corda_init``), from ``U: (out, r)``, ``S: (r,)``, ``V: (in, r)``."""
    root = (S / scaling).sqrt()
    return (V.t() * root.view(-1, 1)).contiguous(), (U * root).contiguous()


# --------------------------------------------------------------------------------------------------- LoRA-GA

#: ``direction`` -> (indices of the gradient's right singular vectors for A, left ones for B), given ``r``
LORAGA_DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
LORAGA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")


def loraga_indices(direction: str, r: int, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The components of the gradient's SVD that LoRA-GA gives to ``A`` (right singular vectors) and ``B`` (left
    ones, with their singular values), as index tensors of length ``r`` into the top ``2r`` (the reference's
    ``lora_ga_init``): ``"ArBr"`` A odd / B even, ``"A2rBr"`` A ``[r, 2r)`` / B ``[0, r)``, ``"ArB2r"`` A
    ``[0, r)`` / B ``[r, 2r)``, ``"random"`` the same ``r`` random indices for both."""
    if direction == "ArBr":
        return torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    if direction == "A2rBr":
        return torch.arange(r, 2 * r), torch.arange(0, r)
    if direction == "ArB2r":
        return torch.arange(0, r), torch.arange(r, 2 * r)
    picked = torch.randperm(2 * r, generator=generator)[:r]
    return picked, picked


def loraga_factors(grad: torch.Tensor, weight: torch.Tensor, r: int, scaling: float, direction: str, scale: str,
                   stable_gamma: float, generator: torch.Generator | None = None, out_features: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA's ``(A: (r, in), B: (out, r))`` in float32 from the averaged gradient ``grad: (out, in)`` and the
    base ``weight: (out, in)`` (float32): the randomized SVD ``grad ≈ U S V^T`` (``torch.svd_lowrank`` with
    ``q = min(4r, min(out, in))``, ``niter=4``: it draws from torch's global RNG, as the reference), the components
    of :func:`loraga_indices`, ``B = U[:, iB] diag(S[iB])`` and ``A = V[:, iA]^T``, then the ``scale`` rule:
    ``"stable"`` ``B *= out^(1/4) / sqrt(gamma)`` (``out_features``, default ``weight.shape[0]``); ``"weight_svd"`` ``B *= sigma_1(W) / S[iB][0]``; ``"gd_scale"``
    ``A, B /= scaling``; ``"unit"`` nothing. Cost: ``O(out * in * r)``."""
    U, S, V = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=4)
    Vh = V.t()[: 2 * r]
    U, S = U[:, : 2 * r], S[: 2 * r]
    ia, ib = loraga_indices(direction, r, generator)
    A = Vh[ia]
    S_B = S[ib]
    B = U[:, ib] @ torch.diag(S_B)
    if scale == "stable":
        B = B * ((out_features or weight.shape[0]) ** 0.25 / stable_gamma**0.5)
    elif scale == "weight_svd":
        _, weight_S, _ = torch.svd_lowrank(weight, q=r, niter=4)
        if S_B[0] > 0:
            B = B * (weight_S[0] / S_B[0])
    elif scale == "gd_scale":
        A, B = A / scaling, B / scaling
    return A.contiguous(), B.contiguous()
