"""FourierFT's update applied to activations: ``x ΔWᵀ`` without ever forming ``ΔW: (out, in)``.

Notation: ``ΔW = Re(IFFT2(S)) · c`` with ``S: (M, N) = (out, in)`` zero but for ``S[u_k, v_k] = s_k``
(``k < n``). For one row ``x: (N,)`` (real)::

    X[v] = Σ_q x[q] e^{+2πi qv/N}                 (= conj(FFT(x))[v])
    Z[u] = Σ_{k: u_k = u} s_k X[v_k]
    (x ΔWᵀ)[p] = c / N · Re(IFFT_M(Z))[p]

and for backward, with ``g: (M,)`` the output gradient and ``G[u] = Σ_p g[p] e^{+2πi pu/M}``::

    ∂L/∂x = c / M · Re(IFFT_N(Σ_{k: v_k = v} s_k G[u_k]))
    ∂L/∂s_k = c / (M N) · Σ_rows Re(G[u_k] X[v_k])

So a forward costs a real FFT of the rows of ``x`` and an inverse FFT of length ``M`` (``O(T (M + N) log)`` for ``T``
rows) instead of the reference's dense ``(M, N)`` inverse FFT plus a ``T x M x N`` matmul, and backward keeps only
``x`` and ``s`` (the reference keeps ``ΔW``). ``X`` is gathered from ``rfft(x)``: ``X[v] = conj(R[v])`` for
``v <= N // 2``, else ``R[N - v]`` (the same for ``G`` from ``rfft(g)``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class Scatter(NamedTuple):
    """How ``Σ_k a_k δ[t_k]`` (complex ``a_k`` read from the rfft bins of another axis) lands in the half spectrum
    ``H[w] = (Z[w] + conj(Z[-w])) / 2, w <= L // 2`` whose ``irfft`` is ``Re(IFFT_L(Z))``: entry ``j`` adds
    ``a_{source[j]}`` (conjugated where ``imag_sign[j] = -1``, times ``1/2``) at ``position[j]``; ``m <= 2n``."""

    source: torch.Tensor  # (m,) int64: the frequency k
    position: torch.Tensor  # (m,) int64: the half-spectrum bin w
    imag_sign: torch.Tensor  # (m,) float: the conjugations (of the read bin and of the mirror) combined
    length: int  # L


class SpectralPlan(NamedTuple):
    """Gather/scatter tables of one layer's ``n`` frequencies ``(u_k, v_k)`` in an ``(out, in) = (M, N)`` spectrum."""

    rows_half: torch.Tensor  # (n,) u_k folded into [0, M // 2]: the rfft bin of g holding G[u_k] (or its conjugate)
    cols_half: torch.Tensor  # (n,) v_k folded into [0, N // 2]
    rows_sign: torch.Tensor  # (n,) -1 where G[u_k] = conj(R_g[u_k]), +1 where it is R_g[M - u_k]
    cols_sign: torch.Tensor  # (n,) the same for X[v_k]
    to_rows: Scatter  # forward: s_k X[v_k] into the output spectrum (length M)
    to_cols: Scatter  # backward: s_k G[u_k] into the input-gradient spectrum (length N)
    shape: tuple[int, int]


