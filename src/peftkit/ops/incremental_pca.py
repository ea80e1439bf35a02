"""Incremental PCA (streaming SVD of centred data) with a seeded randomized SVD, for EVA.

Conventions: a batch ``X: (n, d)`` holds ``n`` samples (token activations) of ``d`` features. The running state keeps
the top ``k`` principal directions ``components: (k, d)`` (rows, orthonormal), their singular values ``S: (k,)``,
the running ``mean: (d,)`` / ``var: (d,)`` (float64) and the sample count. Memory is ``O(k·d + d)`` per state,
independent of the number of batches seen; one update also holds the stacked ``(k + n + 1, d)`` matrix it
decomposes and a ``(·, q)`` sketch, then frees them.

The update is scikit-learn's ``IncrementalPCA.partial_fit`` (Ross et al., 2008), as 🤗 PEFT's
``peft.utils.incremental_pca`` ports it: stack the previous ``S·components``, the newly centred batch and a
mean-correction row, decompose, keep the top ``k``. The decomposition is :func:`randomized_svd` (Halko et al. 2009,
``q`` sketch columns, ``niter`` power iterations) drawing its test matrix from a private ``torch.Generator`` seeded
with ``seed`` on the data's device: the same numbers as ``torch.manual_seed(seed); torch.svd_lowrank(...)`` without
touching (or forking) the global random state. :func:`incremental_pca_update_reference` is the plain version with a
full ``torch.linalg.svd``, and :func:`pca_reference` the batch PCA it must equal when nothing is truncated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PCAState:
    """The running state of an incremental PCA (see the module docstring for shapes)."""

    n_components: int
    n_seen: int = 0
    mean: torch.Tensor | None = None  # (d,) float64
    var: torch.Tensor | None = None  # (d,) float64
    components: torch.Tensor | None = None  # (k, d), rows sign-fixed
    singular_values: torch.Tensor | None = None  # (k,)
    explained_variance_ratio: torch.Tensor | None = None  # (k,) float64: S**2 / (total variance · n_seen)

    @property
    def fitted(self) -> bool:
        return self.components is not None


def randomized_svd(A: torch.Tensor, q: int, niter: int, seed: int | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate thin SVD ``A ≈ U diag(S) Vh`` of ``A: (m, n)`` with ``q`` columns: ``U: (m, q)``, ``S: (q,)``,
    ``Vh: (q, n)``. Algorithm 4.4 + 5.1 of Halko et al. (the steps of ``torch.svd_lowrank``), the Gaussian test
    matrix drawn from a generator seeded with ``seed`` on ``A``'s device (None: the global generator)."""
    tall = A.shape[0] >= A.shape[1]
    M = A if tall else A.mH  # (m', n') with m' >= n'
    generator = None
    if seed is not None:
        generator = torch.Generator(device=M.device)
        generator.manual_seed(seed)
    R = torch.randn(M.shape[-1], q, dtype=M.dtype, device=M.device, generator=generator)  # (n', q)
    Q = torch.linalg.qr(M @ R).Q  # (m', q): an orthonormal basis of the sketched range
    for _ in range(niter):  # power iterations sharpen the basis towards the top singular vectors
        Q = torch.linalg.qr(M.mH @ Q).Q
        Q = torch.linalg.qr(M @ Q).Q
    U, S, Vh = torch.linalg.svd(Q.mH @ M, full_matrices=False)  # (q, n') is small
    U = Q @ U
    if tall:
        return U, S, Vh
    return Vh.mH, S, U.mH


def _flip_signs(Vh: torch.Tensor) -> torch.Tensor:
    """Rows of ``Vh: (k, d)`` with the sign that makes each row's largest-magnitude entry positive (sklearn's
    ``svd_flip(u_based_decision=False)``), so the result does not depend on the solver's sign choice."""
    pivots = Vh.abs().argmax(dim=1)
    signs = torch.sign(Vh[torch.arange(Vh.shape[0], device=Vh.device), pivots])
    return Vh * signs.view(-1, 1)


