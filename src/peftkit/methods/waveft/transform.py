"""WaveFT's update as tensor functions: ``ΔW = scaling · crop(IDWT2(C))`` with ``C`` sparse.

The reference (``get_delta_weight``) places the ``n`` coefficients of a ``W: (out, in)`` at seeded positions of a
zero-padded ``(P, Q)`` matrix, reads its quadrants as the one-level 2-D wavelet sub-bands ``[[cA, cH], [cV, cD]]``,
runs the inverse transform (a stride-2 ``conv_transpose2d`` with the outer products of the reconstruction filters,
then trimming ``L - 2`` rows/columns per side) and crops the centre ``(out, in)``; the forward multiplies ``x`` by
the dense result and keeps it for backward.

The transform is separable: a coefficient at padded position ``(p, q)`` adds
``s · f_hb[i + off_r - 2a] · f_wb[j + off_c - 2b]`` to ``ΔW[i, j]``, with ``a = p mod P/2``, ``b = q mod Q/2``, the
row filter ``f_hb`` highpass when ``q >= Q/2`` (cH, cD) and the column filter ``f_wb`` highpass when ``p >= P/2``
(cV, cD). So ``x ΔWᵀ`` is three cheap steps on the activations (:func:`waveft_apply`):

1. ``X2 = analysis(x)``: ``(N, in) -> (N, Q)``, a stride-2 correlation with ``[rec_lo, rec_hi]`` (interleaved
   ``(low, high)`` pairs);
2. ``Z[:, row_k] += scaling · s_k · X2[:, col_k]``: the sparse coefficients, ``(N, Q) -> (N, P)``;
3. ``y = synthesis(Z)``: ``(N, P) -> (N, out)``, the stride-2 transposed convolution, cropped.

That costs ``O(N · ((in + out) · L + n))`` against the reference's ``O(N · out · in)`` and keeps only ``x`` (which
the base layer keeps anyway) and the spectrum for backward. Without the IDWT (``use_idwt=False``) steps 1 and 3 are
the identity and ``ΔW`` is the scattered coefficients. :func:`waveft_delta` forms ``ΔW`` (merging) with the
reference's own 2-D transform; :func:`waveft_apply_plain` is the autograd-traced version of :func:`waveft_apply`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .wavelets import filter_bank, filter_length, size_reduction


@dataclass(frozen=True)
class WavePlan:
    """Where each coefficient acts, for one ``(out, in)`` layer and one adapter.

    ``rows: (n,)`` / ``cols: (n,)`` int64: the coefficient's slot in ``Z: (N, P)`` (``2a + hb``) and in
    ``X2: (N, Q)`` (``2b + wb``); without the IDWT its row / column of ``ΔW``. ``family`` None: no IDWT.
    ``padded``: ``(P, Q)``; ``offsets``: ``(off_r, off_c)``, where the cropped ``ΔW`` starts in the full
    reconstruction.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    shape: tuple[int, int]
    padded: tuple[int, int]
    offsets: tuple[int, int]
    family: str | None

    def to(self, device: torch.device) -> WavePlan:
        """The plan with its index tensors on ``device``."""
        return WavePlan(self.rows.to(device), self.cols.to(device), self.shape, self.padded, self.offsets,
                        self.family)


def padded_size(size: int, family: str) -> int:
    """The reference's padded side: ``size + L - 2``, rounded up to even."""
    padded = size + size_reduction(family)
    return padded + padded % 2


def _crop_offset(size: int, padded: int, family: str) -> int:
    """Where the ``size`` kept entries start in the full reconstruction of a padded side: the reference trims
    ``(2L - 3) // 2`` entries per side of the ``padded + L - 2`` long transposed convolution, then crops the centre."""
    trim = (2 * filter_length(family) - 3) // 2
    full = padded + filter_length(family) - 2 - 2 * trim
    return trim + (full - size) // 2


def wave_plan(indices: torch.Tensor, shape: tuple[int, int], family: str | None) -> WavePlan:
    """The :class:`WavePlan` of coefficients at ``indices: (2, n)`` (rows, columns of ``(out, in)``, the reference's
    ``waveft_indices``); ``family`` None: no IDWT (``use_idwt=False``)."""
    out_features, in_features = shape
    if family is None:
        return WavePlan(indices[0].clone(), indices[1].clone(), shape, shape, (0, 0), None)
    big_p, big_q = padded_size(out_features, family), padded_size(in_features, family)
    p = indices[0] + (big_p - out_features) // 2  # the reference centres W in the padded matrix
    q = indices[1] + (big_q - in_features) // 2
    h2, w2 = big_p // 2, big_q // 2
    row_band, col_band = (q >= w2).long(), (p >= h2).long()  # highpass along rows for cH/cD, along columns for cV/cD
    rows = 2 * (p % h2) + row_band  # interleaved (low, high) pairs: analysis / synthesis read them as (N, half, 2)
    cols = 2 * (q % w2) + col_band
    offsets = (_crop_offset(out_features, big_p, family), _crop_offset(in_features, big_q, family))
    return WavePlan(rows, cols, shape, (big_p, big_q), offsets, family)