def _fold(index: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    low = index <= size // 2
    return torch.where(low, index, size - index), torch.where(low, -1.0, 1.0)


def _scatter(target: torch.Tensor, read_sign: torch.Tensor, length: int) -> Scatter:
    k = torch.arange(target.numel())
    mirror = (-target) % length
    direct, mirrored = target <= length // 2, mirror <= length // 2
    return Scatter(torch.cat([k[direct], k[mirrored]]), torch.cat([target[direct], mirror[mirrored]]),
                   torch.cat([read_sign[direct], -read_sign[mirrored]]), length)


def spectral_plan(indices: torch.Tensor, shape: tuple[int, int]) -> SpectralPlan:
    """The :class:`SpectralPlan` of ``indices: (2, n)`` (rows, columns) in an ``(out, in)`` spectrum (CPU)."""
    rows, cols = indices[0].cpu(), indices[1].cpu()
    rows_half, rows_sign = _fold(rows, shape[0])
    cols_half, cols_sign = _fold(cols, shape[1])
    return SpectralPlan(rows_half, cols_half, rows_sign, cols_sign, _scatter(rows, cols_sign, shape[0]),
                        _scatter(cols, rows_sign, shape[1]), shape)


def plan_to(plan: SpectralPlan, device: torch.device) -> SpectralPlan:
    """``plan`` with its tensors on ``device``."""
    def move(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            return t.to(device)
        if isinstance(t, Scatter):
            return Scatter(*(move(f) for f in t))
        return t

    return SpectralPlan(*(move(f) for f in plan))


def _bins(rows: torch.Tensor) -> torch.Tensor:
    """``rfft`` of ``rows: (T, L)`` real, transposed: ``(L // 2 + 1, T)`` complex (a gather along dim 0 is fast)."""
    return torch.fft.rfft(rows, dim=-1).t().contiguous()


def _scatter_irfft(bins: torch.Tensor, read: torch.Tensor, spectrum: torch.Tensor, scatter: Scatter,
                   scale: float) -> torch.Tensor:
    """``scale · Re(IFFT_L(Σ_k s_k B_k δ[t_k]))``: ``(T, L)`` real, with ``B_k`` the (possibly conjugated) bin
    ``read[k]`` of ``bins: (K, T)`` complex and the scatter's conjugations."""
    values = torch.view_as_real(bins.index_select(0, read.index_select(0, scatter.source)))  # (m, T, 2)
    weight = spectrum.index_select(0, scatter.source) * (0.5 * scale)
    factor = torch.stack([weight, weight * scatter.imag_sign.to(weight.dtype)], -1).unsqueeze(1)  # (m, 1, 2)
    half = values.new_zeros(scatter.length // 2 + 1, values.shape[1] * 2)
    half.index_add_(0, scatter.position, (values * factor).view(values.shape[0], -1))
    half_spectrum = torch.view_as_complex(half.view(half.shape[0], -1, 2)).t()
    return torch.fft.irfft(half_spectrum, n=scatter.length, dim=-1)


def spectral_apply_plain(x: torch.Tensor, spectrum: torch.Tensor, plan: SpectralPlan, scaling: float) -> torch.Tensor:
    """``x ΔWᵀ``: ``x: (T, in)``, ``spectrum: (n,)`` -> ``(T, out)`` (one real dtype; differentiable through
    autograd, which keeps the gathered bins; :func:`spectral_apply` keeps only ``x`` and ``spectrum``)."""
    return _scatter_irfft(_bins(x), plan.cols_half, spectrum, plan.to_rows, scaling / plan.shape[1])


class _SpectralApply(torch.autograd.Function):
    """:func:`spectral_apply_plain` with a hand-written backward (module docstring) that recomputes ``X``."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, spectrum: torch.Tensor,
                plan: SpectralPlan, scaling: float) -> torch.Tensor:
        ctx.save_for_backward(x, spectrum)
        ctx.plan, ctx.scaling = plan, scaling
        with torch.no_grad():
            return spectral_apply_plain(x, spectrum, plan, scaling)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x, spectrum = ctx.saved_tensors
        plan, scaling = ctx.plan, ctx.scaling
        out_features, in_features = plan.shape
        g_bins = _bins(grad.to(x.dtype))  # (M // 2 + 1, T)
        grad_x = grad_s = None
        if ctx.needs_input_grad[1]:  # Σ_t Re(G[u_k] X[v_k]) from the bins: Re·Re - σ_u σ_v Im·Im
            g = torch.view_as_real(g_bins.index_select(0, plan.rows_half))  # (n, T, 2)
            xb = torch.view_as_real(_bins(x).index_select(0, plan.cols_half))
            dots = (g * xb).sum(1)  # (n, 2)
            signs = (plan.rows_sign * plan.cols_sign).to(dots.dtype)
            grad_s = (dots[:, 0] - signs * dots[:, 1]) * (scaling / (out_features * in_features))
            del g, xb
        if ctx.needs_input_grad[0]:
            grad_x = _scatter_irfft(g_bins, plan.rows_half, spectrum, plan.to_cols, scaling / out_features)
        return grad_x, grad_s, None, None


def spectral_apply(x: torch.Tensor, spectrum: torch.Tensor, plan: SpectralPlan, scaling: float) -> torch.Tensor:
    """``x ΔWᵀ`` for ``x: (..., in)`` -> ``(..., out)``, computed in the spectrum's dtype (float32 for half
    precision: no half-precision FFT on CPU); backward keeps ``x`` and ``spectrum`` only."""
    dtype = torch.float64 if spectrum.dtype == torch.float64 else torch.float32
    rows = x.reshape(-1, x.shape[-1]).to(dtype)
    s = spectrum.to(dtype)
    if torch.is_grad_enabled() and (rows.requires_grad or s.requires_grad):
        out = _SpectralApply.apply(rows, s, plan, scaling)
    else:
        out = spectral_apply_plain(rows, s, plan, scaling)
    return out.view(*x.shape[:-1], plan.shape[0])
