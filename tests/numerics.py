"""Tolerances for comparing float results that were computed by different kernels, code paths or libraries.

Exact equality (``torch.equal``, ``atol=0, rtol=0``) is right only where the same kernel runs on the same data:
a save/load round trip of the same tensors, a cached result against the call that built it. Anywhere else the
summation order is not ours to fix: BLAS (MKL, OpenBLAS) and oneDNN pick blockings and vector widths by CPU (an
AVX2 AMD EPYC and an AVX-512 Xeon sum the same dot product differently), ``ATen`` dispatches its vectorised
kernels by ``ATEN_CPU_CAPABILITY``, peftkit's native kernel (``peftkit.ops.native``) is compiled per CPU level, a
fused ``addmm`` rounds once where the reference's ``matmul`` + ``add`` rounds twice, and a zero-padded rank
changes the blocking. Such results agree to a few ulp per term of the longest reduction, which is what
:func:`fp_tol` returns.

Emulating another CPU on an AVX-512 machine: ``ATEN_CPU_CAPABILITY=avx2`` (or ``default``),
``MKL_ENABLE_INSTRUCTIONS=AVX2``, ``ONEDNN_MAX_CPU_ISA=AVX2``.
"""

from __future__ import annotations

import torch

#: float32 reduction lengths of the tiny models in ``tests/models.py``: hidden 32, FFN 64, two layers, so the
#: longest dot products of one forward add up to about 2 * (32 + 32 + 64) = 256 terms, plus a rank-r update each
TINY_MODEL_REDUCTION = 256


def fp_tol(dtype: torch.dtype, reduction_len: int, factor: float = 4.0) -> dict[str, float]:
    """``{"atol": t, "rtol": t}`` for ``torch.testing.assert_close(actual, expected, **fp_tol(...))`` where both
    sides compute the same math with a different summation order (another kernel, code path or library).

    ``reduction_len`` is the number of terms summed along the longest path to an output element (the inner
    dimension of a matmul, ``in_channels * kernel_size`` of a conv, added up over the layers the value passes
    through). Two orders of the same sum differ by at most about ``reduction_len * eps * sum(|terms|)`` (the
    classic bound; random rounding makes the typical gap far smaller), so ``t = factor * eps * reduction_len``:
    ``factor`` ulps per term cover a fused multiply-add against separate roundings and the few element-wise ops
    between the matmuls. ``rtol`` scales with the outputs' magnitude; ``atol`` covers outputs of order one that
    cancel to near zero. ``dtype`` is the dtype the computation ran in (``torch.finfo(dtype).eps``)."""
    if not dtype.is_floating_point:
        raise TypeError(f"fp_tol: dtype must be a floating point dtype, got {dtype}")
    if reduction_len < 1:
        raise ValueError(f"fp_tol: reduction_len must be >= 1, got {reduction_len}")
    tol = factor * torch.finfo(dtype).eps * reduction_len
    return {"atol": tol, "rtol": tol}
