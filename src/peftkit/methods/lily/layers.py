"""Lily layers on ``nn.Linear``.

Per adapter a layer holds ``lily_A: Linear(in -> r)`` (weight ``(r, in)``), ``lily_B: Linear(out -> num_B · r)``
(weight ``(num_B · r, out)``, read as ``num_B`` experts ``(r, out)``) and ``lily_router: Linear(r -> num_B)``, as
``nn.Linear`` modules in ``ModuleDict``s (the reference's layout and state-dict keys). After injection
:func:`share_across_layers` makes groups of layers hold the same ``lily_A`` / ``lily_B`` modules (one tensor object,
saved under every layer's key, as the reference).

Forward (``x: (..., in)``): ``h = A x: (..., r)``, ``p = mean over all rows of softmax(router h): (num_B,)``,
``y = base(x) + h (scaling · Σ_e p_e B_e)``: the experts are mixed first (an ``(r, out)`` matrix), so the batch
pays one ``(N, r) @ (r, out)`` product, fused with the addition of the base output.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import MergeError
from ...injection.apply import defer_init, skip_random_init
from ...layers.base import AdapterLayer
from .config import LilyConfig


class LilyMergeError(MergeError, NotImplementedError):
    """Lily adapters cannot be merged: the update depends on the batch (the reference raises
    ``NotImplementedError``)."""


def _linear(in_features: int, out_features: int, device: torch.device | str, dtype: torch.dtype) -> nn.Linear:
    """A bias-free ``nn.Linear`` whose weight is left uninitialised (the caller initialises it)."""
    return nn.utils.skip_init(nn.Linear, in_features, out_features, bias=False, device=device, dtype=dtype)


def mixed_experts(probs: torch.Tensor, experts: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling · Σ_e p_e B_e: (r, out)`` from router probabilities ``probs: (..., num_B)`` (averaged over every
    row) and ``experts: (num_B · r, out)``."""
    num_b = probs.shape[-1]
    weights = probs.reshape(-1, num_b).mean(dim=0) * scaling  # (num_B,)
    return (weights @ experts.view(num_b, -1)).view(-1, experts.shape[-1])


class LilyLayer(AdapterLayer):
    """Lily on an ``nn.Linear``."""

    adapter_layer_names = ("lily_A", "lily_B", "lily_router")
    other_param_names = ("r", "scaling", "stride_A", "num_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lily_A = nn.ModuleDict({})
        self.lily_B = nn.ModuleDict({})
        self.lily_router = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.stride_A: dict[str, int] = {}
        self.num_B: dict[str, int] = {}
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, config: LilyConfig, dtype: torch.dtype | None = None) -> None:
        """Create adapter ``adapter_name``: ``lily_A`` and the router Kaiming-uniform (as ``nn.Linear``), ``lily_B``
        zero (``init_weights=True``: identity at init) or Kaiming-uniform; float32 unless ``dtype``."""
        weight = self.get_base_layer().weight
        device, dtype = weight.device, dtype or torch.float32
        r, num_b = config.r, config.num_B
        where = "meta" if skip_random_init() else device  # a load fills them: no memory, no init until then
        self.lily_A[adapter_name] = _linear(self.in_features, r, where, dtype)
        self.lily_B[adapter_name] = _linear(self.out_features, num_b * r, where, dtype)
        self.lily_router[adapter_name] = _linear(r, num_b, where, dtype)
        if skip_random_init():
            defer_init(self.adapter_parameters(adapter_name), device)
        else:
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.lily_A[adapter_name].weight, a=math.sqrt(5))
                nn.init.kaiming_uniform_(self.lily_router[adapter_name].weight, a=math.sqrt(5))
                if config.init_weights:
                    nn.init.zeros_(self.lily_B[adapter_name].weight)
                else:
                    nn.init.kaiming_uniform_(self.lily_B[adapter_name].weight, a=math.sqrt(5))
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.scaling
        self.stride_A[adapter_name] = config.stride_A
        self.num_B[adapter_name] = num_b
        self.set_adapter(self._active_adapter or [adapter_name])

    # ------------------------------------------------------------------ merging
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise LilyMergeError("Lily adapters cannot be merged: the update depends on the batch (the router's average)")

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise LilyMergeError("Lily has no fixed delta weight: the update depends on the batch (the router's average)")

    # ------------------------------------------------------------------ forward
    def update(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result + scaling · (A x) Σ_e p_e B_e`` for ``x: (..., in)``, ``result: (..., out)`` (a new tensor)."""
        A = self.lily_A[adapter_name].weight  # (r, in)
        hidden = F.linear(x.to(A.dtype), A)  # (..., r)
        probs = torch.softmax(F.linear(hidden, self.lily_router[adapter_name].weight), dim=-1)  # (..., num_B)
        combined = mixed_experts(probs, self.lily_B[adapter_name].weight, self.scaling[adapter_name])  # (r, out)
        flat = hidden.reshape(-1, hidden.shape[-1])
        if result.dtype == combined.dtype:  # one fused product-and-add, no (..., out) temporary
            return torch.addmm(result.reshape(-1, result.shape[-1]), flat, combined).view(result.shape)
        return result + (flat @ combined).view(result.shape).to(result.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in) -> (..., out)``; several active adapters add their updates. In a mixed batch each
        adapter's router averages over that adapter's rows only."""
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self._row_adapters is not None:
            return self.mixed_add(x, result, lambda name, xs: self.update(
                name, xs, xs.new_zeros((*xs.shape[:-1], result.shape[-1]), dtype=result.dtype)))
        for name in self._forward_adapters:
            result = self.update(name, x, result)
        return result


def group_key(name: str, targets: Iterable[str] | str | None, shape: torch.Size) -> tuple[str, torch.Size]:
    """The sharing group of the adapted module ``name``: the target it matched and its weight shape.

    A str (regex) ``target_modules`` is one target; for a collection, the longest target that ``name`` ends with
    (the reference's comment; its code takes whichever matching target its set iterates last, which depends on the
    interpreter's hash seed when two targets match). Without targets, the module's last name component."""
    if isinstance(targets, str):
        return targets, shape
    matching = [t for t in (targets or ()) if name.endswith(t)]
    return (max(matching, key=len) if matching else name.rsplit(".", 1)[-1]), shape


def share_across_layers(named_layers: Sequence[tuple[str, LilyLayer]], targets: Iterable[str] | str | None,
                        adapter_name: str) -> None:
    """Make the layers of each group (:func:`group_key`, in model order) hold the first layer's ``lily_B`` and,
    for each run of ``stride_A`` consecutive layers, the run's first ``lily_A`` (the same module objects)."""
    groups: dict[tuple[str, torch.Size], list[LilyLayer]] = {}
    for name, layer in named_layers:
        if adapter_name in layer.lily_A:
            groups.setdefault(group_key(name, targets, layer.get_base_layer().weight.shape), []).append(layer)
    for layers in groups.values():
        stride = layers[0].stride_A[adapter_name]
        for i, layer in enumerate(layers):
            layer.lily_B[adapter_name] = layers[0].lily_B[adapter_name]
            layer.lily_A[adapter_name] = layers[(i // stride) * stride].lily_A[adapter_name]
