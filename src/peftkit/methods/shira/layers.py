"""SHiRA layers: a trained sparse update ``ΔW`` of ``k = r * (in + out)`` fixed entries of an ``nn.Linear`` (plain
or quantized).

Shapes (as the reference saves them): ``shira_weight: (k,)`` (the entries' values, trainable) and
``shira_indices: (2, k)`` int32 (rows, columns in ``W: (out, in)``, row-major order; saved beside the weights under
``<module>.shira_indices``, without the adapter name; layers of one shape share the random mask's tensor until a
load writes into it). ``ΔW[rows, cols] = shira_weight * scaling`` (``scaling``: 1.0,
changed by ``set_scale``). Forward: ``x (W + ΔW)ᵀ + b`` through ``sparse.sparse_linear`` (one matmul; backward keeps
no ``(out, in)`` copy); a base layer that is not exactly ``nn.Linear`` or has hooks runs as ``base(x) + x ΔWᵀ``
instead (the reference bypasses such a layer's forward and hooks), as does a quantized base (bitsandbytes, torchao).
Merge adds the entries into ``W`` (scatter-add; a quantized ``W`` is dequantized and re-quantized).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError, MergeError, UnsupportedModuleError
from ...injection.apply import defer_init, skip_random_init
from ...layers.base import AdapterLayer
from ...layers.dispatch import inplace_safe
from ...quantization import backend_of, dense_weight, measured_requantization, write_dense_weight
from ..psoft.buffers import FrozenBuffers
from .sparse import flat_positions, merged_weight, sparse_linear


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of an ``nn.Linear`` (the only layer type SHiRA adapts); :class:`UnsupportedModuleError` else."""
    if not isinstance(module, nn.Linear):
        raise UnsupportedModuleError(
            f"target module {type(module).__name__} is not supported; SHiRA supports torch.nn.Linear only. "
            "Adjust target_modules.")
    return module.out_features, module.in_features


def mask_positions(out_features: int, in_features: int, r: int, seed: int | None) -> torch.Tensor:
    """``(k,)`` int64, ascending: the flat positions of :func:`~peftkit.methods.shira.config.random_mask`'s ones,
    ``k = r * (out + in)``: the first ``k`` of ``torch.randperm(out * in)`` from a fresh CPU generator seeded with
    ``seed`` (None: its default seed), as the reference draws them."""
    generator = torch.Generator() if seed is None else torch.Generator().manual_seed(seed)
    count = r * (out_features + in_features)
    return torch.randperm(out_features * in_features, generator=generator)[:count].sort().values


#: random-mask indices by ``(out, in, r, seed, device)``, alive while a layer holds them
_SHARED_INDICES: weakref.WeakValueDictionary[tuple[Any, ...], torch.Tensor] = weakref.WeakValueDictionary()


