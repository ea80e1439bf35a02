"""RandLoRA layers: per-layer trainable scalings of random full-rank bases shared by the whole model.

Shapes for ``W: (out, in)``, ``m = min(in, out)``, ``M = max(in, out)``, ``nb = ceil(m / r)``: per adapter
``randlora_lambda: (r, nb)`` and ``randlora_gamma: (nb, m)``; the shared :class:`RandLoraBases` (one object per
distinct basis spec, referenced by every layer) give ``A = randlora_A[:, 0, :m]: (r, m)`` and
``B = randlora_B[:M, :nb, :]`` seen as ``(M, nb * r)`` (a strided view, never copied). The update is
``ΔW = (alpha / r) * B Af`` (``in == m``) or its transpose, ``Af`` as in :mod:`peftkit.ops.randlora`. With at least
``J = r * nb`` rows the forward is one product with the folded ``W + ΔW`` (``ops.randlora.randlora_linear``: fewer
flops than the base product plus the reference's two adapter products, nothing kept but ``x``); with fewer rows it
adds ``x ΔW^T`` into the base output in place through two low-rank products, never keeping ``Af``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...layers.dispatch import inplace_safe
from ...layers.quant_merge import AdditiveQuantizedMerge
from ...ops.randlora import (
    add_randlora_,
    folding_pays,
    randlora_linear,
    randlora_update_reference,
    scaled_basis,
)
from ...quantization import backend_of, dense_weight
from .bases import RandLoraBases


class RandLoraLayer(AdditiveQuantizedMerge):
    """RandLoRA on ``nn.Linear`` / transformers ``Conv1D``: ``y = base(x) + (alpha / r) * x ΔW^T``."""

    adapter_layer_names = ("randlora_lambda", "randlora_gamma")
    other_param_names = ("randlora_dropout", "r", "scaling", "randlora_bases")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        backend = backend_of(base)  # bitsandbytes / torchao linears: merged through peftkit.quantization
        self.quantization_backend = None if backend is None else backend.name
        # nn.Linear: weight (out, in); GPT-2 Conv1D: (in, out); a quantized weight is packed: the layer's own sizes
        stored = (base.out_features, base.in_features) if backend is not None else tuple(base.weight.shape)
        self.out_features, self.in_features = stored[::-1] if fan_in_fan_out else stored
        self.fan_in_fan_out = fan_in_fan_out
        self.randlora_lambda = nn.ParameterDict({})
        self.randlora_gamma = nn.ParameterDict({})
        self.randlora_dropout = nn.ModuleDict({})
        self.randlora_bases = nn.ModuleDict({})  # adapter -> shared RandLoraBases, bound once all layers exist
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self._inplace = inplace_safe(self.get_base_layer())

    @property
    def min_dim(self) -> int:
        return min(self.in_features, self.out_features)

    @property
    def num_bases(self) -> int:
        """``nb = ceil(min(in, out) / r)`` of the first adapter (the reference's attribute)."""
        return next(iter(self.randlora_lambda.values())).shape[1] if len(self.randlora_lambda) else 0

    def update_layer(self, adapter_name: str, r: int, alpha: float, dropout: float, init_weights: bool,
                     dtype: torch.dtype | None = None) -> None:
        """Create adapter ``adapter_name``: ``lambda = 0`` (identity) and ``gamma = 1 / max(in, out)`` when
        ``init_weights``, else the reference's ``lambda ~ N(0, 1)`` (``gamma`` the same)."""
        device = self.get_base_layer().weight.device
        nb = math.ceil(self.min_dim / r)
        lam = torch.zeros(r, nb, dtype=dtype, device=device) if init_weights else torch.randn(r, nb).to(device, dtype)
        gamma = torch.full((nb, self.min_dim), 1 / max(self.in_features, self.out_features), dtype=dtype,
                           device=device)
        self.randlora_lambda[adapter_name] = nn.Parameter(lam)
        self.randlora_gamma[adapter_name] = nn.Parameter(gamma)
        self.randlora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.scaling[adapter_name] = alpha / r
        self._refresh()

    # ------------------------------------------------------------------ the shared bases
    def bind_bases(self, adapter_name: str, bases: RandLoraBases) -> None:
        """Reference the model's shared ``bases`` for ``adapter_name`` (registered here, stored once)."""
        self.randlora_bases[adapter_name] = bases

    def sliced_bases(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A: (r, m), B: (M, nb * r))``: strided views of the shared bases for this layer (never copied)."""
        if adapter_name not in self.randlora_bases:
            raise RuntimeError(f"RandLoRA layer has no shared bases bound for adapter {adapter_name!r} (the adapter "
                               "was not injected by peftkit)")
        bases = self.randlora_bases[adapter_name]
        r, nb = self.randlora_lambda[adapter_name].shape
        big = bases.randlora_B  # (max_dim, NB, r): the first nb * r entries of each row are contiguous
        b = big.view(big.shape[0], -1)[: max(self.in_features, self.out_features), : nb * r]
        return bases.randlora_A[:, 0, : self.min_dim], b

    def adapter_state(self, adapter_name: str) -> dict[str, tuple[str, torch.Tensor]]:
        """The trainable tensors plus, with ``save_projection``, the shared bases under this layer's
        ``randlora_A`` / ``randlora_B`` (the reference's file holds a copy per layer; in memory they exist once)."""
        state = super().adapter_state(adapter_name)
        bases = self.randlora_bases[adapter_name] if adapter_name in self.randlora_bases else None  # noqa: SIM401 (nn.ModuleDict has no .get)
        if bases is not None and bases.save_projection and adapter_name in self.randlora_lambda:
            for name in ("randlora_A", "randlora_B"):
                state[name] = (f"randlora_bases.{adapter_name}.{name}", getattr(bases, name))
        return state

    # ------------------------------------------------------------------ forward
    def _delta(self, name: str, x: torch.Tensor, result: torch.Tensor, fast: bool) -> torch.Tensor:
        """``result`` plus adapter ``name``'s ``x ΔW^T`` (in place when ``fast`` and allowed)."""
        a, b = self.sliced_bases(name)
        h, lam, gamma = self.randlora_dropout[name](x), self.randlora_lambda[name], self.randlora_gamma[name]
        in_is_min = self.in_features == self.min_dim
        if fast:
            return add_randlora_(result, h, a, b, lam, gamma, self.scaling[name], in_is_min)
        return randlora_update_reference(result, h, a, b, lam, gamma, self.scaling[name], in_is_min)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in) -> (..., out)``: the base output plus each forward adapter's scaled ``x ΔW^T``."""
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        fast = self._inplace and not torch.compiler.is_compiling()
        if fast and not args and not kwargs and self._row_adapters is None and len(self._forward_adapters) == 1:
            folded = self._folded_forward(self._forward_adapters[0], x)
            if folded is not None:
                return folded
        result = self.base_layer(x, *args, **kwargs)
        if self._row_adapters is not None:
            return self.mixed_add(x, result, lambda name, xs: self._delta(
                name, xs, torch.zeros((), dtype=self.randlora_lambda[name].dtype, device=xs.device), False))
        for name in self._forward_adapters:
            result = self._delta(name, x, result, fast)
        return result

    def _folded_forward(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """``x (W + ΔW)^T + bias`` in one product (``ops.randlora.randlora_linear``) when that is valid (no dropout
        in effect, one dtype, a frozen base weight) and cheaper (at least ``J`` rows); else None."""
        lam, dropout = self.randlora_lambda[name], self.randlora_dropout[name]
        base = self.get_base_layer()
        weight = base.weight
        if (weight.requires_grad or not (x.dtype == weight.dtype == lam.dtype) or x.dim() == 0
                or not folding_pays(x.numel() // max(x.shape[-1], 1), lam)
                or not (isinstance(dropout, nn.Identity) or not dropout.training)):
            return None
        a, b = self.sliced_bases(name)
        w = weight.t() if self.fan_in_fan_out else weight
        return randlora_linear(x, w, base.bias, a, b, lam, self.randlora_gamma[name], self.scaling[name],
                               self.in_features == self.min_dim)

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW: (out, in)`` (``(in, out)`` for ``Conv1D``) in the base weight's dtype (float32 for a quantized
        base); half precision on CPU is computed in float32, as the reference."""
        weight = dense_weight(self.get_base_layer())
        lam, gamma = self.randlora_lambda[adapter_name], self.randlora_gamma[adapter_name]
        with torch.no_grad():
            a, b = self.sliced_bases(adapter_name)
            dtype = torch.float32 if weight.device.type == "cpu" and lam.dtype in (torch.float16, torch.bfloat16) \
                else lam.dtype
            delta = (b.to(dtype) @ scaled_basis(a.to(dtype), lam.to(dtype), gamma.to(dtype))) * self.scaling[
                adapter_name]  # (M, m)
            # (M, m) is (out, in) when in == m; the base stores (in, out) for Conv1D: one transpose when exactly
            # one of the two holds
            if (self.in_features != self.min_dim) != self.fan_in_fan_out:
                delta = delta.t()
        return delta.to(weight.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def extra_repr(self) -> str:
        bases = {name: int(lam.shape[1]) for name, lam in self.randlora_lambda.items()}
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, bases={bases}"
