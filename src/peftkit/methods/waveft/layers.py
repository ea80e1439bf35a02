"""WaveFT layers: ``ΔW = scaling · IDWT2(C)`` on ``nn.Linear`` and GPT-2 ``Conv1D``.

Shapes (as the reference): ``waveft_spectrum: (n,)`` (the only saved tensor), ``waveft_indices: (2, n)`` int64 rows /
columns of ``(out, in)``, drawn from ``random_loc_seed`` with the reference's generator and never saved. ``ΔW`` is
``(out, in)`` in the computation; for ``Conv1D`` (weight ``(in, out)``) ``get_delta_weight`` returns it transposed,
in the base weight's layout.

Forward: ``base(x) + x ΔWᵀ`` with ``x ΔWᵀ`` applied to the activations as a wavelet analysis, the sparse
coefficients and a wavelet synthesis (``transform.py``): no ``(out, in)`` matrix is formed, multiplied or kept for
backward (the reference forms ``ΔW`` every forward, multiplies by it and keeps it). Merging forms ``ΔW`` once with
the reference's 2-D inverse transform (:func:`~.transform.waveft_delta`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...injection.apply import defer_init, skip_random_init
from ...layers.base import AdapterLayer
from ...layers.dispatch import HF_CONV1D, LINEAR, module_kind
from ..fourierft.layers import spectral_indices
from .transform import WavePlan, wave_plan, waveft_apply, waveft_delta

#: standard deviation of the coefficients with ``init_weights=False`` (the reference's)
RANDOM_INIT_STD = 0.01


class WaveFTLayer(AdapterLayer):
    """WaveFT on ``nn.Linear`` and GPT-2 ``Conv1D`` (the reference's ``WaveFTLinear``)."""

    adapter_layer_names = ("waveft_spectrum",)
    other_param_names = ("waveft_n_frequency", "waveft_scaling", "waveft_random_loc_seed", "waveft_wavelet_family",
                         "waveft_indices", "waveft_use_idwt", "wave_plan")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.waveft_spectrum = nn.ParameterDict({})
        self.waveft_n_frequency: dict[str, int] = {}
        self.waveft_scaling: dict[str, float] = {}
        self.waveft_random_loc_seed: dict[str, int] = {}
        self.waveft_wavelet_family: dict[str, str] = {}
        self.waveft_indices: dict[str, torch.Tensor] = {}
        self.waveft_use_idwt: dict[str, bool] = {}
        self.wave_plan: dict[str, WavePlan] = {}  # waveft_apply's index tables, on the spectrum's device
        base = self.get_base_layer()
        self.fan_in_fan_out = fan_in_fan_out
        self.kind = module_kind(base)
        if self.kind == HF_CONV1D:  # Conv1D weight: (in, out)
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, n_frequency: int, scaling: float, wavelet_family: str, use_idwt: bool,
                     random_loc_seed: int, init_weights: bool, dtype: torch.dtype | None = None) -> None:
        """Create adapter ``adapter_name``: coefficients zero (``init_weights``, the default: identity) or
        ``0.01 · N(0, 1)``, in ``dtype`` (default: the base weight's), at the reference's seeded positions."""
        weight = self.get_base_layer().weight
        dtype = dtype or weight.dtype
        self.waveft_n_frequency[adapter_name] = n_frequency
        self.waveft_scaling[adapter_name] = scaling
        self.waveft_random_loc_seed[adapter_name] = random_loc_seed
        self.waveft_wavelet_family[adapter_name] = wavelet_family
        self.waveft_use_idwt[adapter_name] = use_idwt
        indices = spectral_indices(self.out_features, self.in_features, n_frequency, random_loc_seed)
        self.waveft_indices[adapter_name] = indices  # on the CPU, as the reference
        family = wavelet_family if use_idwt else None
        self.wave_plan[adapter_name] = wave_plan(indices, (self.out_features, self.in_features), family).to(
            weight.device)
        if skip_random_init():  # a load fills it: never draw it
            self.waveft_spectrum[adapter_name] = nn.Parameter(torch.empty(n_frequency, device="meta", dtype=dtype))
            defer_init([self.waveft_spectrum[adapter_name]], weight.device)
        else:
            spectrum = torch.zeros(n_frequency) if init_weights else torch.randn(n_frequency) * RANDOM_INIT_STD
            self.waveft_spectrum[adapter_name] = nn.Parameter(spectrum.to(device=weight.device, dtype=dtype))
        self.set_adapter(self._active_adapter or [adapter_name])

    # ------------------------------------------------------------------ the update
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW`` in the base weight's layout: ``(out, in)``, or ``(in, out)`` for ``Conv1D``."""
        spectrum = self.waveft_spectrum[adapter_name]
        family = self.waveft_wavelet_family[adapter_name] if self.waveft_use_idwt[adapter_name] else None
        delta = waveft_delta(spectrum, self.waveft_indices[adapter_name].to(spectrum.device),
                             (self.out_features, self.in_features), self.waveft_scaling[adapter_name], family)
        return delta.t() if self.kind == HF_CONV1D else delta

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """On ``nn.Linear`` only, as the reference."""
        return self.kind == LINEAR

    # ------------------------------------------------------------------ forward
    def apply_update(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``x ΔWᵀ``: ``x: (..., in) -> (..., out)`` in the spectrum's dtype, without forming ``ΔW``."""
        spectrum = self.waveft_spectrum[adapter_name]
        return waveft_apply(x, spectrum, self._plan_on(adapter_name, spectrum.device),
                            self.waveft_scaling[adapter_name])

    def _plan_on(self, adapter_name: str, device: torch.device) -> WavePlan:
        """The adapter's :class:`WavePlan` with its indices on ``device`` (plain dicts do not follow ``.to()``)."""
        plan = self.wave_plan[adapter_name]
        if plan.rows.device != device:
            plan = self.wave_plan[adapter_name] = plan.to(device)
        return plan

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in) -> (..., out)``: ``base(x) + Σ_a x ΔW_aᵀ`` over the forward adapters."""
        return self.forward_adding(x, self._add_update, False, *args, **kwargs)

    def _add_update(self, result: torch.Tensor, name: str, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        """``result + x ΔWᵀ`` of adapter ``name`` (out of place)."""
        return result + self.apply_update(name, x).to(result.dtype)
