"""BOFT layers on ``nn.Linear`` and ``nn.Conv2d``: ``y = x (diag(s) W Rᵀ)ᵀ + b`` (see ``butterfly.py``).

The rotated weight ``W' = diag(s) W Rᵀ`` of the active adapters is built from index gathers and block products on
every forward and the base operation runs once with it (the reference builds the dense ``n × n`` rotation from
dense permutation matrices and multiplies the activations by it). Merging writes ``W'`` into the base weight;
unmerging applies the inverse (``diag(1/s) W R``, exact up to rounding since ``R`` is orthogonal).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...layers.base import AdapterLayer
from ...layers.dispatch import QUANT_LINEAR, module_kind
from ...layers.transform_merge import check_transforms, merge_transforms, unmerge_transforms
from ...quantization import backend_of, dense_weight
from .butterfly import (
    Perm,
    block_dropout,
    butterfly_perms,
    cayley,
    resolve_blocks,
    rotate_columns,
    rotated_linear,
    rotated_weight,
)
from .config import BOFTConfig


class BOFTLayer(AdapterLayer):
    """BOFT on ``nn.Linear`` (``boft_s: (out, 1)``), quantized linears (bitsandbytes, torchao) and ``nn.Conv2d``
    (``boft_s: (1, out)``, groups == 1).

    ``boft_R[name]: (factors, blocks, size, size)``; the weight is seen as ``(out, n)`` with ``n = in_features`` or
    ``in_channels · kh · kw``.
    """

    adapter_layer_names = ("boft_R", "boft_s")
    other_param_names = ("boft_block_size", "boft_block_num", "boft_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.boft_R = nn.ParameterDict({})
        self.boft_s = nn.ParameterDict({})
        self.boft_block_size: dict[str, int] = {}
        self.boft_block_num: dict[str, int] = {}
        self.boft_dropout: dict[str, float] = {}
        #: per adapter, per factor: the butterfly permutation and its inverse (None: identity); not saved
        self._perms: dict[str, list[Perm]] = {}
        base = self.get_base_layer()
        self.is_conv = isinstance(base, nn.Conv2d)
        #: quantized base (its weight is not a float matrix): the inputs are rotated instead of the weight, as the
        #: reference does, and merging goes through ``peftkit.quantization``
        self.quantized = module_kind(base) == QUANT_LINEAR
        backend = backend_of(base)
        self.quantization_backend = None if backend is None else backend.name
        if self.is_conv:
            self.in_features, self.out_features = base.in_channels, base.out_channels
            self.n_rotated = base.in_channels * math.prod(base.kernel_size)
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
            self.n_rotated = base.in_features

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, config: BOFTConfig, dtype: torch.dtype | None = None) -> None:
        """Create adapter ``adapter_name``: ``boft_R = 0`` (identity rotation) and ``boft_s = 1`` by default, or
        ``N(0, 0.1)`` / ``N(1, 0.1)`` with ``init_weights=False``. Raises ``ConfigError`` when the layer's width
        does not split into the configured blocks."""
        what = ("convolutional kernel dimension" if self.is_conv else "in_features") + f" ({self.n_rotated})"
        size, num = resolve_blocks(self.n_rotated, config.boft_block_size, config.boft_block_num,
                                   config.boft_n_butterfly_factor, what)
        weight = self.get_base_layer().weight
        factors = config.boft_n_butterfly_factor
        rot = torch.zeros(factors, num, size, size, dtype=dtype or weight.dtype)
        scale_shape = (1, self.out_features) if self.is_conv else (self.out_features, 1)
        scale = torch.ones(scale_shape, dtype=dtype or weight.dtype)
        if not config.init_weights:
            nn.init.normal_(rot, mean=0.0, std=0.1)
            nn.init.normal_(scale, mean=1.0, std=0.1)
        self.boft_R[adapter_name] = nn.Parameter(rot.to(weight.device))
        self.boft_s[adapter_name] = nn.Parameter(scale.to(weight.device))
        self.boft_block_size[adapter_name] = size
        self.boft_block_num[adapter_name] = num
        self.boft_dropout[adapter_name] = float(config.boft_dropout)
        self._perms[adapter_name] = [
            None if p is None else (p[0].to(weight.device), p[1].to(weight.device))
            for p in butterfly_perms(self.n_rotated, size, num, factors)
        ]
        self.set_adapter(self._active_adapter or [adapter_name])

    def set_butterfly_factors(self, adapter_name: str, factors: int) -> None:
        """Rebuild adapter ``adapter_name`` (same blocks, identity init) with ``factors`` butterfly factors: used when
        a checkpoint holds another number of factors than its config says (see ``convert_checkpoint``)."""
        config = BOFTConfig(boft_block_size=self.boft_block_size[adapter_name], boft_block_num=0,
                            boft_n_butterfly_factor=factors, boft_dropout=self.boft_dropout[adapter_name])
        param = self.boft_R[adapter_name]
        trainable = param.requires_grad
        self.update_layer(adapter_name, config, dtype=param.dtype)
        for p in self.adapter_parameters(adapter_name):
            p.requires_grad_(trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name`` (and its permutations)."""
        super().delete_adapter(adapter_name)
        self._perms.pop(adapter_name, None)

    def _apply(self, fn: Any, recurse: bool = True) -> BOFTLayer:
        """``.to()`` / ``.cuda()``: the permutation indices follow the base weight's device."""
        result = super()._apply(fn, recurse)
        device = self.get_base_layer().weight.device
        self._perms = {k: [None if p is None else (p[0].to(device), p[1].to(device)) for p in v]
                       for k, v in self._perms.items()}
        return result

    # ------------------------------------------------------------------ math
    def _blocks(self, name: str, dropout: bool) -> torch.Tensor:
        """Orthogonal blocks ``(factors, blocks, size, size)`` of adapter ``name`` (with block dropout if asked)."""
        rot = self.boft_R[name]
        q = cayley(rot.reshape(-1, rot.shape[-2], rot.shape[-1])).view(rot.shape)
        if dropout and self.boft_dropout[name] > 0:
            q = block_dropout(q, self.boft_dropout[name])
        return q

    def _scale(self, name: str) -> torch.Tensor:
        """``boft_s`` of ``name`` as a column ``(out, 1)``."""
        s = self.boft_s[name]
        return s.transpose(0, 1) if self.is_conv else s

    def _parts(self, names: tuple[str, ...], dropout: bool) -> tuple[torch.Tensor, list[torch.Tensor], list]:
        """``(scale, blocks, perms)`` of the adapters ``names = (a_1, ..., a_k)``: the product of their scales as a
        column ``(out, 1)``, and per adapter its orthogonal blocks and permutations, in the order
        :func:`rotated_weight` applies them (``W R_1ᵀ ⋯ R_kᵀ``: the reference rotates the inputs by ``R_k ⋯ R_1``)."""
        scale = self._scale(names[0])
        for name in names[1:]:
            scale = scale * self._scale(name)
        return scale, [self._blocks(n, dropout) for n in names], [self._perms[n] for n in names]

    def _rotated_weight(self, names: tuple[str, ...], weight: torch.Tensor, dropout: bool = False) -> torch.Tensor:
        """``diag(s_1 ⋯ s_k) W R_1ᵀ ⋯ R_kᵀ`` for the adapters ``names``; ``weight`` in the base weight's layout,
        returned likewise in the adapters' dtype."""
        w = weight.reshape(self.out_features, self.n_rotated).to(self.boft_R[names[0]].dtype)
        return rotated_weight(w, *self._parts(names, dropout)).view(weight.shape)

    def _run(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base operation with ``weight`` and the base bias; ``x: (..., in)`` or ``(N, C, H, W)``."""
        base = self.get_base_layer()
        x = x.to(weight.dtype)
        bias = None if base.bias is None else base.bias.to(weight.dtype)
        if self.is_conv:
            return base._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Linear: ``x: (..., in) -> (..., out)``; Conv2d: ``(N, C_in, H, W) -> (N, C_out, H', W')``."""
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        if self._row_adapters is not None:
            return self.mixed_replace(x, self.base_layer(x, *args, **kwargs),
                                      lambda name, xs: self._single_adapter_forward(name, xs, *args, **kwargs))
        names = self._forward_adapters
        if not names:
            return self.base_layer(x, *args, **kwargs)
        if self.is_conv:
            weight = self._rotated_weight(names, self.get_base_layer().weight, dropout=self.training)
            return self._run(x, weight).to(x.dtype)
        if self.quantized:
            return self._rotated_inputs_forward(x, names, *args, **kwargs)
        base = self.get_base_layer()
        dtype = self.boft_R[names[0]].dtype
        bias = None if base.bias is None else base.bias.to(dtype)
        out = rotated_linear(x.to(dtype), base.weight.to(dtype), bias, *self._parts(names, self.training))
        return out.to(x.dtype)

    def _rotated_inputs_forward(self, x: torch.Tensor, names: tuple[str, ...], *args: Any,
                                **kwargs: Any) -> torch.Tensor:
        """Quantized base: ``y = (base(x R_k ⋯ R_1) - b) ⊙ s + b`` (the reference's form; ``x: (..., in)``), the
        rotation applied to the inputs with gathers and block products (never a dense ``in × in`` matrix)."""
        scale, qs, perms = self._parts(names, self.training)
        h = x.to(scale.dtype).reshape(-1, self.n_rotated)
        for q, perm in reversed(list(zip(qs, perms))):  # x R_k first: the reference's R_k ⋯ R_1 acts on rows x
            h = _unrotate(h, q.transpose(-1, -2), perm)
        result = self.base_layer(h.view(x.shape).to(x.dtype), *args, **kwargs)
        bias = self.get_base_layer().bias
        scale = scale.flatten().to(result.dtype)
        if bias is None:
            return (result * scale).to(x.dtype)
        bias = bias.to(result.dtype)
        return ((result - bias) * scale + bias).to(x.dtype)

    def _single_adapter_forward(self, name: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x`` through adapter ``name`` alone (mixed batches): its rotated weight, or rotated inputs when the
        base is quantized."""
        if self.quantized:
            return self._rotated_inputs_forward(x, (name,), *args, **kwargs)
        return self._run(x, self._rotated_weight((name,), self.get_base_layer().weight))

    # ------------------------------------------------------------------ merging (multiplicative)
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Additive form of the merge, ``W' - W`` (base weight layout and dtype; float32 when quantized)."""
        weight = dense_weight(self.get_base_layer()).detach()
        with torch.no_grad():
            return self._rotated_weight((adapter_name,), weight).to(weight.dtype) - weight

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Replace the base weight by ``diag(s) W Rᵀ`` for each adapter of ``adapter_names`` (default: active);
        a quantized weight is re-quantized (``peftkit.quantization``, which measures and reports the error)."""
        merge_transforms(self, self._adapters_to_merge(adapter_names),
                         lambda name, w: self._rotated_weight((name,), w), safe_merge)

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        """Raise :class:`MergeError` if merging would put NaN/inf into the base weights."""
        check_transforms(self, self._adapters_to_merge(adapter_names, warn=False),
                         lambda name, w: self._rotated_weight((name,), w), chain=False)

    def unmerge(self) -> None:
        """Undo the merges, last merged first: ``W ← diag(1/s) W R`` (``R`` orthogonal, so ``Rᵀ`` inverts it)."""
        unmerge_transforms(self, self._unrotated_weight)

    def _unrotated_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``diag(1/s) W R`` of the dense ``weight`` (the inverse of adapter ``name``'s merge), ``weight``'s shape."""
        w = weight.reshape(self.out_features, self.n_rotated).to(self.boft_R[name].dtype)
        q = self._blocks(name, dropout=False).transpose(-1, -2)  # Qᵀ = Q⁻¹ blockwise
        return (_unrotate(w, q, self._perms[name]) / self._scale(name)).view(weight.shape)


def _unrotate(w: torch.Tensor, qt: torch.Tensor, perms: list[Perm]) -> torch.Tensor:
    """``w · R`` given the transposed blocks ``qt`` of ``R``: the factors of :func:`rotate_columns` in reverse order
    with ``Qᵀ`` (``R = M_{m-1} ⋯ M_0``, so ``w R = w M_{m-1} ⋯ M_0`` and ``M_i = (M_iᵀ)ᵀ``)."""
    for i in reversed(range(qt.shape[0])):
        w = rotate_columns(w, qt[i : i + 1], perms[i : i + 1])
    return w