def random_indices(out_features: int, in_features: int, r: int, seed: int | None,
                   device: torch.device) -> torch.Tensor:
    """``(2, k)`` int32 rows and columns of the random mask's ones on ``device``. Every layer of one shape draws the
    same mask, so its layers share one tensor (read-only: :func:`unshare_indices` gives a layer its own copy before a
    load writes into it); the reference keeps a copy per layer."""
    key = (out_features, in_features, r, seed, torch.device(device))
    indices = _SHARED_INDICES.get(key)
    if indices is None:
        flat = mask_positions(out_features, in_features, r, seed)
        indices = torch.stack([flat // in_features, flat % in_features]).to(device=device, dtype=torch.int32)
        _SHARED_INDICES[key] = indices
    return indices


def mask_indices(mask: torch.Tensor, shape: tuple[int, int], count: int) -> torch.Tensor:
    """``(2, k)`` int32 rows and columns (row-major order) of the ones of ``mask: (out, in)``, checked to be a 0/1
    mask of ``shape`` with exactly ``count`` ones (the reference's rule for custom mask functions)."""
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
        raise ConfigError("mask_fn", getattr(mask, "shape", mask), f"must return a mask of shape {shape}")
    ones = mask == 1
    if int(ones.sum()) != count or not bool((ones | (mask == 0)).all()):
        raise ConfigError("mask_fn", f"a mask with {int(ones.sum())} ones",
                          f"must return a 0/1 mask with exactly r * (in + out) = {count} ones")
    return ones.nonzero().t().to(torch.int32).contiguous()


class ShiraLayer(AdapterLayer):
    """SHiRA on ``nn.Linear``: ``y = x (W + ΔW)ᵀ + b``, ``ΔW`` zero but at ``shira_indices``."""

    adapter_layer_names = ("shira_weight",)
    other_param_names = ("r", "scaling", "shira_indices")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.out_features, self.in_features = linear_shape(self.get_base_layer())
        self.fan_in_fan_out = False
        self.shira_weight = nn.ParameterDict({})
        self.shira_indices = FrozenBuffers()  # (2, k) int32 per adapter: moves with the layer, saved by adapter_state
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}

    def update_layer(self, adapter_name: str, r: int, indices: torch.Tensor | None, init_weights: bool,
                     dtype: torch.dtype | None = None) -> None:
        """Create adapter ``adapter_name`` with ``k = r * (in + out)`` entries at ``indices: (2, k)`` (None: zeros,
        for a load to fill), zero (``init_weights``) or ``N(0, 1)``, in ``dtype`` (default: the base weight's)."""
        weight = self.get_base_layer().weight
        count = r * (self.in_features + self.out_features)
        if indices is None:
            indices = torch.zeros(2, count, dtype=torch.int32)
        self.shira_indices[adapter_name] = indices.to(device=weight.device, dtype=torch.int32)  # may be shared
        dtype = dtype or weight.dtype
        if skip_random_init():  # a load fills it: never draw it
            self.shira_weight[adapter_name] = nn.Parameter(torch.empty(count, device="meta", dtype=dtype))
            defer_init([self.shira_weight[adapter_name]], weight.device)
        else:
            values = torch.zeros(count) if init_weights else torch.randn(count)
            self.shira_weight[adapter_name] = nn.Parameter(values.to(device=weight.device, dtype=dtype))
        self.r[adapter_name] = r
        self.scaling[adapter_name] = 1.0
        self.set_adapter(self._active_adapter or [adapter_name])

    def unshare_indices(self, adapter_name: str) -> None:
        """Give adapter ``adapter_name`` its own ``shira_indices`` (layers of one shape share the random mask's),
        so that a load can write into them."""
        if adapter_name in self.shira_indices:
            self.shira_indices[adapter_name] = self.shira_indices[adapter_name].clone()

    def set_scale(self, adapter: str, scale: float) -> None:
        """Set the factor of ``adapter``'s entries (the reference's ``set_scale``; ignored for unknown adapters)."""
        if adapter in self.scaling:
            self.scaling[adapter] = scale

    def adapter_state(self, adapter_name: str) -> dict[str, tuple[str, torch.Tensor]]:
        """The parameters, plus ``shira_indices`` under the reference's key (no adapter name)."""
        state = super().adapter_state(adapter_name)
        if adapter_name in self.shira_indices:
            state["shira_indices"] = (f"shira_indices.{adapter_name}", self.shira_indices[adapter_name])
        return state

    # ------------------------------------------------------------------ the update
    def _positions(self, adapter_name: str) -> torch.Tensor:
        return flat_positions(self.shira_indices[adapter_name], (self.out_features, self.in_features))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW: (out, in)`` dense, in ``shira_weight``'s dtype (differentiable)."""
        values = self.shira_weight[adapter_name]
        zeros = values.new_zeros(self.out_features, self.in_features)
        return merged_weight(zeros, [self._positions(adapter_name)], [values], [self.scaling[adapter_name]])

    # ------------------------------------------------------------------ merging into quantized bases
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Scatter-add each adapter's entries into the base weight; a quantized base is dequantized, updated and
        re-quantized (measured: ``quantization.merge``)."""
        base = self.get_base_layer()
        if backend_of(base) is None:
            super().merge(safe_merge, adapter_names)
            return
        for name in self._adapters_to_merge(adapter_names):
            new_w = dense_weight(base).detach() + self.get_delta_weight(name).detach().float()
            if safe_merge and not torch.isfinite(new_w).all():
                raise MergeError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            with measured_requantization(self, name, new_w), torch.no_grad():
                write_dense_weight(base, new_w)
                self.merged_adapters.append(name)
                self._refresh()
        self._refresh()

    def unmerge(self) -> None:
        """Subtract every merged adapter's entries, last merged first (re-quantizing a quantized base)."""
        base = self.get_base_layer()
        if backend_of(base) is None:
            super().unmerge()
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                write_dense_weight(base, dense_weight(base).detach() - self.get_delta_weight(name).detach().float())
        self._refresh()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in) -> (..., out)``: ``x (W + Σ_a ΔW_a)ᵀ + b`` over the forward adapters."""
        if self._disable_adapters or not self._forward_adapters and self._row_adapters is None:
            return self._base_forward(x, *args, **kwargs)
        base = self.get_base_layer()
        if self._row_adapters is not None or not (base is self.base_layer and inplace_safe(base)):
            result = self.base_layer(x, *args, **kwargs)
            if self._row_adapters is not None:
                return self.mixed_add(x, result, self._delta_output)
            for name in self._forward_adapters:
                result = result + self._delta_output(name, x).to(result.dtype)
            return result
        names = self._forward_adapters
        return sparse_linear(x, base.weight, base.bias, [self.shira_indices[n] for n in names],
                             [self.shira_weight[n] for n in names], [self.scaling[n] for n in names])

    def _delta_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x ΔWᵀ``: ``x: (..., in) -> (..., out)``."""
        delta = self.get_delta_weight(name)
        return F.linear(x.to(delta.dtype), delta)