def _merge_moments(state: PCAState, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean ``(d,)``, variance ``(d,)`` (float64, population) and count of the samples seen plus ``X: (n, d)``
    (Chan et al.'s pairwise update, as sklearn's ``_incremental_mean_and_var``)."""
    n = X.shape[0]
    new_sum = X.sum(dim=0, dtype=torch.float64)
    centred = X - new_sum / n
    correction = centred.sum(dim=0, dtype=torch.float64).square()
    new_unnormalized = centred.square().sum(dim=0, dtype=torch.float64) - correction / n
    total = state.n_seen + n
    if state.mean is None or state.var is None:
        return new_sum / total, new_unnormalized / total, total
    last_sum = state.mean * state.n_seen
    ratio = state.n_seen / n
    unnormalized = (state.var * state.n_seen + new_unnormalized
                    + ratio / total * (last_sum / ratio - new_sum).square())
    return (last_sum + new_sum) / total, unnormalized / total, total


def _stacked(state: PCAState, X: torch.Tensor, mean: torch.Tensor, total: int) -> torch.Tensor:
    """The matrix whose SVD updates the state: the centred first batch ``(n, d)``, or later
    ``[S·components; X - mean(X); mean correction]: (k + n + 1, d)`` (float64, since the running mean is)."""
    if not state.fitted:
        return (X - mean).to(X.dtype)  # float32 input stays float32 (the reference's first step)
    assert state.mean is not None and state.singular_values is not None and state.components is not None
    batch_mean = X.mean(dim=0)
    factor = ((state.n_seen / total) * X.shape[0]) ** 0.5
    correction = factor * (state.mean - batch_mean)
    return torch.vstack((state.singular_values.view(-1, 1) * state.components, X - batch_mean, correction.view(1, -1)))


def _finish(state: PCAState, S: torch.Tensor, Vh: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
            total: int) -> PCAState:
    k = state.n_components
    Vh = _flip_signs(Vh)
    ratio = S**2 / torch.sum(var * total)
    return PCAState(n_components=k, n_seen=total, mean=mean, var=var, components=Vh[:k],
                    singular_values=S[:k], explained_variance_ratio=ratio[:k])


def _check_batch(state: PCAState, X: torch.Tensor) -> None:
    if X.dim() != 2:
        raise ValueError(f"incremental PCA: a batch must be 2-d (samples, features), got shape {tuple(X.shape)}")
    if state.n_components > X.shape[1]:
        raise ValueError(f"incremental PCA: n_components={state.n_components} is more than the {X.shape[1]} features")
    if state.mean is not None and state.mean.shape[0] != X.shape[1]:
        raise ValueError(f"incremental PCA: batch has {X.shape[1]} features, earlier batches had {state.mean.shape[0]}")


def incremental_pca_update(state: PCAState, X: torch.Tensor, niter: int = 4, seed: int | None = 42,
                           q: int | None = None) -> PCAState:
    """The state after also seeing ``X: (n, d)`` (float32/float64; ``n >= k`` samples), using
    :func:`randomized_svd` with ``q = 2k`` sketch columns by default. Returns a new state; ``state`` is unchanged."""
    _check_batch(state, X)
    X = X if X.dtype in (torch.float32, torch.float64) else X.float()
    mean, var, total = _merge_moments(state, X)
    _, S, Vh = randomized_svd(_stacked(state, X, mean, total), q or 2 * state.n_components, niter, seed)
    return _finish(state, S, Vh, mean, var, total)


def incremental_pca_update_reference(state: PCAState, X: torch.Tensor) -> PCAState:
    """Plain version of :func:`incremental_pca_update` with a full ``torch.linalg.svd`` (for tests)."""
    _check_batch(state, X)
    mean, var, total = _merge_moments(state, X.double())
    _, S, Vh = torch.linalg.svd(_stacked(state, X.double(), mean, total), full_matrices=False)
    return _finish(state, S, Vh, mean, var, total)


def pca_reference(X: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch PCA of all samples ``X: (n, d)`` in float64: ``components: (k, d)`` (sign-fixed) and singular values
    ``(k,)`` of ``X - mean``. Incremental PCA without truncation (``k >= rank``) must equal it."""
    X = X.double()
    _, S, Vh = torch.linalg.svd(X - X.mean(dim=0), full_matrices=False)
    return _flip_signs(Vh)[:k], S[:k]


def cosine_converged(previous: torch.Tensor, current: torch.Tensor, tau: float) -> torch.Tensor:
    """``(k,)`` bool: row ``i`` of ``current: (k, d)`` has cosine similarity ``>= tau`` with row ``i`` of
    ``previous`` (EVA's convergence test between two consecutive updates)."""
    return torch.nn.functional.cosine_similarity(current.reshape(current.shape[0], -1),
                                                 previous.reshape(previous.shape[0], -1).to(current.dtype)) >= tau