# ------------------------------------------------------------------------------------------------ 1-D steps


def analysis(x: torch.Tensor, bank: torch.Tensor, padded: int, offset: int) -> torch.Tensor:
    """``x: (N, size) -> (N, padded)``: ``out[:, 2b + band] = Σ_j x[:, j] · bank[band, j + offset - 2b]``, the
    adjoint of :func:`synthesis`: a stride-2 correlation with ``bank: (2, L)``, written as ``L / 2`` matmuls of the
    pairs ``(x'[2c], x'[2c + 1])`` of the zero-padded ``x'`` with ``2 x 2`` blocks of the filters (one for Haar)."""
    length = bank.shape[1]
    right = padded + length - 2 - offset - x.shape[1]
    pairs = (F.pad(x, (offset, right)) if offset or right else x).view(x.shape[0], (padded + length) // 2 - 1, 2)
    half = padded // 2
    out = pairs[:, :half] @ bank[:, :2].T
    for m in range(1, length // 2):
        out = out + pairs[:, m: m + half] @ bank[:, 2 * m: 2 * m + 2].T
    return out.view(x.shape[0], padded)


def synthesis(z: torch.Tensor, bank: torch.Tensor, size: int, offset: int) -> torch.Tensor:
    """``z: (N, padded) -> (N, size)``: ``out[:, i] = Σ_{a, band} z[:, 2a + band] · bank[band, i + offset - 2a]``,
    the one-dimensional inverse wavelet transform of interleaved ``(low, high)`` pairs, cropped at ``offset``: one
    matmul with ``bank`` and ``L / 2`` shifted adds of its ``(N, padded / 2, 2)`` slices."""
    length = bank.shape[1]
    taps = z.view(z.shape[0], z.shape[1] // 2, 2) @ bank  # (N, padded / 2, L): what coefficient a adds at 2a + t
    full = taps if length == 2 else taps.new_zeros(z.shape[0], z.shape[1] // 2 + length // 2 - 1, 2)
    if length > 2:
        for m in range(length // 2):
            full[:, m: m + taps.shape[1]] += taps[:, :, 2 * m: 2 * m + 2]
    full = full.reshape(z.shape[0], 2 * full.shape[1])
    return full if offset == 0 and full.shape[1] == size else full[:, offset: offset + size]


def _mix(x2: torch.Tensor, spectrum: torch.Tensor, plan: WavePlan, scaling: float) -> torch.Tensor:
    """``Z: (N, P)`` from ``X2: (N, Q)``: ``Z[:, rows_k] += scaling · s_k · X2[:, cols_k]``."""
    gathered = x2.index_select(1, plan.cols).mul_(spectrum * scaling)  # a fresh (N, n) tensor: scaled in place
    return x2.new_zeros(x2.shape[0], plan.padded[0]).index_add_(1, plan.rows, gathered)


def _forward(x: torch.Tensor, spectrum: torch.Tensor, plan: WavePlan, scaling: float) -> torch.Tensor:
    """``x: (N, in) -> (N, out)`` = ``x ΔWᵀ`` (steps 1-3 of the module docstring)."""
    if plan.family is None:
        return _mix(x, spectrum, plan, scaling)
    bank = filter_bank(plan.family, x.dtype, x.device)
    z = _mix(analysis(x, bank, plan.padded[1], plan.offsets[1]), spectrum, plan, scaling)
    return synthesis(z, bank, plan.shape[0], plan.offsets[0])


class _WaveApply(torch.autograd.Function):
    """:func:`_forward` keeping only ``x`` and the spectrum for backward (``X2`` is recomputed: one cheap
    correlation), where autograd would keep ``X2: (N, Q)`` and the gathered ``(N, n)`` product."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, spectrum: torch.Tensor, plan: WavePlan, scaling: float
                ) -> torch.Tensor:
        ctx.save_for_backward(x, spectrum)
        ctx.plan, ctx.scaling = plan, scaling
        return _forward(x, spectrum, plan, scaling)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, spectrum = ctx.saved_tensors
        plan, scaling = ctx.plan, ctx.scaling
        identity = plan.family is None
        bank = None if identity else filter_bank(plan.family, x.dtype, x.device)
        # dL/dZ: the adjoint of the synthesis is the analysis (and the other way round)
        grad_z = grad if identity else analysis(grad, bank, plan.padded[0], plan.offsets[0])
        grad_z_k = grad_z.index_select(1, plan.rows)  # (N, n)
        grad_x = grad_spectrum = None
        if ctx.needs_input_grad[1]:
            x2 = x if identity else analysis(x, bank, plan.padded[1], plan.offsets[1])
            grad_spectrum = torch.linalg.vecdot(grad_z_k, x2.index_select(1, plan.cols), dim=0) * scaling
        if ctx.needs_input_grad[0]:  # grad_z_k is not needed any more: scaled in place
            grad_x2 = grad.new_zeros(grad.shape[0], plan.padded[1]).index_add_(
                1, plan.cols, grad_z_k.mul_(spectrum * scaling))
            grad_x = grad_x2 if identity else synthesis(grad_x2, bank, plan.shape[1], plan.offsets[1])
        return grad_x, grad_spectrum, None, None


def waveft_apply(x: torch.Tensor, spectrum: torch.Tensor, plan: WavePlan, scaling: float) -> torch.Tensor:
    """``x ΔWᵀ``: ``x: (..., in) -> (..., out)`` in ``spectrum``'s dtype, ``spectrum: (n,)``; ``ΔW`` is never formed."""
    rows = x.reshape(-1, x.shape[-1]).to(spectrum.dtype)
    if torch.is_grad_enabled() and (rows.requires_grad or spectrum.requires_grad):
        out = _WaveApply.apply(rows, spectrum, plan, scaling)
    else:
        out = _forward(rows, spectrum, plan, scaling)
    return out.view(*x.shape[:-1], plan.shape[0])


def waveft_apply_plain(x: torch.Tensor, spectrum: torch.Tensor, plan: WavePlan, scaling: float) -> torch.Tensor:
    """:func:`waveft_apply` differentiated by autograd (the reference for :class:`_WaveApply`'s backward)."""
    rows = x.reshape(-1, x.shape[-1]).to(spectrum.dtype)
    return _forward(rows, spectrum, plan, scaling).view(*x.shape[:-1], plan.shape[0])


# ------------------------------------------------------------------------------------------------ dense ΔW


def _idwt2(dense: torch.Tensor, family: str) -> torch.Tensor:
    """The reference's one-level 2-D inverse transform of ``dense: (P, Q)`` read as ``[[cA, cH], [cV, cD]]``:
    a stride-2 ``conv_transpose2d`` with the filters ``lo⊗lo, hi⊗lo, lo⊗hi, hi⊗hi``, trimmed ``(2L - 3) // 2`` per
    side. Returns ``(P + L - 2 - 2 · trim, Q + ...)``."""
    big_p, big_q = dense.shape
    lo, hi = filter_bank(family, dense.dtype, dense.device)
    filters = torch.stack([torch.outer(a, b) for a, b in ((lo, lo), (hi, lo), (lo, hi), (hi, hi))]).unsqueeze(1)
    h2, w2 = big_p // 2, big_q // 2
    bands = torch.stack([dense[:h2, :w2], dense[:h2, w2:], dense[h2:, :w2], dense[h2:, w2:]]).unsqueeze(0)
    full = F.conv_transpose2d(bands, filters, stride=2)[0, 0]
    trim = (2 * filter_length(family) - 3) // 2
    return full[trim: full.shape[0] - trim, trim: full.shape[1] - trim]


def waveft_delta(spectrum: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int], scaling: float,
                 family: str | None) -> torch.Tensor:
    """``ΔW: (out, in)`` in ``spectrum``'s dtype, as the reference's ``get_delta_weight``: the coefficients
    ``spectrum: (n,)`` at ``indices: (2, n)`` (shifted to the centre of the padded ``(P, Q)``), the 2-D inverse
    transform, the centre ``(out, in)`` crop, times ``scaling``; ``family`` None: the scattered coefficients."""
    out_features, in_features = shape
    if family is None:
        dense = spectrum.new_zeros(shape).index_put((indices[0], indices[1]), spectrum)
        return dense * scaling
    big_p, big_q = padded_size(out_features, family), padded_size(in_features, family)
    rows = indices[0] + (big_p - out_features) // 2
    cols = indices[1] + (big_q - in_features) // 2
    dense = spectrum.new_zeros(big_p, big_q).index_put((rows, cols), spectrum)
    full = _idwt2(dense, family) * scaling
    top, left = (full.shape[0] - out_features) // 2, (full.shape[1] - in_features) // 2
    return full[top: top + out_features, left: left + in_features]
