"""Task-tensor merging (task arithmetic, TIES, DARE, magnitude pruning) and truncated-SVD factorisation.

Pure functions of tensors, used to combine adapters. Conventions: ``tensors`` is a list of ``n`` task tensors of
one shape ``(*S)``; ``weights: (n,)``; the result has shape ``(*S)``. The random pruning of DARE draws one
``torch.bernoulli`` mask per tensor, in list order, from the global RNG, so ``torch.manual_seed`` makes it
reproducible (and it consumes the RNG exactly as the reference library does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: ``majority_sign_method`` values: the sign of the summed values, or the more frequent sign
SIGN_METHODS = ("total", "frequency")


def prune_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude of ``tensor: (*S)``, zero the rest.

    ``density >= 1`` returns ``tensor`` unchanged.
    """
    if density >= 1:
        return tensor
    k = int(density * tensor.numel())
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    keep[torch.topk(tensor.abs().reshape(-1), k=k, largest=True).indices] = 1
    return tensor * keep.reshape(tensor.shape)


def prune_random(tensor: torch.Tensor, density: float, rescale: bool = True) -> torch.Tensor:
    """Keep each entry of ``tensor: (*S)`` with probability ``density`` (one ``torch.bernoulli`` draw of its shape);
    with ``rescale`` the kept entries are divided by ``density`` so the expectation is unchanged (DARE).

    ``density >= 1`` returns ``tensor`` unchanged (and draws nothing).
    """
    if density >= 1:
        return tensor
    kept = tensor * torch.bernoulli(torch.full_like(tensor, density))
    return kept / density if rescale else kept


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """``stacked: (n, *S)`` -> bool ``(n, *S)``: which entries carry the elected sign of their position.

    The elected sign is that of the sum over the ``n`` tensors (``"total"``) or of the sum of their signs
    (``"frequency"``); ties elect ``+``. Zero entries never carry it.
    """
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    elected = torch.where(magnitude >= 0, 1, -1).to(sign.dtype)
    return sign == elected


def disjoint_mean(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weighted, mask: (n, *S)`` -> ``(*S)``: the mean over the entries kept by ``mask`` (0 where none is kept)."""
    kept = (weighted * mask).sum(dim=0)
    return kept / mask.sum(dim=0).clamp(min=1)


@dataclass(frozen=True)
class MergeRecipe:
    """How to merge task tensors: an optional pruning of each tensor, then a weighted sum, or with
    ``elect_sign`` the TIES disjoint mean of the weighted entries that agree with the elected sign."""

    prune: Callable[[torch.Tensor, float], torch.Tensor] | None = None
    elect_sign: bool = False

    @property
    def needs_density(self) -> bool:
        return self.prune is not None


def _prune_dare(tensor: torch.Tensor, density: float) -> torch.Tensor:
    return prune_random(tensor, density, rescale=True)


#: the merge recipes by name (the non-SVD combination types)
RECIPES: dict[str, MergeRecipe] = {
    "linear": MergeRecipe(),
    "ties": MergeRecipe(prune_magnitude, elect_sign=True),
    "dare_linear": MergeRecipe(_prune_dare),
    "dare_ties": MergeRecipe(_prune_dare, elect_sign=True),
    "magnitude_prune": MergeRecipe(prune_magnitude),
}


def merge_tensors(
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    recipe: MergeRecipe,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """Merge ``n`` task tensors ``(*S)`` with ``weights: (n,)`` following ``recipe``; returns ``(*S)``.

    The elected sign (TIES) is computed on the pruned, unweighted tensors, as in the TIES paper and the reference.
    """
    if recipe.prune is not None:
        assert density is not None, "this recipe prunes and needs a density"
        tensors = [recipe.prune(t, density) for t in tensors]
    stacked = torch.stack(tensors, dim=0)  # (n, *S)
    weighted = stacked * weights.to(stacked.dtype).reshape((-1,) + (1,) * (stacked.dim() - 1))
    if recipe.elect_sign:
        return disjoint_mean(weighted, majority_sign_mask(stacked, majority_sign_method))
    return weighted.sum(dim=0)


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-quantile of all entries of ``values`` with linear interpolation (``torch.quantile``'s default),
    without ``torch.quantile``'s limit of 16M entries. Returns a 0-dim tensor."""
    ordered = values.reshape(-1).sort().values
    position = q * (ordered.numel() - 1)
    lo = math.floor(position)
    hi = min(lo + 1, ordered.numel() - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)


def truncated_svd_factors(
    delta: torch.Tensor,
    rank: int,
    clamp: float | None = None,
    full_matrices: bool = True,
    driver: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factorisation of ``delta: (out, in)``: ``B: (out, rank)``, ``A: (rank, in)`` with
    ``B @ A`` the truncated SVD (singular values folded into ``B``).

    ``clamp`` (a quantile ``q`` in [0, 1]) clamps both factors to ``[-h, h]`` with ``h`` the ``q``-quantile of the
    signed entries of ``B`` and ``A`` together, as the reference does. When ``rank`` exceeds ``min(out, in)`` the
    factors are zero-padded to ``rank``. ``driver`` is passed to ``torch.linalg.svd`` (CUDA only).
    """
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(rank, S.shape[0])
    B = U[:, :k] * S[:k]  # (out, k)
    A = Vh[:k, :]  # (k, in)
    if clamp is not None:
        hi = quantile(torch.cat([B.reshape(-1), A.reshape(-1)]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    if k < rank:
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])], dim=0)
    return B, A
