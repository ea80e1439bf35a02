"""C3A layers: a block-circulant ``ΔW`` on ``nn.Linear``, applied through real FFTs of the activations.

Shapes (as the reference saves them): ``c3a_kernel: (out / b, in / b, b)`` float32 whatever the base dtype (the
reference's choice: FFTs want float32), ``b = block_size``. The update is ``x ΔWᵀ`` with
``ΔW[m b + k, n b + j] = c3a_kernel[m, n, (j - k) mod b] / in`` (``circulant.py``); forward never forms ``ΔW``,
merging forms it once by a gather. Several active adapters each add their update of the layer's input (the
reference feeds the first adapter's update into the second: see the README).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...injection.apply import defer_init, skip_random_init
from ...layers.base import AdapterLayer
from ...layers.dispatch import inplace_safe
from ...ops.lowrank import can_update_inplace
from .circulant import circulant_apply, circulant_delta

#: the kernel's dtype (the reference's, for every base dtype)
KERNEL_DTYPE = torch.float32


def init_kernel_(kernel: torch.Tensor, init_weights: bool | str, in_features: int, out_features: int) -> None:
    """Fill ``kernel`` in place as the reference: True: zeros; ``"gaussian"``: ``N(0, 1)``; ``"kaiming_uniform"``:
    ``U(±sqrt(1 / in))``; ``"xavier_uniform"`` or False: ``U(±sqrt(6 / (in + out)))``."""
    with torch.no_grad():
        if init_weights is True:
            kernel.zero_()
        elif init_weights == "gaussian":
            kernel.normal_()
        elif init_weights == "kaiming_uniform":
            bound = math.sqrt(1.0 / in_features)
            kernel.uniform_(-bound, bound)
        else:  # "xavier_uniform" or False (validated by C3AConfig)
            bound = math.sqrt(3.0) * math.sqrt(2.0 / (in_features + out_features))
            kernel.uniform_(-bound, bound)


class C3ALayer(AdapterLayer):
    """C3A on ``nn.Linear`` (the reference's ``C3ALinear``): ``y = base(x) + Σ_a x ΔW_aᵀ``."""

    adapter_layer_names = ("c3a_kernel",)
    other_param_names = ("block_size",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.c3a_kernel = nn.ParameterDict({})
        self.block_size: dict[str, int] = {}
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features
        self._inplace = inplace_safe(base)

    def update_layer(self, adapter_name: str, block_size: int, init_weights: bool | str) -> None:
        """Create adapter ``adapter_name``: ``c3a_kernel: (out / b, in / b, b)`` float32, initialised by
        :func:`init_kernel_` (the caller checked that ``b`` divides ``in`` and ``out``)."""
        device = self.get_base_layer().weight.device
        shape = (self.out_features // block_size, self.in_features // block_size, block_size)
        if skip_random_init():  # a load fills it: never draw it
            kernel = nn.Parameter(torch.empty(shape, device="meta", dtype=KERNEL_DTYPE))
            defer_init([kernel], device)
        else:
            values = torch.empty(shape, dtype=KERNEL_DTYPE)  # drawn on the CPU: the same numbers on every device
            init_kernel_(values, init_weights, self.in_features, self.out_features)
            kernel = nn.Parameter(values.to(device))
        self.c3a_kernel[adapter_name] = kernel
        self.block_size[adapter_name] = block_size
        self.set_adapter(self._active_adapter or [adapter_name])

    # ------------------------------------------------------------------ the update
    def delta_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``x ΔWᵀ``: ``x: (..., in) -> (..., out)`` in float32, through real FFTs of ``x``."""
        return circulant_apply(x, self.c3a_kernel[adapter_name], 1.0 / self.in_features)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW: (out, in)`` in the base weight's dtype (computed in float32, as the reference)."""
        kernel = self.c3a_kernel[adapter_name]
        return circulant_delta(kernel.to(KERNEL_DTYPE), 1.0 / self.in_features).to(self.get_base_layer().weight.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """``W + ΔW`` on a linear weight: convertible, as the reference says."""
        return True

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in) -> (..., out)``: ``base(x) + Σ_a x ΔW_aᵀ`` over the forward adapters, each update added
        into the base output in place when autograd allows it (the base matmul does not keep its output)."""
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self._row_adapters is not None:
            return self.mixed_add(x, result, self.delta_output)
        for name in self._forward_adapters:
            update = self.delta_output(name, x).to(result.dtype)
            if self._inplace and not torch.compiler.is_compiling() and can_update_inplace(result, update.dtype):
                result.add_(update)
            else:
                result = result + update
        return result
