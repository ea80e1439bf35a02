"""GraLoRA layers: a block-wise low-rank update (``k x k`` blocks, each of rank ``r / k``) on ``nn.Linear`` and GPT-2
``Conv1D``, with an optional plain LoRA part (hybrid GraLoRA).

Shapes (as saved by the reference): ``gralora_A: (k, in / k, r)``, ``gralora_B: (k, r, out / k)``; with
``hybrid_r > 0`` the ``nn.Linear`` factors ``gralora_A_general.weight: (hybrid_r, in)`` and
``gralora_B_general.weight: (out, hybrid_r)`` (``nn.Identity`` placeholders without parameters otherwise, as the
reference). ``blocks.py`` has the math. The forward adds the update into the base output in place
(:func:`blocks.add_gralora_`); one dropout of the input feeds both parts (the reference draws a second, independent
mask for the hybrid part and keeps a second input-sized copy).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...injection.apply import defer_init, skip_random_init
from ...layers.base import AdapterLayer
from ...layers.dispatch import HF_CONV1D, inplace_safe, module_kind
from .blocks import add_gralora_, gralora_delta, gralora_update_reference


def _uniform(shape: tuple[int, ...], fan_in: int, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: the reference's ``kaiming_uniform_(a=sqrt(5))`` of a factor whose
    fan-in is ``fan_in``."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape, dtype=dtype).uniform_(-bound, bound).to(device)


class GraloraLayer(AdapterLayer):
    """GraLoRA on ``nn.Linear`` / transformers ``Conv1D``: ``y = base(x) + scaling · (x ΔW_blocksᵀ + x A_gᵀ B_gᵀ)``,
    ``scaling = alpha / (r + hybrid_r)``."""

    adapter_layer_names = ("gralora_A", "gralora_B", "gralora_A_general", "gralora_B_general")
    other_param_names = ("r", "hybrid_r", "alpha", "scaling", "gralora_dropout", "gralora_k")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.fan_in_fan_out = fan_in_fan_out
        self.kind = module_kind(base)
        if self.kind == HF_CONV1D:  # Conv1D weight: (in, out)
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        self.gralora_A = nn.ParameterDict({})
        self.gralora_B = nn.ParameterDict({})
        self.gralora_A_general = nn.ModuleDict({})
        self.gralora_B_general = nn.ModuleDict({})
        self.gralora_dropout = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.hybrid_r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.gralora_k: dict[str, int] = {}
        self._inplace = inplace_safe(base)

    def update_layer(self, adapter_name: str, r: int, hybrid_r: int, alpha: float, gralora_k: int,
                     gralora_dropout: float, init_weights: bool, dtype: torch.dtype | None = None) -> None:
        """Create adapter ``adapter_name``: ``A`` uniform with bound ``1/sqrt(fan_in)`` and ``B = 0`` (identity)
        when ``init_weights``, else ``B`` random too (the reference's testing init); in ``dtype`` (default: the base
        weight's). ``in`` and ``out`` must be divisible by ``gralora_k`` (checked when planning)."""
        weight = self.get_base_layer().weight
        dtype, device = dtype or weight.dtype, weight.device
        k, i, o = gralora_k, self.in_features // gralora_k, self.out_features // gralora_k
        shapes = {"A": (k, i, r), "B": (k, r, o), "Ag": (hybrid_r, self.in_features), "Bg": (self.out_features, hybrid_r)}
        if skip_random_init():  # a load fills them: never draw them
            values = {key: torch.empty(shape, dtype=dtype, device="meta") for key, shape in shapes.items()}
        else:
            fans = {"A": i, "B": r, "Ag": self.in_features, "Bg": hybrid_r}
            values = {key: _uniform(shape, max(fans[key], 1), dtype, device) for key, shape in shapes.items()}
            if init_weights:
                values["B"], values["Bg"] = values["B"].zero_(), values["Bg"].zero_()
        self.gralora_A[adapter_name] = nn.Parameter(values["A"])
        self.gralora_B[adapter_name] = nn.Parameter(values["B"])
        self.gralora_A_general[adapter_name] = _factor(values["Ag"]) if hybrid_r else nn.Identity()
        self.gralora_B_general[adapter_name] = _factor(values["Bg"]) if hybrid_r else nn.Identity()
        if skip_random_init():
            defer_init(self.adapter_parameters(adapter_name), device)
        self.gralora_dropout[adapter_name] = nn.Dropout(gralora_dropout) if gralora_dropout > 0 else nn.Identity()
        self.r[adapter_name], self.hybrid_r[adapter_name], self.gralora_k[adapter_name] = r, hybrid_r, gralora_k
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / (r + hybrid_r)
        self.set_adapter(self._active_adapter or [adapter_name])

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                  torch.Tensor | None]:
        """``(A: (k, in/k, r), B: (k, r, out/k), A_general: (h, in) or None, B_general: (out, h) or None)``."""
        if self.hybrid_r[adapter_name]:
            return (self.gralora_A[adapter_name], self.gralora_B[adapter_name],
                    self.gralora_A_general[adapter_name].weight, self.gralora_B_general[adapter_name].weight)
        return self.gralora_A[adapter_name], self.gralora_B[adapter_name], None, None

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in) -> (..., out)``: the base output plus each forward adapter's scaled update."""
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self._row_adapters is not None:
            return self.mixed_add(x, result, self.update)
        for name in self._forward_adapters:
            A, B, A_g, B_g = self.factors(name)
            h = self.gralora_dropout[name](x.to(A.dtype))
            if self._inplace:
                result = add_gralora_(result, h, A, B, self.scaling[name], A_g, B_g)
            else:
                result = result + gralora_update_reference(h, A, B, self.scaling[name], A_g, B_g).to(result.dtype)
        return result

    def update(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """The scaled update of ``adapter_name`` alone: ``x: (..., in) -> (..., out)`` in the adapter's dtype."""
        A, B, A_g, B_g = self.factors(adapter_name)
        h = self.gralora_dropout[adapter_name](x.to(A.dtype))
        return gralora_update_reference(h, A, B, self.scaling[adapter_name], A_g, B_g)

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW``: ``(out, in)``, transposed to ``(in, out)`` for ``Conv1D``; in the base weight's dtype (half
        precision on CPU is computed in float32, as the reference)."""
        weight = self.get_base_layer().weight
        A, B, A_g, B_g = self.factors(adapter_name)
        upcast = weight.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16)
        dtype = torch.float32 if upcast else A.dtype
        with torch.no_grad():
            delta = gralora_delta(A.to(dtype), B.to(dtype), self.scaling[adapter_name],
                                  *(None if f is None else f.to(dtype) for f in (A_g, B_g)))
        return (delta.t() if self.fan_in_fan_out else delta).to(weight.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {super().extra_repr()}"


def _factor(weight: torch.Tensor) -> nn.Linear:
    """A bias-free ``nn.Linear`` holding ``weight: (out, in)`` (no random init drawn and thrown away)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight)
    return layer
