"""OSF layers: the low singular part of a linear weight is trained, orthogonally to its frozen top part.

Shapes for ``W: (out, in)``, ``m = min(out, in)``, ``k = effective_rank``, ``l = m − k``: trained
``osf_svd_params[name]`` = ``{U_low: (out, l), S_low: (l,), V_low: (l, in)}`` (saved); frozen, rebuilt from ``W``:
``_osf_U_low_init``, ``_osf_S_low_init``, ``_osf_V_low_init`` (the initial values) and ``_osf_U_high: (out, k)`` /
``_osf_V_high: (k, in)`` when the orthogonal complement needs them (below).

Forward: ``y = W x + (U_low (S_low ⊙ V_low x) − U₀ (S₀ ⊙ V₀ x))`` — four skinny matmuls, the difference added into
the base output; no ``(out, in)`` matrix and no concatenated factor is built per call.

Gradient projection: the gradient reaching ``U_low`` is projected onto the complement of ``span(U_high)``, the one
reaching ``V_low`` onto the complement of the row space of ``V_high``. When ``U`` is square (``out <= in``) that
complement is ``span(U₀)`` (``I − U_high U_highᵀ = U₀ U₀ᵀ``) and ``U_high`` is not stored; likewise for ``V`` when
``out >= in``. The projection is applied where the factors are used (an autograd function), so it survives any
replacement of the parameter objects and ``torch.compile``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...injection.apply import is_probing
from ...layers.base import AdapterLayer
from ...layers.buffers import FrozenBuffers
from ...layers.dispatch import LINEAR, inplace_safe, require_kind
from ...ops.lowrank import can_update_inplace
from .config import OSFConfig
from .utils import decompose_weight_matrix


# ---------------------------------------------------------------------------------------------- projection
class _ProjectGrad(torch.autograd.Function):
    """Identity forward; backward projects the gradient of ``factor`` (``left``: ``(out, l)``, columns; else
    ``(l, in)``, rows) onto ``span(basis)`` (``keep``) or onto its orthogonal complement."""

    @staticmethod
    def forward(ctx: Any, factor: torch.Tensor, basis: torch.Tensor, left: bool, keep: bool) -> torch.Tensor:
        ctx.save_for_backward(basis)
        ctx.left, ctx.keep = left, keep
        return factor.view_as(factor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (basis,) = ctx.saved_tensors
        basis = basis.to(grad.dtype)
        proj = basis @ (basis.t() @ grad) if ctx.left else (grad @ basis.t()) @ basis
        return (proj if ctx.keep else grad - proj), None, None, None


def project_grad_reference(grad: torch.Tensor, basis: torch.Tensor, left: bool, keep: bool) -> torch.Tensor:
    """Plain reference of :class:`_ProjectGrad`'s backward with explicit projection matrices."""
    P = basis @ basis.t() if left else basis.t() @ basis
    eye = torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
    P = P if keep else eye - P
    return P @ grad if left else grad @ P


