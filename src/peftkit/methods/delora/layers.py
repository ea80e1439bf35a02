"""DeLoRA layers: a low-rank update of normalised rank-1 components with a trained bound, on ``nn.Linear``.

Shapes (as saved by the reference): ``delora_A: (r, in)``, ``delora_B: (out, r)``, ``delora_lambda: (1,)`` (trained)
and the persistent buffer ``delora_w_norm: (in,)``, the column norms ``‖W_:,j‖`` of the base weight when the adapter
was created (frozen, saved). With ``s_i = λ / (r · max(‖A_i‖, 1e-4) · max(‖B^i‖, 1e-4))``:

    ``ΔW = B · diag(s) · A · diag(w_norm)``  and  ``y = base(x) + x ΔWᵀ``.

Forward: ``diag(s) · A · diag(w_norm)`` is formed as one ``(r, in)`` matrix (:meth:`DeloraLayer.scaled_A`), then
the update is two skinny matmuls added into the base output in place where autograd allows it. The reference
scales the activations instead (``x * w_norm``: an input-sized temporary that autograd keeps for backward) and
adds through an output-sized zero buffer; the results agree up to rounding.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...injection.apply import defer_init, is_probing, skip_random_init
from ...layers.base import AdapterLayer
from ...layers.dispatch import inplace_safe
from ...ops.lowrank import add_lowrank_, lowrank_update_reference
from ..lora.velora import BufferDict

#: lower clamp of the row norms of ``A`` and column norms of ``B`` (the reference's)
NORM_FLOOR = 1e-4


def delora_scaled_A(A: torch.Tensor, B: torch.Tensor, lam: torch.Tensor, r: int, w_norm: torch.Tensor
                    ) -> torch.Tensor:
    """``diag(s) · A · diag(w_norm): (r, in)`` with ``s_i = λ / (r · ‖A_i‖ · ‖B^i‖)`` (norms clamped at
    :data:`NORM_FLOOR`) for ``A: (r, in)``, ``B: (out, r)``, ``lam: (1,)``, ``w_norm: (in,)``; differentiable."""
    s = lam / r / (A.norm(dim=1).clamp(min=NORM_FLOOR) * B.norm(dim=0).clamp(min=NORM_FLOOR))  # (r,)
    return A * s[:, None] * w_norm


class DeloraLayer(AdapterLayer):
    """DeLoRA on ``nn.Linear`` (reference attribute names: ``delora_A``, ``delora_B``, ``delora_lambda``,
    ``delora_w_norm``, ``delora_dropout``, ``r``)."""

    adapter_layer_names = ("delora_A", "delora_B", "delora_lambda")
    other_param_names = ("r", "delora_dropout", "delora_w_norm")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.delora_A = nn.ParameterDict({})
        self.delora_B = nn.ParameterDict({})
        self.delora_lambda = nn.ParameterDict({})
        self.delora_dropout = nn.ModuleDict({})
        self.delora_w_norm = BufferDict()
        self.r: dict[str, int] = {}
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features
        self._inplace = inplace_safe(base)

    def update_layer(self, adapter_name: str, r: int, delora_lambda: float, module_dropout: float,
                     init_weights: bool, dtype: torch.dtype | None = None) -> None:
        """Create adapter ``adapter_name`` in ``dtype`` (default: the base weight's): ``A`` kaiming uniform,
        ``B`` zeros (``init_weights``) or kaiming uniform, ``λ = delora_lambda``, and the base weight's column
        norms (ones on a meta base, as the reference)."""
        weight = self.get_base_layer().weight
        dtype = dtype or weight.dtype
        self.r[adapter_name] = r
        self.delora_dropout[adapter_name] = nn.Dropout(module_dropout) if module_dropout > 0 else nn.Identity()
        deferred = skip_random_init()  # a load fills the tensors: never draw them
        device = "meta" if deferred else weight.device
        A = torch.empty(r, self.in_features, dtype=dtype, device=device)
        B = torch.empty(self.out_features, r, dtype=dtype, device=device)
        lam = torch.full((1,), float(delora_lambda), dtype=dtype, device=device)
        if not deferred:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            if init_weights:
                nn.init.zeros_(B)
            else:
                nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        self.delora_A[adapter_name] = nn.Parameter(A)
        self.delora_B[adapter_name] = nn.Parameter(B)
        self.delora_lambda[adapter_name] = nn.Parameter(lam)
        self.delora_w_norm[adapter_name] = self._column_norms(dtype)
        if deferred:
            defer_init(self.adapter_parameters(adapter_name), weight.device)
        self.set_adapter(self._active_adapter or [adapter_name])

    def _column_norms(self, dtype: torch.dtype) -> torch.Tensor:
        """``‖W_:,j‖: (in,)`` of the base weight (computed in float32, stored in ``dtype``)."""
        weight = self.get_base_layer().weight
        if is_probing():
            return torch.empty(self.in_features, dtype=dtype, device="meta")
        if weight.is_meta:
            return torch.ones(self.in_features, dtype=dtype, device=weight.device)
        with torch.no_grad():
            return torch.linalg.vector_norm(weight.detach().float(), dim=0).to(dtype)

    def adapter_state(self, adapter_name: str) -> dict[str, tuple[str, torch.Tensor]]:
        """As :meth:`AdapterLayer.adapter_state`, plus the frozen column norms (saved as ``delora_w_norm``)."""
        state = super().adapter_state(adapter_name)
        if adapter_name in self.delora_w_norm:
            state["delora_w_norm"] = (f"delora_w_norm.{adapter_name}", self.delora_w_norm[adapter_name])
        return state

    # ------------------------------------------------------------------ math
    def scaled_A(self, adapter_name: str) -> torch.Tensor:
        """``diag(s) · A · diag(w_norm): (r, in)`` of adapter ``adapter_name`` (see :func:`delora_scaled_A`)."""
        return delora_scaled_A(self.delora_A[adapter_name], self.delora_B[adapter_name],
                               self.delora_lambda[adapter_name], self.r[adapter_name],
                               self.delora_w_norm[adapter_name])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = B · diag(s) · A · diag(w_norm): (out, in)`` in the adapter's dtype."""
        return self.delora_B[adapter_name] @ self.scaled_A(adapter_name)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """``W + ΔW`` on a linear weight: expressible as a LoRA (the reference says yes too)."""
        return True

    def _update(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``dropout(x) ΔWᵀ: (..., out)`` for ``x: (..., in)``, in the adapter's dtype (mixed batches)."""
        A = self.scaled_A(adapter_name)
        x = self.delora_dropout[adapter_name](x.to(A.dtype))
        return F.linear(F.linear(x, A), self.delora_B[adapter_name])

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in) -> (..., out)``: the base output plus each forward adapter's update."""
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self._row_adapters is not None:
            return self.mixed_add(x, result, self._update)
        names = self._forward_adapters
        inplace = self._inplace and len(names) == 1 and not torch.compiler.is_compiling()
        for name in names:
            A = self.scaled_A(name)
            x_d = self.delora_dropout[name](x)
            if inplace:  # into the base output (falls back to out of place when autograd or dtypes forbid it)
                result = add_lowrank_(result, x_d, A, self.delora_B[name], 1.0)
            else:
                result = lowrank_update_reference(result, x_d, A, self.delora_B[name], 1.0)
        return result
