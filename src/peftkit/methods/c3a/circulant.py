"""C3A's block-circulant update applied to activations through real FFTs, and its dense form for merging.

Notation: ``kernel: (M, N, b)`` (``M = out / b``, ``N = in / b``), ``s`` a scale (the reference's ``1 / in``). The
dense update is ``ΔW[m b + k, n b + j] = s · kernel[m, n, (j - k) mod b]``, so for one row ``x: (N, b)``::

    y[m, k] = s Σ_n Σ_j x[n, j] kernel[m, n, (j - k) mod b]      (a circular cross-correlation per block)
    Y[m]    = s Σ_n X[n] · conj(K[m, n])                          (X = rfft(x), K = rfft(kernel), per frequency)

and for backward, with ``g: (M, b)`` the output gradient and ``G = rfft(g)``::

    ∂L/∂x[n]         = s · irfft(Σ_m G[m] K[m, n])
    ∂L/∂kernel[m, n] = s · irfft(Σ_rows X[n] · conj(G[m]))

The reference (``BlockCircularConvolution``) runs full complex FFTs (``ifft(x)``, ``fft(kernel)``, ``fft(·).real``)
and divides the output by ``in`` in a separate pass; real FFTs halve the transforms and the complex temporaries, the
scale is folded into the ``(M, N, b/2+1)`` kernel spectrum, and backward keeps only ``x`` and the kernel.
"""

from __future__ import annotations

import torch

fft = torch.fft


def circulant_index(block_size: int, device: torch.device | None = None) -> torch.Tensor:
    """``(b, b)`` int64 with ``[k, j] = (j - k) mod b``: which kernel entry sits at row ``k``, column ``j``."""
    k = torch.arange(block_size, device=device)
    return (k[None, :] - k[:, None]) % block_size


def circulant_delta(kernel: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense ``ΔW: (M b, N b)`` of ``kernel: (M, N, b)`` (module docstring), in the kernel's dtype, by a gather:
    exact (the reference builds it through FFTs of an ``(in, in)`` identity). Differentiable."""
    m, n, b = kernel.shape
    blocks = kernel[:, :, circulant_index(b, kernel.device)]  # (M, N, b, b): [m, n, k, j]
    return blocks.permute(0, 2, 1, 3).reshape(m * b, n * b) * scale


def _spectrum(kernel: torch.Tensor, scale: float) -> torch.Tensor:
    """``s · rfft(kernel)``: ``(M, N, b // 2 + 1)`` complex."""
    return fft.rfft(kernel) * scale


def circulant_apply_plain(x: torch.Tensor, kernel: torch.Tensor, scale: float) -> torch.Tensor:
    """``x ΔWᵀ``: ``x: (T, N b)`` -> ``(T, M b)`` in one real dtype through real FFTs (differentiable through
    autograd, which keeps ``rfft(x)``; :class:`_CirculantApply` keeps ``x`` only)."""
    m, n, b = kernel.shape
    spectrum = fft.rfft(x.reshape(x.shape[0], n, b))  # (T, N, F)
    out = torch.einsum("tnf,mnf->tmf", spectrum, _spectrum(kernel, scale).conj())
    return fft.irfft(out, n=b).reshape(x.shape[0], m * b)


class _CirculantApply(torch.autograd.Function):
    """:func:`circulant_apply_plain` with the hand-written backward of the module docstring."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, kernel: torch.Tensor,
                scale: float) -> torch.Tensor:
        ctx.save_for_backward(x, kernel)
        ctx.scale = scale
        return circulant_apply_plain(x, kernel, scale)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, kernel = ctx.saved_tensors
        m, n, b = kernel.shape
        g_spec = fft.rfft(grad.reshape(grad.shape[0], m, b).to(x.dtype))  # (T, M, F)
        grad_x = grad_k = None
        if ctx.needs_input_grad[0]:
            dx = torch.einsum("tmf,mnf->tnf", g_spec, _spectrum(kernel, ctx.scale))
            grad_x = fft.irfft(dx, n=b).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            x_spec = fft.rfft(x.reshape(x.shape[0], n, b))
            grad_k = fft.irfft(torch.einsum("tnf,tmf->mnf", x_spec, g_spec.conj()), n=b) * ctx.scale
        return grad_x, grad_k, None


def circulant_apply(x: torch.Tensor, kernel: torch.Tensor, scale: float) -> torch.Tensor:
    """``x ΔWᵀ`` for ``x: (..., N b)`` -> ``(..., M b)``, computed in the kernel's dtype (float32: the reference's
    kernels are float32 and CPUs have no half-precision FFT); backward keeps ``x`` and the kernel only."""
    rows = x.reshape(-1, x.shape[-1]).to(kernel.dtype)
    if torch.is_grad_enabled() and (rows.requires_grad or kernel.requires_grad):
        out = _CirculantApply.apply(rows, kernel, scale)
    else:
        out = circulant_apply_plain(rows, kernel, scale)
    return out.view(*x.shape[:-1], out.shape[-1])
