"""HiRA layers: ``ΔW = W0 ⊙ P`` with the low-rank ``P = B A``, on every module kind the reference adapts.

Shapes (as saved by the reference), for a base weight ``W0``:

- ``nn.Linear`` / quantized linear ``W0: (out, in)``: ``hira_A: (r, in)``, ``hira_B: (out, r)``, ``P = B A``.
- transformers ``Conv1D`` ``W0: (in, out)``: the same factors, ``P = (B A)ᵀ`` (``fan_in_fan_out``).
- ``nn.Embedding`` ``W0: (num, dim)``: ``hira_embedding_A: (r, num)``, ``hira_embedding_B: (dim, r)``,
  ``P = (B A)ᵀ``.
- ``nn.Conv{1,2,3}d`` ``W0: (out, in, *k)``: ``hira_A: (r, in, *k)``, ``hira_B: (out, r, 1, ...)``,
  ``P[o, i, *k] = Σ_j B[o, j] A[j, i, *k]``.

Forward: ``y = base(x) + op(dropout(x), W0 ⊙ P)`` summed over the active adapters. A single adapter without dropout
on an exact ``nn.Linear`` / ``Conv1D`` runs base and update as one product ``x (W0 ⊙ (1 + P))ᵀ + b``
(``hadamard.HadamardLinear``: no dense weight kept for backward); embeddings gather rows, ``W0[x] ⊙ (Aᵀ[x] Bᵀ)``,
instead of building the ``(num, dim)`` weight. Merging adds ``W0 ⊙ P`` per adapter, with ``W0`` the weight before
the first merge (kept on the CPU, as the reference); unmerging restores ``W0`` exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import MergeError
from ...injection.apply import defer_init, skip_random_init
from ...layers.base import AdapterLayer
from ...layers.dispatch import CONV, EMBEDDING, HF_CONV1D, inplace_safe
from ...quantization import backend_of, dense_weight, measured_requantization, write_dense_weight
from .config import is_gaussian
from .hadamard import hadamard_linear


class HiraLayer(AdapterLayer):
    """HiRA adapters on one base layer of kind ``kind`` (``layers.dispatch`` kinds; see the module docstring)."""

    adapter_layer_names = ("hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B")
    other_param_names = ("r", "hira_dropout")

    def __init__(self, base_layer: nn.Module, kind: str) -> None:
        super().__init__(base_layer)
        self.hira_A = nn.ParameterDict({})
        self.hira_B = nn.ParameterDict({})
        self.hira_embedding_A = nn.ParameterDict({})
        self.hira_embedding_B = nn.ParameterDict({})
        self.hira_dropout = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.kind = kind
        self.fan_in_fan_out = kind == HF_CONV1D
        base = self.get_base_layer()
        if kind == EMBEDDING:
            self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
        elif kind == CONV:
            self.in_features, self.out_features = base.in_channels, base.out_channels
        elif kind == HF_CONV1D:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        backend = backend_of(base)
        self.quantization_backend = None if backend is None else backend.name
        self._base_weight_before_merge: torch.Tensor | None = None  # W0 while adapters are merged (CPU)

    # ------------------------------------------------------------------ creation
    def _factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(shape of A, shape of B)`` of a rank-``r`` adapter on this layer."""
        if self.kind == CONV:
            weight = self.get_base_layer().weight
            spatial = weight.shape[2:]
            return (r, self.in_features, *spatial), (self.out_features, r, *([1] * len(spatial)))
        return (r, self.in_features), (self.out_features, r)

    def _init_factors(self, a: torch.Tensor, b: torch.Tensor, init_weights: bool | str | None, r: int) -> None:
        """The reference's initialisation (see ``HiraConfig``), in place on float32 CPU tensors."""
        if self.kind == EMBEDDING:
            if init_weights is False:
                a.normal_(), b.normal_()
            else:
                a.zero_(), b.normal_()
        elif not init_weights:
            a.normal_(), b.normal_()
        else:
            if is_gaussian(init_weights) and self.kind != CONV:
                nn.init.normal_(a, std=1 / r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            b.zero_()

    def update_layer(self, adapter_name: str, r: int, init_weights: bool | str | None, dropout: float,
                     dtype: torch.dtype | None = None) -> None:
        """Create adapter ``adapter_name`` of rank ``r`` (identity at init unless ``init_weights`` is False /
        None on linear and conv layers)."""
        shape_a, shape_b = self._factor_shapes(r)
        weight = self.get_base_layer().weight
        dtype = dtype or (weight.dtype if weight.dtype.is_floating_point else torch.float32)
        holders = self._holders()
        self.r[adapter_name] = r
        self.hira_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if skip_random_init():  # a load fills them: never allocate or draw them
            for holder, shape in zip(holders, (shape_a, shape_b)):
                holder[adapter_name] = nn.Parameter(torch.empty(shape, device="meta", dtype=dtype))
            defer_init([h[adapter_name] for h in holders], weight.device)
        else:
            a, b = torch.empty(shape_a), torch.empty(shape_b)
            self._init_factors(a, b, init_weights, r)
            for holder, tensor in zip(holders, (a, b)):
                holder[adapter_name] = nn.Parameter(tensor.to(device=weight.device, dtype=dtype))
        self.set_adapter(self._active_adapter or [adapter_name])

    def resize_adapter(self, adapter_name: str, r: int) -> None:
        """Give adapter ``adapter_name`` rank ``r``: zero factors of the new shapes, for a load to fill (a file whose
        ranks differ from the config's ``rank_pattern``: the reference ignores that field, see ``convert_checkpoint``).
        """
        shapes = self._factor_shapes(r)
        for holder, shape in zip(self._holders(), shapes):
            old = holder[adapter_name]
            holder[adapter_name] = nn.Parameter(torch.zeros(shape, dtype=old.dtype, device=old.device),
                                                requires_grad=old.requires_grad)
        self.r[adapter_name] = r

    def _holders(self) -> tuple[nn.ParameterDict, nn.ParameterDict]:
        """The ``(A, B)`` containers of this layer's kind."""
        if self.kind == EMBEDDING:
            return self.hira_embedding_A, self.hira_embedding_B
        return self.hira_A, self.hira_B

    # ------------------------------------------------------------------ the update
    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of adapter ``name`` (the embedding or the linear/conv factors)."""
        holder_a, holder_b = self._holders()
        return holder_a[name], holder_b[name]

    def hira_product(self, name: str) -> torch.Tensor:
        """``P`` of adapter ``name`` in the base weight's layout (differentiable; the reference's
        ``get_delta_weight``)."""
        a, b = self.factors(name)
        if self.kind == CONV:
            return (b.flatten(1) @ a.flatten(1)).view(self.out_features, *a.shape[1:])
        product = b @ a
        return product.t() if self.kind in (EMBEDDING, HF_CONV1D) else product

    def _dense_base_weight(self) -> torch.Tensor:
        """The base weight in its own layout (dequantized, float32, for quantized linears)."""
        base = self.get_base_layer()
        return base.weight if self.quantization_backend is None else dense_weight(base)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Additive form of the update, ``W0 ⊙ P`` (the base weight's layout and dtype; float32 when quantized),
        with ``W0`` the weight before any merge."""
        with torch.no_grad():
            w0 = self._origin_weight()
            return (w0.to(self.factors(adapter_name)[0].dtype) * self.hira_product(adapter_name)).to(w0.dtype)

    # ------------------------------------------------------------------ forward
    def _linear_weight(self) -> torch.Tensor:
        """The base weight as ``(out, in)`` (a view for ``Conv1D``)."""
        weight = self._dense_base_weight()
        return weight.t() if self.fan_in_fan_out else weight

    def _update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The output of adapter ``name`` alone, ``op(dropout(x), W0 ⊙ P)``, in the factors' dtype."""
        a, b = self.factors(name)
        if self.kind == EMBEDDING:  # rows of W0 ⊙ (B A)ᵀ: W0[x] ⊙ (Aᵀ[x] Bᵀ), no (num, dim) weight
            rows = F.embedding(x, self.get_base_layer().weight).to(a.dtype)
            return rows * (F.embedding(x, a.t()) @ b.t())
        x = self.hira_dropout[name](x.to(a.dtype))
        if self.kind == CONV:
            base = self.get_base_layer()
            return base._conv_forward(x, base.weight.to(a.dtype) * self.hira_product(name), None)
        return hadamard_linear(x, self._linear_weight(), None, a, b, 0.0)

    def _fused(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """Base and the one active adapter as one product on an exact ``nn.Linear`` / ``Conv1D`` (not another
        method's layer, in a mixed model) without dropout (``x (W0 ⊙ (1 + B A))ᵀ + b``); None when that does not
        apply."""
        if len(self._forward_adapters) != 1 or args or kwargs or self.kind == EMBEDDING or self.kind == CONV:
            return None
        name = self._forward_adapters[0]
        base = self.get_base_layer()
        a, b = self.hira_A[name], self.hira_B[name]
        if not (self.base_layer is base and inplace_safe(base) and self.quantization_backend is None
                and isinstance(self.hira_dropout[name], nn.Identity) and x.dtype == base.weight.dtype == a.dtype):
            return None
        return hadamard_linear(x, self._linear_weight(), base.bias, a, b, 1.0)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in)`` (linear), ``(B, C_in, *spatial)`` (conv) or indices (embedding) -> the base output plus
        each active adapter's update, in the base output's dtype."""
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        if self._row_adapters is not None:
            return self.mixed_add(x, self.base_layer(x, *args, **kwargs), self._update)
        if not self._forward_adapters:
            return self.base_layer(x, *args, **kwargs)
        fused = self._fused(x, args, kwargs)
        if fused is not None:
            return fused
        result = self.base_layer(x, *args, **kwargs)
        for name in self._forward_adapters:
            result = result + self._update(name, x).to(result.dtype)
        return result

    # ------------------------------------------------------------------ merging: W += W0 ⊙ P
    def _origin_weight(self) -> torch.Tensor:
        """``W0``: the base weight before the first merge (the current one when nothing is merged), in the layout
        and dtype of :meth:`_dense_base_weight`."""
        current = self._dense_base_weight().detach()
        if self._base_weight_before_merge is None:
            return current
        return self._base_weight_before_merge.to(device=current.device, dtype=current.dtype)

    def _merged_weight(self, name: str) -> torch.Tensor:
        """The current weight plus ``W0 ⊙ P`` of adapter ``name``, in the current weight's layout and dtype."""
        current = self._dense_base_weight().detach()
        dtype = self.factors(name)[0].dtype
        with torch.no_grad():
            return (current.to(dtype) + self._origin_weight().to(dtype) * self.hira_product(name)).to(current.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge ``adapter_names`` (default: the active adapters): each adds ``W0 ⊙ P`` to the weight. With
        ``safe_merge`` NaN/inf raise :class:`MergeError` before anything is written."""
        base = self.get_base_layer()
        for name in self._adapters_to_merge(adapter_names):
            new = self._merged_weight(name)
            if safe_merge and not torch.isfinite(new).all():
                raise MergeError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            if self._base_weight_before_merge is None:
                self._base_weight_before_merge = self._dense_base_weight().detach().to("cpu", copy=True)
            with measured_requantization(self, name, new):
                write_dense_weight(base, new)
                self.merged_adapters.append(name)
                self._refresh()
        self._refresh()

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        """Raise :class:`MergeError` if merging ``adapter_names`` would put NaN/inf into the base weight."""
        names = self._adapters_to_merge(adapter_names, warn=False)
        if not names:
            return
        with torch.no_grad():
            origin = self._origin_weight().float()
            new = self._dense_base_weight().detach().float() + origin * sum(
                self.hira_product(n).float() for n in names)
        if not torch.isfinite(new).all():
            raise MergeError(f"NaNs detected in the merged weights. The adapter {','.join(names)} seems to be broken")

    def unmerge(self) -> None:
        """Restore ``W0`` exactly (every merged adapter is unmerged at once, as the reference)."""
        if self._base_weight_before_merge is not None:
            write_dense_weight(self.get_base_layer(), self._origin_weight())
        self._base_weight_before_merge = None
        self.merged_adapters.clear()
        self._refresh()