# ---------------------------------------------------------------------------------------------- the layer
class OSFLayer(AdapterLayer):
    """OSF on ``nn.Linear`` (reference attribute names: ``osf_svd_params``, ``_osf_*_init``, ``_osf_U/V_high``)."""

    adapter_layer_names = ("osf_svd_params",)
    other_param_names = ("_osf_U_low_init", "_osf_S_low_init", "_osf_V_low_init", "_osf_U_high", "_osf_V_high",
                         "effective_rank")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.osf_svd_params = nn.ModuleDict()
        for attr in self.other_param_names[:-1]:
            setattr(self, attr, FrozenBuffers())
        self.effective_rank: dict[str, int] = {}
        base = self.get_base_layer()
        self.out_features, self.in_features = base.weight.shape
        self._inplace = inplace_safe(base)

    def update_layer(self, adapter_name: str, effective_rank: int, config: OSFConfig, dtype: torch.dtype | None
                     ) -> None:
        """Create adapter ``adapter_name`` from the SVD of the base weight split at ``effective_rank``; the trained
        factors start at their SVD values (identity) or, with ``init_weights=False``, at ``N(0, 1)`` draws."""
        weight = self.get_base_layer().weight
        self.effective_rank[adapter_name] = effective_rank
        if is_probing() or weight.is_meta:
            svd = _meta_split(self.out_features, self.in_features, effective_rank, weight.dtype)
        else:
            with torch.no_grad():
                svd = decompose_weight_matrix(weight, effective_rank)
        for part in ("U", "S", "V"):
            getattr(self, f"_osf_{part}_low_init")[adapter_name] = svd[f"{part}_low"].detach().clone()
        if self.out_features > self.in_features:  # U not square: its complement is not span(U_low_init)
            self._osf_U_high[adapter_name] = svd["U_high"]
        if self.out_features < self.in_features:
            self._osf_V_high[adapter_name] = svd["V_high"]
        params = {}
        for part in ("U_low", "S_low", "V_low"):
            value = svd[part].detach()
            if config.init_weights is False and not value.is_meta:
                value = torch.randn_like(value)
            params[part] = nn.Parameter(value.to(dtype=dtype or value.dtype))
        self.osf_svd_params[adapter_name] = nn.ParameterDict(params)
        self.set_adapter(self._active_adapter or [adapter_name])

    # ------------------------------------------------------------------ math
    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The trained ``U_low: (out, l)``, ``S_low: (l,)``, ``V_low: (l, in)``, with their gradients projected."""
        params = self.osf_svd_params[name]
        U, S, V = params["U_low"], params["S_low"], params["V_low"]
        if torch.is_grad_enabled() and (U.requires_grad or V.requires_grad):
            u_high = name in self._osf_U_high
            v_high = name in self._osf_V_high
            U = _ProjectGrad.apply(U, self._osf_U_high[name] if u_high else self._osf_U_low_init[name], True,
                                   not u_high)
            V = _ProjectGrad.apply(V, self._osf_V_high[name] if v_high else self._osf_V_low_init[name], False,
                                   not v_high)
        return U, S, V

    def _initial(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The frozen initial ``U₀, S₀, V₀`` in ``dtype``."""
        return (self._osf_U_low_init[name].to(dtype), self._osf_S_low_init[name].to(dtype),
                self._osf_V_low_init[name].to(dtype))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = U_low diag(S_low) V_low − U₀ diag(S₀) V₀: (out, in)`` in the base weight's dtype."""
        U, S, V = self._factors(adapter_name)
        U0, S0, V0 = self._initial(adapter_name, U.dtype)
        delta = (U * S[None, :]) @ V - (U0 * S0[None, :]) @ V0
        return delta.to(self.get_base_layer().weight.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """``W + ΔW`` on a linear weight: expressible as a LoRA."""
        return True

    # ------------------------------------------------------------------ forward
    def _add(self, result: torch.Tensor, name: str, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        """``result + (U_low (S_low ⊙ V_low x) − U₀ (S₀ ⊙ V₀ x))`` (``x: (..., in)``, ``result: (..., out)``)."""
        U, S, V = self._factors(name)
        U0, S0, V0 = self._initial(name, U.dtype)
        x = x.to(U.dtype)
        current = F.linear(x, V) * S  # (..., l)
        initial = F.linear(x, V0) * S0  # (..., l)
        delta = F.linear(current, U)  # (..., out)
        delta.sub_(F.linear(initial, U0))  # the same kernel on the same data at init: exactly zero there
        if inplace and can_update_inplace(result, U):
            return result.add_(delta)
        return (result + delta).to(result.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in) -> (..., out)``; several active adapters add their updates."""
        return self.forward_adding(x, self._add, self._inplace, *args, **kwargs)


def _meta_split(out: int, inp: int, k: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Meta tensors of :func:`decompose_weight_matrix`'s shapes (a load probing shapes runs no SVD)."""
    m = min(out, inp)
    k = min(k, m)
    shapes = {"U_high": (out, k), "S_high": (k,), "V_high": (k, inp), "U_low": (out, m - k), "S_low": (m - k,),
              "V_low": (m - k, inp)}
    return {key: torch.empty(shape, device="meta", dtype=dtype) for key, shape in shapes.items()}


# ---------------------------------------------------------------------------------------------- registry hooks
def resolve_rank(value: float | None, min_dim: int) -> int:
    """The reference's rule: None -> ``min_dim // 2``; a float in (0, 1] -> ``int(min_dim · value)``; else
    ``int(value)``; clipped to ``[0, min_dim]``."""
    if value is None:
        return max(min_dim // 2, 0)
    rank = int(min_dim * value) if isinstance(value, float) and 0 < value <= 1 else int(value)
    return max(min(min_dim, rank), 0)


def layer_options(name: str, module: nn.Module, config: Any) -> dict[str, Any]:
    """Per-layer facts: the frozen rank after ``rank_pattern`` (first key found in ``name``, ``re.search``)."""
    assert isinstance(config, OSFConfig)
    base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
    require_kind(name, module, (LINEAR,), "OSF")
    field, value = "effective_rank", config.effective_rank
    for pattern, rank in (config.rank_pattern or {}).items():
        if re.search(pattern, name):
            field, value = f"rank_pattern[{pattern!r}]", rank
            break
    min_dim = min(base.weight.shape)
    rank = resolve_rank(value, min_dim)
    if rank <= 0:
        raise ConfigError(field, value, f"target {name!r} has min(out, in) = {min_dim}, so this keeps {rank} singular "
                          "directions; allowed: a value that keeps at least one")
    return {"kind": LINEAR, "effective_rank": rank}


def create_layer(module: nn.Module, options: dict[str, Any], config: Any, adapter_name: str,
                 dtype: torch.dtype) -> OSFLayer:
    """Wrap ``module`` (or reuse its OSF layer) and add adapter ``adapter_name``."""
    layer = module if isinstance(module, OSFLayer) else OSFLayer(module)
    layer.update_layer(adapter_name, options["effective_rank"], config, dtype)
    return layer
