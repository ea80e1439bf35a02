"""FourierFT layers: ``ΔW = Re(IFFT2(S)) · scaling`` on ``nn.Linear`` and GPT-2 ``Conv1D``.

Shapes (as the reference): ``fourierft_spectrum: (n,)`` (the only saved tensor), ``indices: (2, n)`` int64 rows /
columns of the ``(out, in)`` spectrum, drawn from ``random_loc_seed`` with the reference's generator and never saved.
``ΔW`` is always ``(out, in)`` in the computation; for ``Conv1D`` (weight ``(in, out)``) ``get_delta_weight`` returns
it transposed, in the base weight's layout.

Forward: ``base(x) + x ΔWᵀ`` with ``x ΔWᵀ`` applied through FFTs of the activations (``spectral.py``): no
``(out, in)`` matrix is formed, multiplied or kept for backward. The reference forms ``ΔW`` by a dense complex
``ifft2`` every forward, multiplies by it and keeps it for backward. Merging forms ``ΔW`` once through a real
half-spectrum inverse FFT (:func:`fourier_delta`; :func:`fourier_delta_reference` is the reference's formula).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ...injection.apply import defer_init, skip_random_init
from ...layers.base import AdapterLayer
from ...layers.dispatch import HF_CONV1D, LINEAR, module_kind
from .spectral import SpectralPlan, plan_to, spectral_apply, spectral_plan


@functools.lru_cache(maxsize=16)
def spectral_indices(out_features: int, in_features: int, n_frequency: int, seed: int) -> torch.Tensor:
    """``(2, n_frequency)`` int64: rows and columns of the first ``n_frequency`` entries of
    ``torch.randperm(out * in)`` drawn from a CPU generator seeded with ``seed`` (the reference's exact draw).
    Cached: the layers of one shape share the draw (the reference redraws a full permutation per layer). Read-only."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n_frequency]
    return torch.stack([flat // in_features, flat % in_features])


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the FFT runs in: float64 stays, anything else runs in float32 (no half-precision FFT on CPU)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fourier_delta_reference(spectrum: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int], scaling: float
                            ) -> torch.Tensor:
    """``Re(IFFT2(S)) · scaling``: ``(out, in)`` in ``spectrum``'s dtype, ``S: shape`` zero but for
    ``S[indices[0], indices[1]] = spectrum`` (``spectrum: (n,)``, ``indices: (2, n)``). The reference's computation
    (a dense complex ``(out, in)`` FFT); :func:`fourier_delta` is the lean equivalent."""
    dense = spectrum.new_zeros(shape, dtype=compute_dtype(spectrum.dtype))
    dense = dense.index_put((indices[0], indices[1]), spectrum.to(dense.dtype))
    return (torch.fft.ifft2(dense).real * scaling).to(spectrum.dtype)


def half_spectrum_plan(indices: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each coefficient lands in the half spectrum ``H[:, : in // 2 + 1]`` of ``H = (S + S̃) / 2``,
    ``S̃[u, v] = S[-u mod out, -v mod in]``: ``(flat positions (m,), source coefficient (m,))``, ``m <= 2n``.

    ``S`` is real, so ``Re(IFFT2(S)) = IFFT2(H)`` and ``H`` is Hermitian: its inverse FFT is real and is
    ``irfft2`` of the half spectrum. Every ``(u, v)`` with ``v <= in // 2`` keeps half its value there; its mirror
    ``(-u, -v)`` does the same when ``-v mod in <= in // 2`` (columns ``0`` and ``in / 2`` receive both halves)."""
    out_features, in_features = shape
    half = in_features // 2 + 1
    rows, cols = indices[0], indices[1]
    source = torch.arange(rows.numel(), device=rows.device)
    mirror_rows, mirror_cols = (-rows) % out_features, (-cols) % in_features
    keep, keep_mirror = cols < half, mirror_cols < half
    flat = torch.cat([rows[keep] * half + cols[keep], mirror_rows[keep_mirror] * half + mirror_cols[keep_mirror]])
    return flat, torch.cat([source[keep], source[keep_mirror]])


def fourier_delta(spectrum: torch.Tensor, plan: tuple[torch.Tensor, torch.Tensor], shape: tuple[int, int],
                  scaling: float) -> torch.Tensor:
    """:func:`fourier_delta_reference` through a real half-spectrum inverse FFT: ``(out, in)`` in ``spectrum``'s
    dtype, ``plan`` from :func:`half_spectrum_plan`. No complex ``(out, in)`` tensor and about half the FFT work;
    the scaling is applied to the ``n`` coefficients, not to the ``(out, in)`` result."""
    out_features, in_features = shape
    flat, source = plan
    values = spectrum.to(compute_dtype(spectrum.dtype)).index_select(0, source) * (0.5 * scaling)
    half = values.new_zeros(out_features * (in_features // 2 + 1)).index_add(0, flat, values)
    delta = torch.fft.irfft2(half.view(out_features, in_features // 2 + 1), s=shape)
    return delta.to(spectrum.dtype)


class FourierFTLayer(AdapterLayer):
    """FourierFT on ``nn.Linear`` and GPT-2 ``Conv1D`` (the reference's ``FourierFTLinear``)."""

    adapter_layer_names = ("fourierft_spectrum",)
    other_param_names = ("fourierft_n_frequency", "fourierft_scaling", "fourierft_random_loc_seed", "indices",
                         "half_plan", "spectral_plan")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fourierft_spectrum = nn.ParameterDict({})
        self.fourierft_n_frequency: dict[str, int] = {}
        self.fourierft_scaling: dict[str, float] = {}
        self.fourierft_random_loc_seed: dict[str, int] = {}
        self.indices: dict[str, torch.Tensor] = {}
        self.half_plan: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # fourier_delta's scatter plan
        self.spectral_plan: dict[str, SpectralPlan] = {}  # spectral_apply's gather/scatter tables
        base = self.get_base_layer()
        self.fan_in_fan_out = fan_in_fan_out
        self.kind = module_kind(base)
        if self.kind == HF_CONV1D:  # Conv1D weight: (in, out)
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, n_frequency: int, scaling: float, random_loc_seed: int,
                     init_weights: bool, dtype: torch.dtype | None = None) -> None:
        """Create adapter ``adapter_name``: ``spectrum ~ N(0, 1)`` (``init_weights=False``, the reference's
        default) or zeros (identity), in ``dtype`` (default: the base weight's), and its frequency ``indices``."""
        weight = self.get_base_layer().weight
        dtype = dtype or weight.dtype
        self.fourierft_n_frequency[adapter_name] = n_frequency
        self.fourierft_scaling[adapter_name] = scaling
        self.fourierft_random_loc_seed[adapter_name] = random_loc_seed
        indices = spectral_indices(self.out_features, self.in_features, n_frequency, random_loc_seed)
        self.indices[adapter_name] = indices  # on the CPU, as the reference
        shape = (self.out_features, self.in_features)
        self.half_plan[adapter_name] = half_spectrum_plan(indices, shape)
        self.spectral_plan[adapter_name] = plan_to(spectral_plan(indices, shape), weight.device)
        if skip_random_init():  # a load fills it: never draw it
            self.fourierft_spectrum[adapter_name] = nn.Parameter(torch.empty(n_frequency, device="meta", dtype=dtype))
            defer_init([self.fourierft_spectrum[adapter_name]], weight.device)
        else:
            spectrum = torch.zeros(n_frequency) if init_weights else torch.randn(n_frequency)
            self.fourierft_spectrum[adapter_name] = nn.Parameter(spectrum.to(device=weight.device, dtype=dtype))
        self.set_adapter(self._active_adapter or [adapter_name])

    # ------------------------------------------------------------------ the update
    def delta(self, adapter_name: str) -> torch.Tensor:
        """``ΔW: (out, in)`` of ``adapter_name`` in the spectrum's dtype (differentiable)."""
        spectrum = self.fourierft_spectrum[adapter_name]
        plan = self.half_plan[adapter_name]
        if plan[0].device != spectrum.device:  # the layer moved (plain dicts do not follow .to())
            plan = self.half_plan[adapter_name] = (plan[0].to(spectrum.device), plan[1].to(spectrum.device))
        return fourier_delta(spectrum, plan, (self.out_features, self.in_features),
                             self.fourierft_scaling[adapter_name])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW`` in the base weight's layout: ``(out, in)``, or ``(in, out)`` for ``Conv1D``."""
        delta = self.delta(adapter_name)
        return delta.t() if self.kind == HF_CONV1D else delta

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """On ``nn.Linear`` only, as the reference."""
        return self.kind == LINEAR

    # ------------------------------------------------------------------ forward
    def apply_update(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``x ΔWᵀ``: ``x: (..., in) -> (..., out)`` in the spectrum's dtype, through FFTs of ``x``."""
        spectrum = self.fourierft_spectrum[adapter_name]
        plan = self.spectral_plan[adapter_name]
        if plan.rows_half.device != spectrum.device:  # the layer moved (plain dicts do not follow .to())
            plan = self.spectral_plan[adapter_name] = plan_to(plan, spectrum.device)
        return spectral_apply(x, spectrum, plan, self.fourierft_scaling[adapter_name])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in) -> (..., out)``: ``base(x) + Σ_a x ΔW_aᵀ`` over the forward adapters."""
        return self.forward_adding(x, self._add_update, False, *args, **kwargs)

    def _add_update(self, result: torch.Tensor, name: str, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        """``result + x ΔWᵀ`` of adapter ``name`` (out of place)."""
        return result + self.apply_update(name, x).to(result.dtype)
